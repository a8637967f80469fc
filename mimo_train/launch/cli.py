"""The `mimo-train` command line: train, info, plan, submit, prepare-data, verify-data, hf-import, hf-export,
hf-verify."""

from __future__ import annotations

import argparse
import os
import shutil
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
    from mimo_train.launch import preflight

    if args.nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1 (got {args.nproc})")
    # Everything that can be checked without a process group is checked here, before any rank starts.
    cfg = load_config(args.config, args.overrides)
    preflight.check_resume_path(args.resume)
    from mimo_train.interop.init_from import check_before_launch

    check_before_launch(cfg, args.resume)
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
    from mimo_train.training.run_lock import HELD_ENV

    lock = _lock_run_dir(cfg, args.resume, args.overwrite)
    try:
        if launcher:
            from mimo_train.launch.launcher import launch_local

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
    from mimo_train.launch import preflight
    from mimo_train.training.run_lock import RunLock

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
    from mimo_train.interop.init_from import load_initial_weights
    from mimo_train.training.console_log import tee_console
    from mimo_train.training.trainer import Trainer

    with tee_console(cfg.run.dir, int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))):
        trainer = Trainer(cfg, resume=resume, initial_weights=load_initial_weights)
        try:
            return trainer, trainer.fit()
        finally:
            trainer.close()


_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _peer_failed(error: BaseException) -> bool:
    """A collective that failed because another rank died (gloo/NCCL report the closed connection)."""
    return any(marker in str(error) for marker in _PEER_FAILURE)


def _conversion_ranks(args, argv: list[str], staging) -> tuple[int, int, bool] | int:
    """(rank, world, whether this command joined the process group) of this process in a conversion; or, in the
    process that starts `--nproc N` local ranks, their exit status (a failed launch leaves no partial output:
    `staging` is removed)."""
    if args.nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1 (got {args.nproc})")
    world = _world_size_from_environment(args.nproc)
    if args.nproc > 1 and "RANK" not in os.environ:
        from mimo_train.launch.launcher import launch_local

        status = launch_local(args.nproc, argv)
        if status != 0:
            staging()
        return status
    if world == 1:
        return 0, 1, False
    import torch.distributed as dist

    from parallel.topology import init_distributed

    joined = not dist.is_initialized()
    return (*init_distributed(timeout_s=args.timeout, device="cpu"), joined)


def _hf_import(args) -> int:
    """HF directory (bf16/fp32, or the release's FP8 blocks) -> our checkpoint (model only, step 0), streamed."""
    from mimo_train.training import checkpoint as ckpt
    from mimo_train.interop import hf_stream

    out = Path(args.ckpt_dir).resolve()
    hf_stream.HubReader(args.hf_dir)  # config and quantization_config checked before any rank starts
    if ckpt.list_checkpoints(out):
        raise ckpt.CheckpointError(f"{out}: already holds checkpoints; import into a new directory")
    ranks = _conversion_ranks(args, ["hf-import", args.hf_dir, str(out), "--dtype", args.dtype],
                              lambda: shutil.rmtree(out / f"{ckpt.checkpoint_name(0)}.tmp", ignore_errors=True))
    if isinstance(ranks, int):
        return ranks
    rank, world, joined = ranks
    try:
        path = hf_stream.import_hf(args.hf_dir, out, args.dtype, rank, world)
    except BaseException:
        if world == 1:
            shutil.rmtree(out / f"{ckpt.checkpoint_name(0)}.tmp", ignore_errors=True)
        raise
    _leave_group(joined)
    if rank == 0:
        print(f"imported {args.hf_dir} -> {path} ({args.dtype}, {world} process{'es' if world > 1 else ''})")
    return 0


def _checkpoint_and_config(src: Path):
    """The checkpoint to export (a step directory, or a checkpoints/ directory's newest complete one; its checksums
    are verified by the converting ranks, see `_verify_shared`) and the config.yaml of the run that wrote it, with
    the run directory it belongs to."""
    from mimo_train.training import checkpoint as ckpt

    path = src if (src / ckpt.META).is_file() else ckpt.find_latest(src)
    if path is None:
        raise ckpt.CheckpointError(f"{src}: no complete checkpoint")
    if not ckpt.is_complete(path):
        raise ckpt.CheckpointError(f"{path}: checkpoint is incomplete (its files do not match its meta.json)")
    config_file = next((p for p in (path.parent / "config.yaml", path.parent.parent / "config.yaml") if p.is_file()), None)
    if config_file is None:
        raise ckpt.CheckpointError(f"{src}: no config.yaml beside the checkpoint")
    return path, load_config(config_file), config_file.parent


