"""The `mimo-train` command line: train, info, hf-import, hf-export, prepare-data."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from mimo_train.config import ConfigError, load_config


def _train(args) -> int:
    cfg = load_config(args.config, args.overrides)  # fail on a bad config before starting any process
    if args.nproc > 1 and "RANK" not in os.environ:
        return _launch_local(args.nproc, ["train", "--config", args.config, "--resume", args.resume, *args.overrides])
    from mimo_train.trainer import Trainer

    trainer = Trainer(cfg, resume=args.resume)
    records = trainer.fit()
    if records and trainer.is_logger:
        print(f"done: step {trainer.step}, loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}, "
              f"checkpoint in {trainer.ckpt_dir}", flush=True)
    return 0


def _launch_local(nproc: int, argv: list[str]) -> int:
    """Start `nproc` local ranks with torchrun (its elastic agent handles the rendezvous and tears every rank
    down when one fails)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mimo_train.cli", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)


def _hf_import(args) -> int:
    """HF directory -> our checkpoint (model only, step 0), loadable with `train --resume`... or by load_model."""
    from mimo_train import checkpoint as ckpt
    from mimo_train import hf
    from mimo_train.config import Config, save_config

    model = hf.load_pretrained(args.hf_dir)
    out = Path(args.ckpt_dir)
    path = ckpt.save_checkpoint(out, 0, {"model": model.state_dict()}, {"source": str(args.hf_dir), "model_only": True})
    save_config(Config(model=model.cfg), path.parent / "config.yaml")
    print(f"imported {args.hf_dir} -> {path}")
    return 0


def _hf_export(args) -> int:
    from mimo_train import checkpoint as ckpt
    from mimo_train import hf
    from mimo_train.model import MiMoForCausalLM

    src = Path(args.ckpt_dir)
    path = src if (src / ckpt.META).is_file() else ckpt.find_latest(src)
    if path is None:
        raise FileNotFoundError(f"{src}: no complete checkpoint")
    config_file = next((p for p in (path.parent / "config.yaml", path.parent.parent / "config.yaml") if p.is_file()), None)
    if config_file is None:
        raise FileNotFoundError(f"{src}: no config.yaml beside the checkpoint")
    cfg = load_config(config_file)
    model = MiMoForCausalLM(cfg.model)
    state = {"model": model.state_dict()}
    ckpt.load_checkpoint(path, state)
    model.load_state_dict(state["model"])
    hf.save_hf(model, args.hf_dir)
    print(f"exported {path} -> {args.hf_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimo-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pre-train (single process on CPU, or torchrun)")
    p.add_argument("--config", required=True)
    p.add_argument("--resume", default="auto", help="auto (newest complete checkpoint), none, or a checkpoint path")
    p.add_argument("--nproc", type=int, default=1, help="start N local processes (gloo on CPU, NCCL on GPUs)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 model.num_layers=12")
    p.set_defaults(func=_train)

    p = sub.add_parser("hf-import", help="Hugging Face directory -> mimo-train checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("ckpt_dir")
    p.set_defaults(func=_hf_import)

    p = sub.add_parser("hf-export", help="mimo-train checkpoint -> Hugging Face directory (released layout)")
    p.add_argument("ckpt_dir")
    p.add_argument("hf_dir")
    p.set_defaults(func=_hf_export)

    from mimo_train.info import add_info_parser

    add_info_parser(sub)
    from data_pipeline.prepare import add_prepare_data_parser

    add_prepare_data_parser(sub)
    from mimo_train.slurm import add_submit_parser

    add_submit_parser(sub)
    from mimo_train.planner import add_plan_parser

    add_plan_parser(sub)
    from mimo_train.simulate import add_simulate_parser

    add_simulate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow later options (argparse stops collecting positionals at an option).
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
