"""The `fused` layer spec (`parallel.backend: fused`): torch's own fused kernels, on a CPU where torch has them.

| piece | GPU (Hopper; written, not measured) | CPU |
| --- | --- | --- |
| SWA + sink core | flash varlen with a window, sink folded into the lse, V padded to 192 (bf16/fp16; fp32 runs the reference) | CPU flash kernel on query blocks (sink folded) |
| global core | flex_attention with a document BlockMask (provisional: bench/gpu/global_attention measures it against efficient varlen) | CPU flash kernel with a dense mask (proof only) |
| experts | `torch._grouped_mm`, device-side int32 offsets | the same (fp32 / bf16 eager) |

The sink parameter is the reference's (`sinks`, same name and shape), so checkpoints and HF import/export do not
see which spec built the model.
"""

from __future__ import annotations

from mimo_train.model.kernels import torch_backend
from parallel.kernels.choice import global_kernel, sliding_kernel
from parallel.kernels.flex import flex_sink_attention
from parallel.kernels.grouped_experts import GroupedExperts
from mimo_train.model.kernels.metadata import AttentionMetadata
from parallel.kernels.sink_attention import blocked_sliding_window, cpu_global_attention, flash_varlen_attention
from mimo_train.model.kernels.spec import SLIDING, LayerSpec

class FusedSlidingWindowCore:
    def __init__(self, window_keys: int, scale: float) -> None:
        self.window_keys, self.scale = window_keys, scale

    def __call__(self, q, k, v, attn_meta: AttentionMetadata, sink=None):
        kernel = sliding_kernel(q)
        if kernel == "flash_varlen":
            return flash_varlen_attention(q, k, v, attn_meta, scale=self.scale, sink=sink,
                                          window_keys=self.window_keys)
        if kernel == "reference":
            return torch_backend.sliding_window_attention(q, k, v, window_keys=self.window_keys, scale=self.scale,
                                                          sink=sink, doc_ids=attn_meta.doc_ids)
        return blocked_sliding_window(q, k, v, attn_meta, window_keys=self.window_keys, scale=self.scale, sink=sink)


class FusedGlobalCore:
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, q, k, v, attn_meta: AttentionMetadata, sink=None):
        return self.at(q, k, v, attn_meta, q_start=0)

    def at(self, q, k, v, attn_meta: AttentionMetadata, *, q_start: int, sink=None):
        kernel = global_kernel(q)
        if kernel == "flash_varlen":
            return flash_varlen_attention(q, k, v, attn_meta, scale=self.scale, q_start=q_start)
        if kernel == "flex":
            return flex_sink_attention(q, k, v, attn_meta, scale=self.scale, q_start=q_start)
        return cpu_global_attention(q, k, v, attn_meta, scale=self.scale, q_start=q_start)


class FusedSpec(LayerSpec):
    name = "fused"

    def attention_core(self, layer_type: str, *, window_keys: int, scale: float):
        if layer_type == SLIDING:
            return FusedSlidingWindowCore(window_keys, scale)
        return FusedGlobalCore(scale)

    def experts(self, num_experts: int, hidden_size: int, intermediate_size: int) -> GroupedExperts:
        return GroupedExperts(num_experts, hidden_size, intermediate_size)
