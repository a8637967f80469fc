"""The staged schedule of a run (spec section 2): which stage a step is in, its learning rate, batch size, loss
weights, RoPE base, data mixture and parallel layout.

Stages switch at token counts: the step that starts with `tokens >= stage.end_tokens` runs in the next stage.
Within a stage, the learning rate is a function of the tokens since the stage started, and the batch-size ramp-up
(megatron-core's `RampupBatchsizeNumMicroBatchesCalculator`) a function of the samples since the stage started, so
both continue exactly after a resume under any layout. A run without `train.stages` is one stage built from the
`train:` section, with the step-based learning rate of `schedule.learning_rate` (configs written before stages
existed behave as before).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

from mimo_train.config import Config, ConfigError, Layout, LRScheduleConfig, ParallelConfig
from mimo_train.training.schedule import learning_rate, stage_learning_rate


@dataclass
class Stage:
    index: int
    name: str
    end_tokens: float  # math.inf for the single stage of an unstaged run
    seq_len: int
    global_batch_size: int
    micro_batch_size: int
    rampup: tuple[int, int, int] | None  # (start, increment, samples)
    lr: LRScheduleConfig | None  # None: the step-based schedule of an unstaged run
    mtp_loss_weight: float
    expert_bias_update_rate: float
    aux_loss_coeff: float
    rope_theta: float
    data_weights: dict[str, float] = field(default_factory=dict)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def layout_key(self) -> str:
        return repr(sorted(dataclasses.asdict(self.parallel).items()))

    def layout_str(self) -> str:
        p = self.parallel
        return " ".join(f"{k}={getattr(p, k)}" for k in Layout.DEGREES)


@dataclass
class StageStart:
    """Where the current stage actually started (a boundary is crossed at a step boundary, so a stage may start
    a little after the previous stage's end_tokens)."""
    index: int = 0
    step: int = 0
    tokens: int = 0
    samples: int = 0


class BatchSchedule:
    """Global batch size of a step from the samples consumed since the stage started, split over `dp` ranks."""

    def __init__(self, stage: Stage, dp: int):
        self.stage, self.dp = stage, dp

    def global_batch_size(self, samples_in_stage: int) -> int:
        gbs = rampup_batch_size(self.stage, samples_in_stage)
        if self.stage.rampup is not None and gbs % (self.stage.micro_batch_size * self.dp):  # StagePlan rules it out
            raise RuntimeError(f"global batch {gbs} does not split into micro-batches of "
                               f"{self.stage.micro_batch_size} over {self.dp} data-parallel ranks")
        return gbs


def rampup_batch_size(stage: Stage, samples_in_stage: int) -> int:
    """The ramp-up rule, megatron-core's (its RampupBatchsizeNumMicroBatchesCalculator; tests/test_stages.py
    compares the two): from `start`, `increment` more sequences after each equal share of the ramp's samples."""
    if stage.rampup is None:
        return stage.global_batch_size
    start, increment, samples = stage.rampup
    if samples_in_stage > samples:
        return stage.global_batch_size
    per_increment = samples / ((stage.global_batch_size - start) // increment)
    return start + int(samples_in_stage / per_increment) * increment


class StagePlan:
    """The stages of a run, each with its layout resolved against `world_size` (`parallel.dp: auto` = world size /
    (tp x pp x cp); without a world size, auto means 1) and its batch rules checked."""

    def __init__(self, cfg: Config, world_size: int | None = None, check_batches: bool = True):
        self.cfg = cfg
        t = cfg.train
        self.staged = bool(t.stages)
        base_theta = cfg.model.rope_theta
        if not self.staged:
            self.stages = [Stage(0, "main", math.inf, t.seq_len, t.global_batch_size, t.micro_batch_size, None, None,
                                 t.mtp_loss_weight, t.expert_bias_update_rate, t.aux_loss_coeff, base_theta,
                                 {}, cfg.parallel.resolve_dp(world_size))]
            if check_batches:
                self.check_batches()
            return
        self.stages = []
        for i, s in enumerate(t.stages):
            seq_len = s.seq_len or t.seq_len
            parallel = copy.deepcopy(cfg.parallel)
            for k, v in s.parallel.items():
                setattr(parallel, k, v)
            parallel = parallel.resolve_dp(world_size, f"train.stages[{i}].parallel")
            rampup = None
            if s.rampup is not None:
                rampup = (s.rampup.start, s.rampup.increment, max(1, s.rampup.tokens // seq_len))
            self.stages.append(Stage(
                i, s.name, s.end_tokens, seq_len, s.global_batch_size or t.global_batch_size,
                s.micro_batch_size or t.micro_batch_size, rampup,
                s.lr if s.lr is not None else LRScheduleConfig(peak=t.lr, final=None),
                _pick(s.mtp_loss_weight, t.mtp_loss_weight), _pick(s.expert_bias_update_rate, t.expert_bias_update_rate),
                _pick(s.aux_loss_coeff, t.aux_loss_coeff), _pick(s.rope_theta, base_theta), dict(s.data_weights),
                parallel))
        if check_batches:
            self.check_batches()

    def check_batches(self) -> None:
        """Every stage's global batch (and ramp-up) splits into micro-batches over its data-parallel ranks."""
        for s in self.stages:
            dp = s.parallel.dp
            field = f"train.stages[{s.index}].global_batch_size" if self.staged else "train.global_batch_size"
            for gbs in {s.global_batch_size, *([s.rampup[0]] if s.rampup else [])}:
                if gbs % (s.micro_batch_size * dp):
                    raise ConfigError(f"{field}: the global batch {gbs} must be a multiple of micro_batch_size x "
                                      f"parallel.dp = {s.micro_batch_size} x {dp}")
            if s.rampup and s.rampup[1] % (s.micro_batch_size * dp):
                raise ConfigError(f"train.stages[{s.index}].rampup.increment: must be a multiple of micro_batch_size "
                                  f"x parallel.dp = {s.micro_batch_size * dp}")

    # ---- where a step is ------------------------------------------------------------------------------------
    def stage_index(self, tokens: int) -> int:
        """The stage of the step that starts after `tokens` tokens (len(stages) when every stage is done)."""
        for s in self.stages:
            if tokens < s.end_tokens:
                return s.index
        return len(self.stages)

    def done(self, step: int, tokens: int) -> bool:
        return step >= self.cfg.train.steps or self.stage_index(tokens) >= len(self.stages)

    def learning_rate(self, stage: Stage, start: StageStart, step: int, tokens_after_step: int) -> float:
        if stage.lr is None:
            return learning_rate(step, self.cfg.train)
        return stage_learning_rate(tokens_after_step - start.tokens, stage.end_tokens - start.tokens, stage.lr)

    # ---- planning ---------------------------------------------------------------------------------------------
    def planned_steps(self) -> int:
        """Optimizer steps of the whole run (for the ETA): the schedule simulated from step 0."""
        cap = self.cfg.train.steps
        if not self.staged:
            return cap
        step, tokens = 0, 0
        for s in self.stages:
            samples = 0
            while tokens < s.end_tokens and step < cap:
                gbs = rampup_batch_size(s, samples)
                if s.rampup is None or samples > s.rampup[2]:
                    remaining = math.ceil((s.end_tokens - tokens) / (gbs * s.seq_len))
                    n = min(remaining, cap - step)
                    step, tokens, samples = step + n, tokens + n * gbs * s.seq_len, samples + n * gbs
                    break
                step, tokens, samples = step + 1, tokens + gbs * s.seq_len, samples + gbs
        return min(step, cap)

    def describe(self) -> str:
        lines = []
        start = 0
        for s in self.stages:
            end = "end" if math.isinf(s.end_tokens) else f"{s.end_tokens:,}"
            ramp = f" (ramp-up from {s.rampup[0]} over {s.rampup[2]:,} samples)" if s.rampup else ""
            lines.append(f"stage {s.index + 1} {s.name}: tokens {start:,} -> {end}, seq_len {s.seq_len}, "
                         f"batch {s.global_batch_size}{ramp}, mtp weight {s.mtp_loss_weight}, bias rate "
                         f"{s.expert_bias_update_rate}, GA rope {s.rope_theta:g}, layout {s.layout_str()}")
            start = s.end_tokens
        return "\n".join(lines)


def _pick(value, default):
    return default if value is None else value
