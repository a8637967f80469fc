"""Counting host syncs: every read of a tensor's value by the host (`.item()`, `bool()`, `float()` go through
aten._local_scalar_dense; `.tolist()` is counted by wrapping it). On a GPU each of these waits for the device.

Excluded, because they read host tensors on any device (a CPU run cannot tell host from device tensors, so they
are paused explicitly): torch's AdamW step counters (capturable=False) and the metrics' expert-load summary, which
gets a host copy of the counts made by the step's single read."""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mimo_train.training.trainer as trainer_module


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

    def paused(fn):
        def call(*args, **kwargs):
            counter.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                counter.paused = False
        return call

    real_summary = trainer_module.expert_load_summary
    torch.Tensor.tolist = tolist
    trainer.optimizer.inner.step = paused(real_step)
    trainer_module.expert_load_summary = paused(real_summary)
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist = real_tolist
        trainer.optimizer.inner.step = real_step
        trainer_module.expert_load_summary = real_summary


def sync_budget(trainer, micro_batches: int) -> int:
    """What a step may cost: one read of expert split sizes per MoE layer and micro-batch where the experts need
    them on the host (the all-to-all splits under EP; the torch backend's expert loop), and the step's one read of
    its results. Document boundaries cost nothing: the attention metadata is built on the device."""
    parallel = trainer.cfg.parallel
    host_sized_experts = parallel.ep > 1 or parallel.backend == "torch"
    return (len(trainer.model.moe_layers()) * micro_batches if host_sized_experts else 0) + 1
