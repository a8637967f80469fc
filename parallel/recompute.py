"""Activation recompute (`parallel.recompute`), applied to a built (and sharded) model from outside, with
`torch.utils.checkpoint` in its non-reentrant form:

- `full`: each decoder layer keeps only its input; its forward runs again during its backward (communication
  included: TP gathers, CP halos, EP all-to-alls are repeated, in the same order on every rank).
- `selective`: the attention core (the local kernel: under context parallelism inside the halo exchange and the
  K/V gather, which are not repeated) and the SwiGLU intermediates (the routed experts' local GEMMs, and the dense
  FFNs of layer 0 and the MTP blocks) are recomputed; everything else is saved. This is what the planner's
  `selective` means (mimo_train/planning/memory.py).

Parameters keep their names: only bound methods are replaced, no module is wrapped.
"""

from __future__ import annotations

from functools import wraps

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from mimo_train.config import ParallelConfig
from mimo_train.model.layers import Attention, DenseMLP, MoE
from mimo_train.model.transformer import DecoderLayer
from parallel.context_parallel import ContextParallelAttention

MODES = ParallelConfig.RECOMPUTE


def _recomputed(fn):
    @wraps(fn)
    def call(*args, **kwargs):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return call


class RecomputedCore:
    """An attention core (of any layer spec) whose computation is recomputed in backward."""

    def __init__(self, base):
        self.base = base
        self._call = _recomputed(base.__call__)
        if hasattr(base, "at"):  # a global core's chunk-of-a-longer-sequence entry (context parallelism)
            self.at = _recomputed(base.at)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)


def apply_recompute(model: nn.Module, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"parallel.recompute: must be one of {', '.join(MODES)} (got {mode!r})")
    if mode == "none":
        return
    for module in model.modules():
        if mode == "full" and isinstance(module, DecoderLayer):
            module.forward = _recomputed(module.forward)
        elif mode == "selective":
            if isinstance(module, Attention):
                if isinstance(module.core, ContextParallelAttention):
                    module.core.base = RecomputedCore(module.core.base)
                else:
                    module.core = RecomputedCore(module.core)
            elif isinstance(module, MoE):  # the spec's experts module, whatever its class
                module.experts.forward = _recomputed(module.experts.forward)
            elif isinstance(module, DenseMLP):
                module.forward = _recomputed(module.forward)