def _hf_export(args) -> int:
    from mimo_train.interop import hf, hf_stream

    src, out = Path(args.ckpt_dir).resolve(), Path(args.hf_dir).resolve()
    path, cfg, run_dir = _checkpoint_and_config(src)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"hf_dir: {out} exists and is not empty; export into a new directory")
    hf.to_hf_config(cfg.model)  # a model transformers cannot represent fails here, before any work
    if args.shard_mb < 1:
        raise ConfigError(f"--shard-mb: must be >= 1 (got {args.shard_mb})")
    ranks = _conversion_ranks(args, ["hf-export", str(src), str(out), "--dtype", args.dtype,
                                     "--shard-mb", str(args.shard_mb)],
                              lambda: hf_stream.discard_staging(out))
    if isinstance(ranks, int):
        return ranks
    rank, world, joined = ranks
    _verify_shared(path, rank, world)
    try:
        written = _export_shards(path, cfg, out, args.dtype, rank, world, args.shard_mb << 20)
        if rank == 0:
            hf_stream.write_index_and_config(out, cfg.model, args.dtype, written)
            tokenizer = _tokenizer_file(cfg, run_dir)
            if tokenizer is not None:
                hf.save_tokenizer(tokenizer, hf_stream.staging_dir(out), cfg.model.max_position_embeddings)
            hf.make_readable(hf_stream.staging_dir(out))
            hf_stream.publish_export(out)
            print(f"exported {path} -> {out} ({args.dtype}; weights, config"
                  f"{', tokenizer' if tokenizer else ''}; {len(written)} files)")
    except BaseException:
        if world == 1:
            hf_stream.discard_staging(out)
        raise
    _leave_group(joined)
    return 0


def _leave_group(joined: bool) -> None:
    """Every rank done: leave the process group this command joined, together (a rank that exits with it alive
    can abort in gloo's threads)."""
    import torch.distributed as dist

    if joined:
        dist.barrier()
        dist.destroy_process_group()


def _verify_shared(path: Path, rank: int, world: int) -> None:
    """Every file's checksum checked before the export reads it, each rank a share of the files (so N ranks read
    the checkpoint once between them); every rank raises the first problem any rank found."""
    from mimo_train.training import checkpoint as ckpt

    problem = ckpt.verify(path, (rank, world))
    if world > 1:
        import torch.distributed as dist

        problems = [None] * world
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p is not None), None)
    if problem is not None:
        raise ckpt.CheckpointError(f"{path}: checkpoint is incomplete or corrupt ({problem})")


def _export_shards(path, cfg, out: Path, dtype: str, rank: int, world: int, max_shard_bytes: int) -> dict:
    """Every rank writes its shards into the staging directory; rank 0 gets every rank's file records."""
    import torch.distributed as dist

    from mimo_train.interop import hf_stream

    if rank == 0:
        hf_stream.discard_staging(out)
        hf_stream.staging_dir(out).mkdir(parents=True)
    if world > 1:
        dist.barrier()
    mine = hf_stream.export_checkpoint(path, cfg.model, out, dtype, rank, world, max_shard_bytes)
    if world == 1:
        return mine
    every = [None] * world
    dist.all_gather_object(every, mine)
    return {f: w for part in every for f, w in part.items()}


def _hf_verify(args) -> int:
    from mimo_train.interop import hf_stream

    problems = hf_stream.verify_export(args.hf_dir)
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print(f"{args.hf_dir}: every file has the size and checksum recorded at export")
    return 1 if problems else 0


def _tokenizer_file(cfg, run_dir: Path) -> str | None:
    """The tokenizer the run's data was tokenized with; the builtin one is found in the run's cache (a relative
    data.cache_dir lives under the run directory that holds config.yaml, wherever the command runs). None when
    the run never made one (a checkpoint imported from Hugging Face)."""
    if cfg.data.tokenizer != "builtin":
        return cfg.data.tokenizer
    from data_pipeline.builtin_corpus import ensure_builtin_tokenizer

    cache = cfg.data.resolved_cache_dir(str(run_dir))
    if not (Path(cache) / "tokenizers").is_dir():
        return None
    return ensure_builtin_tokenizer(cache, cfg.data.vocab_size)


