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
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    step -= t.warmup_steps
    if step < t.constant_steps:
        return t.lr
    step -= t.constant_steps
    decay = t.decay_steps or max(1, t.steps - t.warmup_steps - t.constant_steps)
    progress = min(1.0, step / decay)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def stage_learning_rate(tokens: int, stage_tokens: int, lr: LRScheduleConfig) -> float:
    """The learning rate of a step that ends `tokens` tokens into a stage of `stage_tokens` tokens (so the first
    step of a warm-up already has a nonzero rate, as in the step-based schedule)."""
    if tokens < lr.warmup_tokens:
        return lr.warmup_start + (lr.peak - lr.warmup_start) * tokens / lr.warmup_tokens
    tokens -= lr.warmup_tokens
    if lr.final is None or tokens < lr.constant_tokens:
        return lr.peak
    tokens -= lr.constant_tokens
    decay = lr.decay_tokens or max(1, stage_tokens - lr.warmup_tokens - lr.constant_tokens)
    progress = min(1.0, tokens / decay)
    return lr.final + 0.5 * (lr.peak - lr.final) * (1 + math.cos(math.pi * progress))
