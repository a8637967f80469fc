"""Regional `torch.compile` (`train.compile: true`): each decoder layer is compiled on its own, as torchtitan does,
applied from outside after sharding and recompute (the MTP blocks, the embedding and the head stay eager).

Layers of one type have the same code and shapes, so the compiler traces each type once and reuses the graph;
compiling layer by layer keeps compile time flat in depth and keeps parameter names unchanged (`nn.Module.compile`
compiles the module's call in place, with no `_orig_mod` wrapper). Data-dependent parts (the experts' token
counts) break the graph there and run eagerly.
"""

from __future__ import annotations

import torch.nn as nn

from mimo_train.model.transformer import DecoderLayer


def compile_layers(model: nn.Module, *, backend: str = "inductor") -> int:
    """Compile every decoder layer of `model` in place; returns how many were compiled."""
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
