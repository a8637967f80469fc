"""Learning-rate schedule: linear warm-up, an optional constant phase, cosine decay to a floor (warmup-stable-decay)."""

from __future__ import annotations

import math

from mimo_train.config import TrainConfig


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
