"""`python -m bench.gpu`: the one-GPU benchmark (under 4 minutes on one H200); `--smoke`: every code path at tiny
shapes on a CPU (a CI test). Imports only torch and the project. Each section compares against a reference measured in
the same run and ends with RESULT lines; `--json` holds them all.

Sections (modules of this package, in order): env, swa, global_attention, experts, gemm, layer, train. What the run
measured that the planner takes is also written as a calibration file for `mimo-train plan --calibrate`. Both
files go to `--out DIR` (default runs/bench_gpu, git-ignored) and are rewritten after every section, so a run that
is killed keeps what it measured; a later run with `--only` replaces only its own sections' results there. Each
section is imported inside its own error handler: one that cannot import fails alone.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

from bench.gpu.estimates import BENCH_SECTION_SECONDS
from bench.gpu.harness import Harness

SECTIONS = ("env", "swa", "global_attention", "experts", "gemm", "layer", "train")
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "runs" / "bench_gpu"  # git-ignored (runs/)
JSON_NAME, CALIBRATION_NAME = "bench_gpu.json", "bench_gpu_calibration.json"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: check the code paths run (CI)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="run only these sections")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"the results folder: {JSON_NAME} (every result, rewritten after each section; the "
                         f"results of sections not run this time are kept) and {CALIBRATION_NAME} (default: "
                         f"{DEFAULT_OUT})")
    ap.add_argument("--json", type=Path, default=None, help=f"where to write every result (default: OUT/{JSON_NAME})")
    ap.add_argument("--calibration", type=Path, default=None,
                    help=f"where to write the measured planner inputs, for `mimo-train plan --calibrate` "
                         f"(default: OUT/{CALIBRATION_NAME})")
    args = ap.parse_args(argv)
    args.json = args.json or args.out / JSON_NAME
    args.calibration = args.calibration or args.out / CALIBRATION_NAME
    return args


def gpu_name(device: torch.device) -> str:
    """The planner's name for this GPU ("h200" for an NVIDIA H200), or the device type."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    return next((word for word in name.replace("-", " ").split() if word[:1] in "abhlv" and word[1:2].isdigit()), name)


def calibration(results: list[dict], device: torch.device) -> dict | None:
    """The planner inputs this run measured (calibration.CALIBRATION_FIELDS): compute_efficiency is the bf16 training
    run's MFU, a train step's model FLOPs / (time x peak), exactly the planner's definition. None if not measured."""
    runs = [r for r in results if r["name"] == "train" and r.get("precision") == "bf16" and r.get("mfu")]
    if not runs:
        return None
    return {"gpu": gpu_name(device), "source": "python -m bench.gpu (section train, bf16)",
            "measured": {"compute_efficiency": min(1.0, runs[-1]["mfu"])}}


def _write_calibration(h: Harness, device: torch.device, path: Path) -> None:
    """The planner calibration from every train result in the JSON (this run's, or a previous run's kept)."""
    measured = calibration(h.all_results(), device)
    if measured is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(measured, indent=2))
    if not h.calibration_written:
        print(f"bench.gpu: planner calibration written to {path} (mimo-train plan --calibrate {path})", flush=True)
    h.calibration_written = True


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device; run with --smoke for the CPU check of the code paths", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    sections = args.only or SECTIONS
    h = Harness(smoke=args.smoke, device=device, json_path=args.json, replacing=sections)
    for name in sections:  # the estimate: bench/gpu/estimates.py
        estimate = "a few seconds on a CPU" if args.smoke else f"about {BENCH_SECTION_SECONDS[name]} s on one H200"
        print(f"bench.gpu: section {name}: estimate {estimate}", flush=True)
        try:
            with h.section(name):  # an import error is the section's failure, not the run's
                importlib.import_module(f"bench.gpu.{name}").run(h)
        finally:
            h.write_json()  # after every section: a run killed later keeps what it measured
            _write_calibration(h, device, args.calibration)
    if h.failures:
        print(f"bench.gpu: failed sections: {', '.join(h.failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
