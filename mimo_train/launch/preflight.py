"""Checks made before any rank starts (`mimo-train train`, `mimo-train submit`): the whole config against the number
of processes, the run directory against the --resume mode, on a resume the config against the checkpoint's, and on
CUDA every stage's memory against the GPU's.

Each failure is a `ConfigError` (or `CheckpointError`) with one line naming the field, the rule and the way on;
the command line prints it and exits 2, so a bad launch costs no process start and prints nothing twice.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from mimo_train.training import checkpoint as ckpt
from mimo_train.config import Config, ConfigError
from mimo_train.precision import precision
from mimo_train.training.evaluation import check_eval_config
from mimo_train.training.stages import StagePlan


class RelaunchNeeded(ConfigError):
    """The run continues in a stage whose layout needs another process count (exit status 3, as at a boundary)."""

    exit_status = 3


def check_layouts(cfg: Config, world_size: int, start_stage: int = 0, where: str = "",
                  batches: bool = True) -> StagePlan:
    """Every stage's layout and (with `batches`) batch rules, resolved against `world_size` (dp: auto); the stage
    the run starts in must fit `world_size` itself (a later stage may ask for a relaunch with another count)."""
    from parallel.topology import validate_layout

    plan = StagePlan(cfg, world_size, check_batches=batches)
    for s in plan.stages:
        name = f"train.stages[{s.index}] ({s.name}): " if plan.staged else ""
        try:
            validate_layout(s.parallel, cfg.model, s.parallel.world_size, s.seq_len)
            check_eval_config(cfg, s)
            if batches:
                check_pipeline_micro_batches(s)
        except ConfigError as e:
            raise ConfigError(f"{name}{e}") from None
    from parallel.kernels import te_rules

    te_rules.check_layouts(cfg.model, [s.parallel for s in plan.stages])  # parallel.backend=te
    first = plan.stages[min(start_stage, len(plan.stages) - 1)]
    if first.index > 0 and first.parallel.world_size != world_size:
        n = first.parallel.world_size
        procs = f"{n} process" + ("es" if n != 1 else "")
        raise RelaunchNeeded(f"the checkpoint to resume is in stage {first.name!r}, which runs under the layout "
                             f"{first.layout_str()}, which needs {procs}, and this run has {world_size}. Relaunch "
                             f"with {procs} (`mimo-train train --nproc {n} ...`, or {n} Slurm tasks)")
    if first.parallel.world_size != world_size:
        p = first.parallel
        stage = f" of stage {first.name!r}" if plan.staged else ""
        raise ConfigError(f"parallel{stage}: tp x pp x dp x cp = {p.tp}x{p.pp}x{p.dp}x{p.cp} = {p.world_size} must "
                          f"equal the world size {world_size}{where} (leave parallel.dp at 'auto' to derive "
                          f"it from the process count)")
    return plan


def check_machine(cfg: Config) -> None:
    """What the machine a run starts on must have for the config (parallel.backend=te: a GPU, TE, cuDNN, and
    blockwise FP8 with train.precision=fp8)."""
    from parallel.device import resolve_device
    from parallel.kernels import te, te_rules

    parallels = [s.parallel for s in StagePlan(cfg, None, check_batches=False).stages]
    if te_rules.uses_te(parallels):  # (the device is resolved only then: other runs meet its errors later)
        te_rules.check_machine(parallels, resolve_device(cfg.train.device).type, te.probe_te,
                               fp8=precision(cfg.train.precision).fp8_gemms, fp8_probe=te.probe_blockwise_fp8)


def check_memory_on_cuda(cfg: Config, world_size: int) -> None:
    """Training on CUDA: every stage's layout must fit this machine's GPU by the planner's estimate
    (`mimo_train.planning.plan_check`), else a one-line ConfigError (exit 2) naming the stage, rank, need and budget. On the
    CPU there is nothing to check (the host's memory is not the planner's model)."""
    from parallel.device import resolve_device

    if resolve_device(cfg.train.device).type != "cuda":
        return
    from mimo_train.planning.plan_check import check_memory, local_gpu

    check_memory(cfg, world_size, local_gpu())


def check_pipeline_micro_batches(stage) -> None:
    """A pipeline schedule needs at least one micro-batch per stage in every step (torch's schedules refuse
    fewer), including the smallest batch of a ramp-up."""
    p = stage.parallel
    if p.pp <= 1:
        return
    smallest = stage.rampup[0] if stage.rampup is not None else stage.global_batch_size
    micro = smallest // (stage.micro_batch_size * p.dp)
    if micro < p.pp:
        raise ConfigError(f"train.global_batch_size: pipeline parallelism (parallel.pp={p.pp}) needs at least {p.pp} "
                          f"micro-batches per step, and a batch of {smallest} in micro-batches of "
                          f"{stage.micro_batch_size} over parallel.dp={p.dp} gives {micro}; raise the global batch "
                          f"to {p.pp * stage.micro_batch_size * p.dp} or lower train.micro_batch_size")


def check_data(cfg: Config) -> None:
    """The data section against the files it names (manifests, tokenizer identity, vocabulary), before any rank
    starts; the ranks check again (cheap), for launches that do not pass through here."""
    from data_pipeline.checks import DataConfigError, check_data_sources

    try:
        check_data_sources(cfg.data, cfg.model.vocab_size, cfg.run.dir)
    except DataConfigError as error:
        raise ConfigError(str(error)) from None


def starting_stage(cfg: Config, resume: str) -> int:
    """The stage a launch starts in: the one recorded in the checkpoint it will resume from (sizes checked only:
    the ranks verify the checksums), else the first."""
    if resume == "none":
        return 0
    path = ckpt.find_latest(Path(cfg.run.dir) / "checkpoints") if resume == "auto" else Path(resume)
    if path is None or not ckpt.is_complete(path):
        return 0
    return int(ckpt.read_meta(path)["trainer"].get("stage", 0))


def check_resume_path(resume: str) -> None:
    if resume in ("auto", "none"):
        return
    path = Path(resume)
    if not path.is_dir():
        raise ckpt.CheckpointError(f"--resume {resume}: no such checkpoint directory (use a step_XXXXXXXX directory "
                                   f"under <run.dir>/checkpoints, 'auto' or 'none')")
    problem = ckpt.structure_problem(path)
    if problem is not None:
        raise ckpt.CheckpointError(f"--resume {resume}: not a complete checkpoint ({problem})")


def has_run(run_dir: Path) -> bool:
    """A directory that holds a run: checkpoints or metrics (a bare config.yaml does not count)."""
    return (run_dir / "metrics.jsonl").is_file() or bool(ckpt.list_checkpoints(run_dir / "checkpoints"))


def prepare_run_dir(cfg: Config, resume: str, overwrite: bool) -> Path | None:
    """`--resume none` into a directory that holds a run is refused (it would mix two runs' metrics and
    checkpoints), unless `overwrite`, which moves the old run aside (never deletes it). Returns where it went."""
    run_dir = Path(cfg.run.dir)
    if resume != "none" or not run_dir.exists() or not has_run(run_dir):
        return None
    if not overwrite:
        raise ConfigError(f"run.dir {run_dir}: holds a run already (checkpoints or metrics.jsonl) and --resume none "
                          f"would start another on top of it; choose a new run.dir, or add --overwrite to move the "
                          f"old run aside first (nothing is deleted), or resume it with --resume auto")
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    shutil.move(str(run_dir), str(aside))
    print(f"--overwrite: moved the old run {run_dir} aside to {aside}", flush=True)
    return aside
