"""`mimo-train plan`: the command line of the layout estimator (`estimator.py`), of the memory check of a training
config (`plan_check.py`) and of the README's table (`plan_table.py`).

    mimo-train plan --config configs/model/mimo_v2_flash.yaml --gpus 512 --gpu h100 [--seq 32768] [--json]
    mimo-train plan --config configs/train/mimo_v2_flash_pretrain.yaml --gpu h100 --check   (mimo_train/planning/plan_check.py)
    mimo-train plan --config configs/model/mimo_v2_flash.yaml --readme-table                 (mimo_train/planning/plan_table.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

from mimo_train.config import ConfigError, load_config
from mimo_train.hardware import GPUS
from mimo_train.planning.calibration import calibrated, check_calibration_device, load_calibration
from mimo_train.planning.estimator import plan, where_it_fits
from mimo_train.planning.geometry import GB, Assumptions, Layout, model_config
from mimo_train.planning.verification import format_verification, verify
from mimo_train.precision import PRECISIONS


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def assumptions_line(p: dict[str, Any]) -> str:
    """Every assumption the plan used (the fields of Hardware, Precision and Assumptions), name=value."""
    fields = {**{f"gpu.{k}": v for k, v in p["gpu"].items() if k != "name"},
              **{f"precision.{k}": v for k, v in p["precision"].items() if k != "name"}, **p["assumptions"]}
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


def format_plan(p: dict[str, Any], top: int) -> str:
    hw, A = p["gpu"], p["assumptions"]
    res = p["results"]
    n_fit = sum(e.fits for e in res)
    lines = [
        f"{p['gpus']} x {hw['name'].upper()} ({hw['memory_gb']:.0f} GB, {hw['peak_tflops']:.0f} TFLOP/s bf16), "
        f"seq {p['seq']:,}, global batch {p['global_batch']} sequences, micro-batch {A['micro_batch_size']}; "
        f"{len(res)} layouts, {n_fit} fit in {hw['memory_gb'] - A['reserve_gb']:.0f} GB",
        f"model {p['params'] / 1e9:.2f}B params, {p['flops_per_token'] / 1e9:.1f} GFLOP/token (fwd+bwd, SWA-aware, "
        f"MTP incl.); precision {p['precision']['name']}, attention kernel {A['kernel']}, compute at "
        f"{A['compute_efficiency']:.0%} of peak, NVLink {hw['nvlink_gbs']:.0f} GB/s, IB {hw['ib_gbs']:.0f} GB/s",
        "",
        f"{'#':>3} {'layout':<34} {'recomp':<9} {'mem GB':>7} {'(par':>5} {'grad':>5} {'opt':>5} {'act':>6} "
        f"{'head)':>6} {'TP':>6} {'EP':>6} {'CP':>6} {'PP':>6} {'DP':>6} {'bubble':>6} {'step s':>7} {'MFU':>6} fits "
        "sim",
        f"{'':>3} {'':<34} {'':<9} {'':>7} {'':>5} {'':>5} {'':>5} {'':>6} {'':>6} "
        + " ".join(f"{'GB/st':>6}" for _ in range(5)),
    ]
    for i, e in enumerate(res[:top], 1):
        mem, c = e.memory, e.comm
        fits = "yes" if e.fits else "NO"
        if not e.runnable:
            fits += "*"
        lines.append(
            f"{i:>3} {e.layout.describe():<34} {e.layout.recompute:<9} {_gb(mem['total']):>7} {_gb(mem['params']):>5} "
            f"{_gb(mem['grads']):>5} {_gb(mem['optimizer']):>5} {_gb(mem['activations']):>6} "
            f"{_gb(mem['head_and_mtp'] + mem['transient']):>6} "
            + " ".join(f"{_gb(c[k]):>6}" for k in ("tp", "ep", "cp", "pp", "dp"))
            + f" {e.bubble:>6.1%} {e.step_time:>7.2f} {e.mfu:>6.1%} {fits:<4} "
            + ("built" if e.simulated else "-"))
    if any(not e.runnable for e in res[:top]):
        lines.append("* etp > 1: modelled, not yet runnable (expert-tensor parallelism is not implemented)")
    lines.append("memory: the worst pipeline rank; comm: bytes sent per step by the busiest rank; step time = "
                 "compute / (1 - bubble) + exposed communication")
    lines.append("sim: built = every rank class was built with the real code on a fake process group (`mimo-train "
                 "simulate`, run here by --verify); - = not built (`plan --verify` builds the top pick)")
    for e in res[:top]:
        if e.simulated:
            lines.append(format_verification(e))
    lines.append("step time and MFU are estimates, not measurements; assumptions: " + assumptions_line(p))
    if p.get("measured"):
        lines.append("measured (--calibrate): " + ", ".join(f"{k}={v:g}" for k, v in p["measured"].items())
                     + "; every other figure is an assumption")
    else:
        lines.append("measured: nothing (no --calibrate): every figure above is an assumption")
    if "fits_elsewhere" in p:
        if p["fits_elsewhere"]:
            lines.append(f"nothing fits on {p['gpus']} x {hw['name'].upper()}; smallest that fit: " + "; ".join(
                f"{n} x {g.upper()}: {name}, {rc} recompute, {mem / GB:.1f} GB, {step:.0f} s/step"
                for n, g, name, rc, mem, step in p["fits_elsewhere"]))
        else:
            lines.append(f"nothing fits on {p['gpus']} x {hw['name'].upper()}, nor on a larger cluster or GPU")
    return "\n".join(lines)


def run_check(args: argparse.Namespace) -> int:
    """`plan --check`: the config's own layout in every stage; exit 0 when every stage fits, 1 when one does not."""
    from mimo_train.planning.plan_check import check_config, first_failure, format_check

    try:
        cfg = load_config(args.config, args.overrides)
        hw = GPUS[args.gpu]
        checks = check_config(cfg, hw, args.gpus, Assumptions(reserve_gb=args.reserve_gb))
    except (ConfigError, ValueError, KeyError) as e:
        print(f"mimo-train plan --check: {e}", file=sys.stderr)
        return 2
    print(format_check(checks))
    bad = first_failure(checks)
    if bad is not None:
        print(f"mimo-train plan --check: {bad.verdict()}", file=sys.stderr)
        return 1
    return 0


