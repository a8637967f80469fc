"""The `mimo-train` command line: train, info, plan, submit, prepare-data, verify-data, hf-import, hf-export."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mimo_train.config import ConfigError, load_config


def _world_size_from_environment(nproc: int) -> int:
    """The number of ranks this launch has: torchrun's or Slurm's environment, else --nproc."""
    env = os.environ
    if "RANK" in env:
        return int(env.get("WORLD_SIZE", "1"))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_NTASKS"])
    return nproc


def _train(args) -> int:
    from mimo_train import preflight

    if args.nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1 (got {args.nproc})")
    # Everything that can be checked without a process group is checked here, before any rank starts.
    cfg = load_config(args.config, args.overrides)
    preflight.check_resume_path(args.resume)
    world = _world_size_from_environment(args.nproc)
    preflight.check_layouts(cfg, world, preflight.starting_stage(cfg, args.resume),
                            where=f" (--nproc {args.nproc})" if world == args.nproc else "")
    preflight.check_machine(cfg)
    if args.overwrite and args.resume != "none":
        raise ConfigError(f"--overwrite: only with --resume none (it moves the old run aside to start a new one); "
                          f"--resume {args.resume} continues the run in place")
    preflight.check_data(cfg)
    launcher = args.nproc > 1 and "RANK" not in os.environ
    if not (launcher or world == 1):  # one of a torchrun/Slurm job's ranks: rank 0 takes the lock in the trainer
        return _train_rank(cfg, args.resume, world)
    if not args.skip_memory_check:
        preflight.check_memory_on_cuda(cfg, world)
    # The process that owns the launch holds the run directory's lock before any rank starts, until all ended.
    from mimo_train.run_lock import HELD_ENV

    lock = _lock_run_dir(cfg, args.resume, args.overwrite)
    try:
        if launcher:
            from mimo_train.launcher import launch_local

            os.environ[HELD_ENV] = str(Path(cfg.run.dir).resolve())  # inherited by the ranks
            # --overwrite is not passed on: the old run is already aside, and the ranks must not move the new one.
            return launch_local(args.nproc, ["train", "--config", args.config, "--resume", args.resume,
                                             *args.overrides])
        return _train_rank(cfg, args.resume, world)
    finally:
        os.environ.pop(HELD_ENV, None)
        lock.release()


def _lock_run_dir(cfg, resume: str, overwrite: bool):
    """The run directory's lock (refused when another run holds it), taken before `--overwrite` moves an old
    run aside, so a live run is never moved; then taken again on the new, empty directory."""
    from mimo_train import preflight
    from mimo_train.run_lock import RunLock

    lock = RunLock(cfg.run.dir).acquire()
    try:
        moved = preflight.prepare_run_dir(cfg, resume, overwrite)
    except BaseException:
        lock.release()
        raise
    if moved is not None:
        lock.release()
        lock = RunLock(cfg.run.dir).acquire()
    return lock


def _train_rank(cfg, resume: str, world: int) -> int:
    try:
        trainer, records = _run_trainer(cfg, resume)
    except RuntimeError as e:
        if world > 1 and _peer_failed(e):  # the failed rank printed the traceback that matters; one line here
            print(f"rank {os.environ.get('RANK', '?')}: stopping, another rank failed ({str(e).splitlines()[0][-160:]})",
                  file=sys.stderr, flush=True)
            return 1
        raise
    if records and trainer.is_logger:
        print(f"done: step {trainer.step}, loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}, "
              f"checkpoint in {trainer.ckpt_dir}", flush=True)
    return 0


def _run_trainer(cfg, resume: str):
    from mimo_train.console_log import tee_console
    from mimo_train.trainer import Trainer

    with tee_console(cfg.run.dir, int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))):
        trainer = Trainer(cfg, resume=resume)
        try:
            return trainer, trainer.fit()
        finally:
            trainer.close()


_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _peer_failed(error: BaseException) -> bool:
    """A collective that failed because another rank died (gloo/NCCL report the closed connection)."""
    return any(marker in str(error) for marker in _PEER_FAILURE)


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
    path = src if (src / ckpt.META).is_file() else ckpt.find_verified(src, set_aside=False)
    if path is None:
        raise ckpt.CheckpointError(f"{src}: no checkpoint that verifies")
    config_file = next((p for p in (path.parent / "config.yaml", path.parent.parent / "config.yaml") if p.is_file()), None)
    if config_file is None:
        raise ckpt.CheckpointError(f"{src}: no config.yaml beside the checkpoint")
    cfg = load_config(config_file)
    model = MiMoForCausalLM(cfg.model)
    state = {"model": model.state_dict()}
    ckpt.load_checkpoint(path, state)
    model.load_state_dict(state["model"])
    hf.save_hf(model, args.hf_dir)
    hf.save_tokenizer(_tokenizer_file(cfg), args.hf_dir, cfg.model.max_position_embeddings)
    hf.make_readable(args.hf_dir)
    print(f"exported {path} -> {args.hf_dir} (weights, config, tokenizer)")
    return 0


def _tokenizer_file(cfg) -> str:
    """The tokenizer the run's data was tokenized with (the builtin one is cached, trained if missing)."""
    if cfg.data.tokenizer != "builtin":
        return cfg.data.tokenizer
    from data_pipeline.builtin_corpus import ensure_builtin_tokenizer

    return ensure_builtin_tokenizer(cfg.data.resolved_cache_dir(), cfg.data.vocab_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimo-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pre-train (one process, N local processes, or one Slurm task per GPU)",
                       description="Pre-train under the config's layout. The config, every stage's layout and batch "
                                   "rules are checked against the process count before any process starts. "
                                   "SIGTERM, SIGUSR1 and Ctrl-C checkpoint at the next step boundary and exit 0 (a "
                                   "second Ctrl-C exits at once).")
    p.add_argument("--config", required=True, help="a training YAML (configs/train/*.yaml)")
    p.add_argument("--resume", default="auto",
                   help="auto (the newest checkpoint that verifies; default), none (a new run: refused if run.dir "
                        "holds one, see --overwrite), or a checkpoint directory")
    p.add_argument("--overwrite", action="store_true",
                   help="with --resume none: move an existing run in run.dir aside (to <run.dir>.old-<time>) first")
    p.add_argument("--nproc", type=int, default=1,
                   help="start N local processes (gloo on CPU, NCCL on GPUs); the launcher forwards SIGTERM/SIGINT")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="on CUDA: launch even when the planner estimates that a stage's layout does not fit the GPU")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.steps=10 model.num_layers=12 parallel.tp=2")
    p.set_defaults(func=_train)

    p = sub.add_parser("hf-import", help="Hugging Face directory -> mimo-train checkpoint",
                       description="Read a Hugging Face MiMo-V2-Flash directory (config.json + safetensors) and write "
                                   "a model-only checkpoint (step 0) and its config.yaml.")
    p.add_argument("hf_dir", help="the Hugging Face model directory")
    p.add_argument("ckpt_dir", help="where to write the checkpoint (a checkpoints/ directory)")
    p.set_defaults(func=_hf_import)

    p = sub.add_parser("hf-export", help="mimo-train checkpoint -> Hugging Face directory (released layout)",
                       description="Write a checkpoint's model in the released Hugging Face layout (config.json, "
                                   "safetensors, and the run's tokenizer), readable by transformers.")
    p.add_argument("ckpt_dir", help="a checkpoint directory, or a checkpoints/ directory (its newest that verifies)")
    p.add_argument("hf_dir", help="the output directory")
    p.set_defaults(func=_hf_export)

    from mimo_train.info import add_info_parser

    add_info_parser(sub)
    from data_pipeline.prepare import add_prepare_data_parser

    add_prepare_data_parser(sub)
    from data_pipeline.verify import add_verify_data_parser

    add_verify_data_parser(sub)
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
    from mimo_train.checkpoint import CheckpointError

    from mimo_train.preflight import RelaunchNeeded
    from mimo_train.run_lock import RunLocked
    from data_pipeline.source import UnusableSource, one_line

    try:
        return args.func(args)
    except RelaunchNeeded as e:
        print(str(e), file=sys.stderr)
        return e.exit_status
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 2
    except UnusableSource as e:
        print(f"data error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    except RunLocked as e:
        print(f"mimo-train: {e}", file=sys.stderr)
        return 2
    except BaseException as e:
        from mimo_train.stopping import interrupted_now

        # A second Ctrl-C (the handler said so), whatever it interrupted and however that wrapped it: one line.
        if isinstance(e, KeyboardInterrupt) or interrupted_now():
            print("mimo-train: interrupted; the newest checkpoint is the last one published", file=sys.stderr,
                  flush=True)
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())
