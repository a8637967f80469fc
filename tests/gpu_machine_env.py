"""The GPU machine's Python on a CPU, for subprocesses: torch and what its wheel depends on, the device bundle
(bench/gpu/bundle.py, built here on first use: `make device-bundle`) and the checkout, nothing else
(tests/device_env/sitecustomize.py blocks every other installed package and its metadata)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCKER = REPO / "tests" / "device_env"


def bundle_site() -> Path:
    """The bundle's folder, built when missing (pip downloads the pinned wheels: CI builds it first, in .ci/run)."""
    from bench.gpu.bundle import DEFAULT_DIR, build

    return build(DEFAULT_DIR)


def environment() -> dict[str, str]:
    site = bundle_site()
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(BLOCKER), str(site), str(REPO)]),
            "MIMO_DEVICE_BUNDLE": str(site), "OMP_NUM_THREADS": "1",
            "PYTHON": sys.executable,  # device_run.sh's interpreter: this one (CI's PATH has no torch in python3)
            "PYTHONDONTWRITEBYTECODE": "1"}  # the carried bundle stays as built (no __pycache__ in it)
