"""Kernel backends: the local computation that the model and the parallel wrappers delegate to.

`torch` is the reference backend and runs everywhere (CPU included). `te` runs Transformer Engine kernels on
NVIDIA GPUs. A backend provides:

- `sliding_window_attention(q, k, v, *, window_keys, scale, sink, doc_ids)`
- `causal_attention(q, k, v, *, scale, doc_ids)`
- `causal_attention_at(q, k, v, *, q_start, scale, doc_ids)` (queries that are a chunk of a longer sequence)
- `expert_mlp(x_sorted, tokens_per_expert, gate_up_proj, down_proj)` (the grouped GEMM of the local experts)

Tensors are laid out [batch, seq, heads, head_dim]; `doc_ids` [batch, seq] marks packed documents (attention never
crosses a document boundary), or is None for one document per row.
"""

from __future__ import annotations

from types import ModuleType

_BACKENDS: dict[str, ModuleType] = {}


def get_backend(name: str = "torch") -> ModuleType:
    if name not in _BACKENDS:
        if name == "torch":
            from parallel.kernels import torch_backend as mod
        elif name == "te":
            raise NotImplementedError(
                "parallel.backend=te: the Transformer Engine backend is not implemented yet; use parallel.backend=torch"
            )
        else:
            raise ValueError(f"parallel.backend: unknown kernel backend {name!r} (valid: torch, te)")
        _BACKENDS[name] = mod
    return _BACKENDS[name]
