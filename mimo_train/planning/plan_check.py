"""Does a training config fit its GPUs? `mimo-train plan --config TRAIN.yaml --gpu G --check`, and the memory
check `mimo-train train` and `mimo-train submit` make before anything launches on CUDA.

Every stage of the config is estimated under its own layout (tp, pp, dp, cp, ep, schedule, recompute and kernel
backend of `parallel:` with the stage's overrides), its sequence length, global batch and micro-batch size, the
model of the config with its own MTP blocks, and `train.precision`; the worst rank is the maximum over every
pipeline rank (`estimator.estimate`). A stage fits when that rank's need is within the GPU's memory less the reserve.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mimo_train.config import Config, ConfigError
from mimo_train.hardware import GPUS, Hardware
from mimo_train.planning.estimator import Estimate, plan
from mimo_train.planning.geometry import GB, Assumptions, Layout, kernel_of

# The terms of a rank's memory, in the order `plan` prints them.
MEMORY_TERMS = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer state",
                "activations": "activations in flight", "head_and_mtp": "head and MTP", "transient": "backward working"}


@dataclass
class StageCheck:
    name: str
    seq: int
    layout: Layout
    estimate: Estimate
    usable: float  # bytes: the GPU's memory less the reserve
    hardware: Hardware
    rank_per_stage: int  # global ranks per pipeline rank (dp x cp x tp)

    @property
    def fits(self) -> bool:
        return self.estimate.memory["total"] <= self.usable

    def worst_rank(self) -> str:
        r = int(self.estimate.memory["pp_rank"])
        n = self.rank_per_stage
        return f"pipeline rank {r} (ranks {r * n}-{(r + 1) * n - 1})"

    def largest_terms(self, k: int = 3) -> str:
        mem = self.estimate.memory
        top = sorted(MEMORY_TERMS, key=lambda t: -mem[t])[:k]
        return ", ".join(f"{MEMORY_TERMS[t]} {mem[t] / GB:.1f}" for t in top)

    def verdict(self) -> str:
        """One line: the stage, its worst rank, the need against the budget."""
        need, hw = self.estimate.memory["total"], self.hardware
        word = "fits in" if self.fits else "does not fit:"
        return (f"stage {self.name!r} (seq {self.seq:,}, {self.layout.describe()}, {self.layout.recompute} "
                f"recompute): {self.worst_rank()} needs {need / GB:.1f} GB, {word} the {self.usable / GB:.1f} GB "
                f"usable per {hw.name.upper()} ({hw.memory_gb:.0f} GB less {hw.memory_gb - self.usable / GB:.0f} GB "
                f"reserve)")


def check_config(cfg: Config, hw: Hardware, world_size: int | None = None,
                 assumptions: Assumptions | None = None) -> list[StageCheck]:
    """Each stage of `cfg` estimated under its own layout on GPUs `hw` (see the module docstring)."""
    from mimo_train.training.stages import StagePlan

    base = assumptions or Assumptions()
    precision = cfg.train.precision
    auto = cfg.parallel.dp == "auto" or any(st.parallel.get("dp") == "auto" for st in cfg.train.stages)
    if world_size is None and auto:
        raise ConfigError("parallel.dp is 'auto': give the number of GPUs (--gpus N) to resolve it")
    checks = []
    for s in StagePlan(cfg, world_size, check_batches=False).stages:
        p = s.parallel
        A = replace(base, kernel=kernel_of(p.backend), micro_batch_size=s.micro_batch_size)
        L = Layout.of(p)
        e = plan(cfg.model, p.world_size, hw.name, s.seq_len, s.global_batch_size, precision, A, hw,
                 layouts=[L])["results"][0]
        usable = (hw.memory_gb - A.reserve_gb) * GB
        checks.append(StageCheck(s.name, s.seq_len, L, e, usable, hw, p.dp * p.cp * p.tp))
    return checks


def format_check(checks: list[StageCheck]) -> str:
    lines = []
    for c in checks:
        lines.append(("ok   " if c.fits else "OVER ") + c.verdict())
        lines.append(f"     largest terms (GB): {c.largest_terms()}")
    return "\n".join(lines)


def first_failure(checks: list[StageCheck]) -> StageCheck | None:
    return next((c for c in checks if not c.fits), None)


# ---- before a launch ---------------------------------------------------------------------------------------------


def local_gpu() -> Hardware:
    """This machine's GPU as the planner's table knows it (matched by name), else its own memory size."""
    import torch

    props = torch.cuda.get_device_properties(0)
    name = props.name.lower()
    for key in sorted(GPUS, key=len, reverse=True):
        if key in name:
            return GPUS[key]
    return Hardware(props.name, props.total_memory / GB, 0.0, 0.0, 0.0)


def gpu_type(name: str) -> Hardware:
    if name not in GPUS:
        raise ConfigError(f"--gpu-type {name!r}: must be one of {', '.join(sorted(GPUS))}")
    return GPUS[name]


SKIP_FLAG = "--skip-memory-check"


def check_memory(cfg: Config, world_size: int, hw: Hardware) -> None:
    """Refuse a launch whose layout does not fit the GPUs in some stage: a ConfigError of one line naming the
    stage, the rank, the need and the budget (the command line exits 2 with it)."""
    bad = first_failure(check_config(cfg, hw, world_size))
    if bad is not None:
        raise ConfigError(f"memory: {bad.verdict()} by the planner's estimate (`mimo-train plan --config ... --gpu "
                          f"{hw.name} --check` for the terms; choose a layout with `mimo-train plan`, or pass "
                          f"{SKIP_FLAG} to launch anyway)")
