"""`python -m bench.gpu`: the one-GPU benchmark (under 4 minutes on one H200); `--smoke`: every code path at tiny
shapes on a CPU (a CI test). Imports only torch and the project. Each section compares against a reference measured in
the same run and ends with RESULT lines; `--json` holds them all.

Sections (modules of this package, in order): env, swa, global_attention, experts, gemm, layer, train. What the run
measured that the planner takes is also written as a calibration file for `mimo-train plan --calibrate`.
"""

from __future__ import annotations

import argparse
import importlib
import json
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
    ap.add_argument("--calibration", type=Path, default=Path("bench_gpu_calibration.json"),
                    help="where to write the measured planner inputs (for `mimo-train plan --calibrate`)")
    return ap.parse_args(argv)


def gpu_name(device: torch.device) -> str:
    """The planner's name for this GPU ("h200" for an NVIDIA H200), or the device type."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    return next((word for word in name.replace("-", " ").split() if word[:1] in "abhlv" and word[1:2].isdigit()), name)


def calibration(results: list[dict], device: torch.device) -> dict | None:
    """The planner inputs this run measured (planner.CALIBRATION_FIELDS): compute_efficiency is the bf16 training
    run's MFU, a train step's model FLOPs / (time x peak), exactly the planner's definition. None if not measured."""
    runs = [r for r in results if r["name"] == "train" and r.get("precision") == "bf16" and r.get("mfu")]
    if not runs:
        return None
    return {"gpu": gpu_name(device), "source": "python -m bench.gpu (section train, bf16)",
            "measured": {"compute_efficiency": min(1.0, runs[-1]["mfu"])}}


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
    measured = calibration(h.results, device)
    if measured is not None:
        args.calibration.write_text(json.dumps(measured, indent=2))
        print(f"bench.gpu: planner calibration written to {args.calibration} (mimo-train plan --calibrate "
              f"{args.calibration})", flush=True)
    if h.failures:
        print(f"bench.gpu: failed sections: {', '.join(h.failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