def _layouts_asked(args: argparse.Namespace) -> list[Layout] | None:
    """--layout: the one layout to estimate (world size from it, or --gpus), else None (enumerate)."""
    if not args.layout:
        return None
    from mimo_train.planning.simulate import parallel_config, parse_layout

    p = parallel_config(parse_layout(args.layout), args.gpus)
    args.gpus = p.world_size
    return [Layout(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep, etp=p.etp, pp_schedule=p.pp_schedule,
                   pp_virtual=p.pp_virtual, recompute=p.recompute)]


def run_plan(args: argparse.Namespace) -> int:
    if args.check:
        return run_check(args)
    if args.readme_table:
        from mimo_train.planning.plan_table import readme_table

        cfg = model_config(args.config, args.overrides, args.mtp_blocks)
        print(readme_table(cfg, progress=lambda msg: print(msg, file=sys.stderr, flush=True)))
        return 0
    try:
        layouts = _layouts_asked(args)
        if args.gpus is None:
            raise ConfigError("--gpus: required (or give --layout, or --check a training config)")
        cfg = model_config(args.config, args.overrides, args.mtp_blocks)
        A = Assumptions(compute_efficiency=args.efficiency, reserve_gb=args.reserve_gb, kernel=args.kernel,
                        micro_batch_size=args.micro_batch_size)
        hw = GPUS[args.gpu]
        hw = replace(hw, **{k: v for k, v in (("nvlink_gbs", args.nvlink_gbs), ("ib_gbs", args.ib_gbs),
                                              ("peak_tflops", args.peak_tflops)) if v})
        measured = load_calibration(args.calibrate) if args.calibrate else {}
        if args.calibrate:
            check_calibration_device(args.calibrate, args.gpu, args.force_calibration)
        A, hw = calibrated(A, hw, measured)
        p = plan(cfg, args.gpus, args.gpu, args.seq, args.global_batch, args.precision, A, hw, layouts)
    except (ConfigError, ValueError, KeyError) as e:
        print(f"mimo-train plan: {e}", file=sys.stderr)
        return 2
    if not p["results"]:
        print(f"mimo-train plan: no valid layout for {args.gpus} GPUs at seq {args.seq}", file=sys.stderr)
        return 1
    p["measured"] = measured
    if args.verify:
        for e in [e for e in p["results"] if e.fits and e.runnable][: args.verify]:
            if not args.json:
                print(f"verifying {e.layout.describe()} with mimo-train simulate ...", file=sys.stderr, flush=True)
            verify(cfg, e, args.seq, p["global_batch"], args.precision, assumptions=A)
    if not any(e.fits for e in p["results"]):
        p["fits_elsewhere"] = [(n, g, e.layout.describe(), e.layout.recompute, e.memory["total"], e.step_time)
                               for n, g, e in where_it_fits(cfg, args.gpus, args.gpu, args.seq, args.global_batch,
                                                            args.precision, A)]
    if args.json:
        out = {k: v for k, v in p.items() if k != "results"}
        out["results"] = [e.to_dict() for e in p["results"][: args.top]]
        out["num_layouts"] = len(p["results"])
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(p, args.top))
    return 0 if all(e.simulated is None or e.simulated["within_tolerance"] for e in p["results"]) else 1


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="rank parallel layouts for a GPU count: memory per GPU, communication, step time, MFU",
        description="Enumerate the valid TP/PP(+schedule)/CP/DP/EP/ETP/recompute layouts for a number of GPUs and "
                    "estimate memory per GPU, communication per step, step time and MFU (see mimo_train/planning/estimator.py "
                    "for the model and its assumptions).")
    p.add_argument("--config", required=True, help="a model YAML (configs/model/*.yaml) or a training YAML")
    p.add_argument("--gpus", type=int, default=None,
                   help="number of GPUs to plan for (required unless --layout or --check gives it)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU type (memory, peak FLOP/s, links; default h100)")
    p.add_argument("--seq", type=int, default=32768, help="sequence length (default 32768)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per step (default: 2^26 tokens / seq, the recipe: 2048 at 32k, 256 at 256k)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--mtp-blocks", type=int, default=1,
                   help="MTP blocks trained (default 1, the pre-training recipe; -1: as in the config)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16",
                   help="weights, gradients and optimizer-state precision (default bf16)")
    p.add_argument("--kernel", choices=("fused", "torch"), default="fused",
                   help="attention kernels for the activation model (fused: parallel.backend=fused's flash/flex "
                        "kernels on GPUs)")
    p.add_argument("--efficiency", type=float, default=Assumptions.compute_efficiency,
                   help="achieved fraction of peak FLOP/s on compute (default %(default)s)")
    p.add_argument("--reserve-gb", type=float, default=Assumptions.reserve_gb,
                   help="GPU memory kept free for the CUDA context, NCCL and fragmentation (default %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="override the GPU's peak")
    p.add_argument("--nvlink-gbs", type=float, default=0.0, help="override the intra-node bandwidth (GB/s)")
    p.add_argument("--ib-gbs", type=float, default=0.0, help="override the inter-node bandwidth per GPU (GB/s)")
    p.add_argument("--verify", type=int, nargs="?", const=1, default=0, metavar="N",
                   help="build the top N fitting layouts (default 1) with `mimo-train simulate` and compare")
    p.add_argument("--calibrate", default="", metavar="FILE",
                   help="bench/gpu results (JSON: {\"measured\": {...}}): replace the assumed efficiency, "
                        "bandwidths and overlaps by the measured ones (fields: calibration.CALIBRATION_FIELDS)")
    p.add_argument("--layout", default="", help="estimate this one layout (keys of parallel.*, as simulate's "
                                                "--layout, e.g. tp=2,pp=16,cp=4,dp=4,ep=8,recompute=selective)")
    p.add_argument("--check", action="store_true",
                   help="--config is a training YAML: estimate its own layout in every stage on --gpu; exit 0 when "
                        "every stage fits, 1 when one does not (naming the stage, rank, need and budget)")
    p.add_argument("--readme-table", action="store_true",
                   help="print the README's table of recommended layouts (64/512/2048 H100s, 64 H200s; 32k, 256k)")
    p.add_argument("--force-calibration", action="store_true",
                   help="apply a --calibrate file measured on another device type than --gpu")
    p.add_argument("--top", type=int, default=10, help="how many layouts to print (default 10)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="model overrides, e.g. model.num_layers=24")
    p.set_defaults(func=run_plan)
    return p
