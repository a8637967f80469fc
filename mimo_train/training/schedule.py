"""Learning-rate schedules.

- `learning_rate(step, train)`: the single-stage schedule of a run without `train.stages`, in optimizer steps:
  linear warm-up, an optional constant phase, cosine decay to a floor (warmup-stable-decay).
- `stage_learning_rate(tokens, stage_tokens, lr)`: one stage of a staged run, in tokens since the stage started
  (the MiMo recipe, spec section 2.3: warm-up 50B, constant 12T, cosine 10T in stage 1; cosine in stages 2 and 3).
"""

from __future__ import annotations

import math

from mimo_train.config import LRScheduleConfig, TrainConfig


def learning_rate(step: int, t: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    return warmup_stable_decay(step, step + 1, t.steps, warmup=t.warmup_steps, constant=t.constant_steps,
                               decay=t.decay_steps, start=0.0, peak=t.lr, final=t.min_lr)


def stage_learning_rate(tokens: int, stage_tokens: int, lr: LRScheduleConfig) -> float:
    """The learning rate of a step that ends `tokens` tokens into a stage of `stage_tokens` tokens (so the first
    step of a warm-up already has a nonzero rate, as in the step-based schedule)."""
    return warmup_stable_decay(tokens, tokens, stage_tokens, warmup=lr.warmup_tokens, constant=lr.constant_tokens,
                               decay=lr.decay_tokens, start=lr.warmup_start, peak=lr.peak, final=lr.final)


def warmup_stable_decay(at: float, warmed: float, total: float, *, warmup: float, constant: float, decay: float,
                        start: float, peak: float, final: float | None) -> float:
    """The one schedule, in any unit (steps or tokens): linear from `start` to `peak` over `warmup` (`warmed` of
    it done, while `at` < warmup), `peak` for `constant`, then cosine to `final` over `decay` (0: the rest of
    `total`); `final=None` holds the peak after the warm-up."""
    if at < warmup:
        return start + (peak - start) * warmed / warmup
    at -= warmup
    if final is None or at < constant:
        return peak
    at -= constant
    decay = decay or max(1, total - warmup - constant)
    progress = min(1.0, at / decay)
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * progress))
