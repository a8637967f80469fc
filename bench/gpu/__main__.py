"""`python -m bench.gpu`: the one-GPU benchmark (under 4 minutes on one H200); `--smoke`: every code path at tiny
shapes on a CPU (a CI test). Imports only torch and the project. Each section compares against a reference measured in
the same run and ends with RESULT lines; `--json` holds them all.

Sections (modules of this package, in order): env, swa, global_attention, experts, gemm, layer, train.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from bench.gpu.harness import Harness

SECTIONS = ("env", "swa", "global_attention", "experts", "gemm", "layer", "train")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: check the code paths run (CI)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="run only these sections")
    ap.add_argument("--json", type=Path, default=Path("bench_gpu.json"), help="where to write every result")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device; run with --smoke for the CPU check of the code paths", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    h = Harness(smoke=args.smoke, device=device, json_path=args.json)
    for name in args.only or SECTIONS:
        module = importlib.import_module(f"bench.gpu.{name}")
        with h.section(name):
            module.run(h)
    h.write_json()
    if h.failures:
        print(f"bench.gpu: failed sections: {', '.join(h.failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
