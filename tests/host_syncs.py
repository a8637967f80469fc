"""Counting host syncs: every read of a tensor's value by the host (`.item()`, `bool()`, `float()` go through
aten._local_scalar_dense; `.tolist()` is counted by wrapping it). On a GPU each of these waits for the device.

torch's AdamW keeps its step counters on the host (capturable=False), so the optimizer's own update is excluded."""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostSyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.paused:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs(trainer):
    """Count the host syncs of the code run inside (for example one `trainer.train_step()`)."""
    counter = HostSyncCounter()
    real_tolist, real_step = torch.Tensor.tolist, trainer.optimizer.inner.step

    def tolist(t):
        if not counter.paused:
            counter.count += 1
        counter.paused, was = True, counter.paused
        try:
            return real_tolist(t)
        finally:
            counter.paused = was

    def optimizer_step(*args, **kwargs):
        counter.paused = True
        try:
            return real_step(*args, **kwargs)
        finally:
            counter.paused = False

    torch.Tensor.tolist = tolist
    trainer.optimizer.inner.step = optimizer_step
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist = real_tolist
        trainer.optimizer.inner.step = real_step