def _conversion_options(p) -> None:
    p.add_argument("--nproc", type=int, default=1,
                   help="split the tensors over N local processes (gloo); under torchrun or Slurm the job's ranks "
                        "share the work; the output does not depend on N")
    p.add_argument("--timeout", type=int, default=600, help="process-group timeout in seconds")


def _add_train_parser(sub) -> None:
    """`train`: its options and the dotted overrides."""
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


def _add_conversion_parsers(sub) -> None:
    """hf-import, hf-export and hf-verify."""
    p = sub.add_parser("hf-import", help="Hugging Face directory -> mimo-train checkpoint",
                       description="Read a Hugging Face MiMo-V2-Flash directory (config.json + safetensors: bf16, fp32 "
                                   "or the release's FP8 E4M3 with 128x128-block weight_scale_inv, dequantised) tensor "
                                   "by tensor and write a model-only, layout-free checkpoint (step 0) and its "
                                   "config.yaml; `train.init_from` starts a run from it under any layout.")
    p.add_argument("hf_dir", help="the Hugging Face model directory")
    p.add_argument("ckpt_dir", help="where to write the checkpoint (a new checkpoints/ directory)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="precision of the stored weights (fp32: FP8 blocks dequantised exactly; default)")
    _conversion_options(p)
    p.set_defaults(func=_hf_import)

    p = sub.add_parser("hf-export", help="mimo-train checkpoint -> Hugging Face directory (released layout)",
                       description="Write a checkpoint's model (saved under any layout) in the released Hugging Face "
                                   "layout (config.json, safetensors with checksums in the index, and the run's "
                                   "tokenizer), shard by shard; written beside the output and renamed into place.")
    p.add_argument("ckpt_dir", help="a checkpoint directory, or a checkpoints/ directory (its newest that verifies)")
    p.add_argument("hf_dir", help="the output directory (new, or empty)")
    p.add_argument("--dtype", choices=["bf16", "fp8", "fp32"], default="bf16",
                   help="bf16 (default); fp8: the release's format (E4M3 values, fp32 scale per 128x128 block, the "
                        "same tensors quantised, quantization_config); fp32: exact")
    p.add_argument("--shard-mb", type=int, default=5120, help="largest output file in MiB (default 5120)")
    _conversion_options(p)
    p.set_defaults(func=_hf_export)

    p = sub.add_parser("hf-verify", help="check an exported directory's files against the checksums in its index",
                       description="Read every file an hf-export wrote and compare its size and checksum with those "
                                   "recorded in model.safetensors.index.json; exit 1 naming each file that differs.")
    p.add_argument("hf_dir", help="a directory written by hf-export")
    p.set_defaults(func=_hf_verify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimo-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    _add_train_parser(sub)
    _add_conversion_parsers(sub)
    from mimo_train.model.info import add_info_parser

    add_info_parser(sub)
    from data_pipeline.prepare import add_prepare_data_parser

    add_prepare_data_parser(sub)
    from data_pipeline.verify import add_verify_data_parser

    add_verify_data_parser(sub)
    from mimo_train.launch.slurm import add_submit_parser

    add_submit_parser(sub)
    from mimo_train.planning.plan_cli import add_plan_parser

    add_plan_parser(sub)
    from mimo_train.planning.simulate import add_simulate_parser

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
    from mimo_train.training.checkpoint import CheckpointError
    from mimo_train.interop.fp8_release import Fp8FormatError
    from mimo_train.interop.hf_stream import ConversionError

    from mimo_train.launch.preflight import RelaunchNeeded
    from mimo_train.training.run_lock import RunLocked
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
    except (ConversionError, Fp8FormatError) as e:
        print(f"conversion error: {e}", file=sys.stderr)
        return 2
    except UnusableSource as e:
        print(f"data error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    except RunLocked as e:
        print(f"mimo-train: {e}", file=sys.stderr)
        return 2
    except BaseException as e:
        from mimo_train.training.stopping import interrupted_now

        # A second Ctrl-C (the handler said so), whatever it interrupted and however that wrapped it: one line.
        if isinstance(e, KeyboardInterrupt) or interrupted_now():
            print("mimo-train: interrupted; the newest checkpoint is the last one published", file=sys.stderr,
                  flush=True)
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())
