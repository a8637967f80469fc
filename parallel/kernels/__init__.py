"""Layer specs: which kernels run the model's attention cores and experts (`parallel.backend`).

In the spirit of Megatron-Core's `ModuleSpec` / `TESpecProvider`, the model asks a spec for

- `attention_core(layer_type, *, window_keys, scale)`: the core of an attention layer (`sliding_attention` or
  `full_attention`), called `core(q, k, v, attn_meta, sink=...)`; a global core also has `core.at(...)` for
  queries that are a chunk of a longer sequence (context parallelism);
- `attention_parameters(layer_type, num_heads)`: the parameters the core needs, which the attention module
  registers under these names (`sinks`, as in the Hugging Face checkpoints);
- `experts(num_experts, hidden, intermediate)`: the routed experts' module (`gate_up_proj`, `down_proj`);
- `metadata(doc_ids, batch, seq_len, device, max_documents=None)`: the per-micro-batch `AttentionMetadata` every
  layer shares (built in `MiMoForCausalLM.prepare`; `max_documents`, a host-known bound, shortens varlen tables).

Specs: `torch` (the reference, `mimo_train/model/kernels/spec.py`, runs everywhere) and `fused` (torch's fused kernels:
flash / efficient / flex attention with the sink folded into the log-sum-exp, `torch._grouped_mm` experts;
`parallel/kernels/fused.py`); and `te` (Transformer Engine's DotProductAttention, Linear and GroupedLinear
bound to our parameters, `parallel/kernels/te.py`, its TE-free rules in `te_rules.py`). Tensors are laid out
[batch, seq, heads, head_dim].
"""

from __future__ import annotations

from mimo_train.config import KERNEL_BACKENDS
from mimo_train.model.kernels.spec import LayerSpec

_SPECS: dict = {}


def get_spec(name: str = "torch"):
    """The layer spec named by `parallel.backend` (one instance per name; specs hold no state)."""
    if name not in _SPECS:
        if name == "torch":
            spec = LayerSpec()
        elif name == "fused":
            from parallel.kernels.fused import FusedSpec
            spec = FusedSpec()
        elif name == "te":  # Transformer Engine (parallel/kernels/te.py): imports TE only when a layer first runs
            from parallel.kernels.te import TESpec
            spec = TESpec()
        else:
            raise ValueError(f"parallel.backend: unknown kernel backend {name!r} (valid: {', '.join(KERNEL_BACKENDS)})")
        _SPECS[name] = spec
    return _SPECS[name]

