#!/usr/bin/env bash
# The first GPU run in one command: bash bench/gpu/device_run.sh OUT [--parts ...] [--sections ...] [--budget S]
# On the GPU machine (Python 3.12 and torch, nothing else) the device bundle of `make device-bundle`
# (build/device_bundle/site, carried) goes first on PYTHONPATH, then the repository; bench/gpu/device_run.py does
# the rest and writes every part's results into OUT as soon as the part ends.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: bash bench/gpu/device_run.sh OUT [--parts PART...] [--sections SECTION...] [--budget SECONDS]}
shift
BUNDLE=$PWD/build/device_bundle/site
if [[ ! -f $BUNDLE/device_bundle.json ]]; then
    echo "device_run: $BUNDLE is missing: run 'make device-bundle' here and carry build/device_bundle/site" >&2
    exit 2
fi
export PYTHONPATH="$BUNDLE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m bench.gpu.device_run --out "$OUT" "$@"
