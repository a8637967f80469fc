"""The reference layer spec (`parallel.backend: torch`): plain PyTorch cores that run on any device.

Its cores call `torch_backend`'s functions with the micro-batch's document ids; it is what every other spec is
tested against, and what the model uses when it is built without one. The interface (the methods of `LayerSpec`
and the `Experts` base class) lives here with the model; other specs (`parallel.kernels`) subclass it and are
handed to the model by whoever builds it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mimo_train.model.kernels import torch_backend
from mimo_train.model.kernels.metadata import AttentionMetadata

SLIDING, GLOBAL = "sliding_attention", "full_attention"


class Experts(nn.Module):
    """The routed experts' SwiGLU weights as stacked 3-D tensors, ready for a grouped GEMM. The layer spec gives a
    subclass whose forward runs them (a loop in the reference, a grouped GEMM in `fused`)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor | list[int]) -> torch.Tensor:
        """x_sorted [N, H]: rows grouped by expert in order; tokens_per_expert [E]: how many rows each expert has
        (a device tensor, or a host list where it is already known, under expert parallelism). Returns [N, H]."""
        raise NotImplementedError


class SlidingWindowCore:
    """Causal attention over the last `window_keys` keys with a learnable sink (reference)."""

    def __init__(self, window_keys: int, scale: float) -> None:
        self.window_keys, self.scale = window_keys, scale

    def __call__(self, q, k, v, attn_meta: AttentionMetadata, sink=None):
        return torch_backend.sliding_window_attention(q, k, v, window_keys=self.window_keys, scale=self.scale,
                                                      sink=sink, doc_ids=attn_meta.doc_ids)


class GlobalCore:
    """Causal attention over the whole sequence within documents (reference; an S x S mask with documents)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, q, k, v, attn_meta: AttentionMetadata, sink=None):
        return torch_backend.causal_attention(q, k, v, scale=self.scale, doc_ids=attn_meta.doc_ids)

    def at(self, q, k, v, attn_meta: AttentionMetadata, *, q_start: int, sink=None):
        """Queries at positions [q_start, q_start + Lq) over keys [0, Sk) (a chunk of a longer sequence);
        attn_meta covers the key positions."""
        return torch_backend.causal_attention_at(q, k, v, q_start=q_start, scale=self.scale,
                                                 doc_ids=attn_meta.doc_ids)


class ReferenceExperts(Experts):
    """SwiGLU experts one after another (the reference). The loop needs the group sizes on the host: one
    device-to-host read per MoE layer and micro-batch (under expert parallelism they are already there)."""

    def forward(self, x_sorted, tokens_per_expert):
        sizes = tokens_per_expert.tolist() if isinstance(tokens_per_expert, torch.Tensor) else tokens_per_expert
        return torch_backend.expert_mlp(x_sorted, sizes, self.gate_up_proj, self.down_proj)


class LayerSpec:
    """The reference spec; `fused` subclasses it and replaces the pieces it has kernels for."""

    name = "torch"

    def attention_core(self, layer_type: str, *, window_keys: int, scale: float):
        return SlidingWindowCore(window_keys, scale) if layer_type == SLIDING else GlobalCore(scale)

    def attention_parameters(self, layer_type: str, num_heads: int) -> dict[str, nn.Parameter | None]:
        # The sink: one logit per head in the softmax denominator of every query of its head (SWA layers only).
        return {"sinks": nn.Parameter(torch.zeros(num_heads)) if layer_type == SLIDING else None}

    def experts(self, num_experts: int, hidden_size: int, intermediate_size: int) -> Experts:
        return ReferenceExperts(num_experts, hidden_size, intermediate_size)

    def metadata(self, doc_ids, batch: int, seq_len: int, device, max_documents: int | None = None):
        return AttentionMetadata(doc_ids, batch, seq_len, device, max_documents)
