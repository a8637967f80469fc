"""flex_attention candidates: a sliding-window (or causal) + document `BlockMask`, and attention through it.

The mask is a `mask_mod` over (row, head, query index, key index): causal, inside the window when there is one,
same document; queries may be a chunk [q_start, q_start + Lq) of the keys' sequence (context parallelism).
`create_block_mask` evaluates it on the device, block by block, without a host sync; the block mask is built once
per micro-batch and cached on the `AttentionMetadata`.

On a GPU flex runs compiled (Triton) and its log-sum-exp is differentiable, so the sink folds in with plain
autograd (`lse2 = logaddexp(lse, s)`, `out * exp(lse - lse2)`). On a CPU flex runs eager and forward only (torch
2.13: "FlexAttention does not support backward on CPU"): the CPU tests check its forward.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from mimo_train.model.kernels.metadata import AttentionMetadata

BLOCK = 128
_compiled = None


def document_mask_mod(doc_ids: torch.Tensor | None, *, window_keys: int | None, q_start: int = 0):
    """mask_mod(b, h, q, kv): key kv may be seen by query q (at position q_start + q)."""
    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + q_start
        allowed = q_pos >= kv_idx
        if window_keys is not None:
            allowed = allowed & (q_pos - kv_idx < window_keys)
        if doc_ids is not None:
            allowed = allowed & (doc_ids[b, q_pos] == doc_ids[b, kv_idx])
        return allowed
    return mask_mod


def document_block_mask(meta: AttentionMetadata, *, q_len: int, window_keys: int | None = None,
                        q_start: int = 0, block: int = BLOCK):
    """The BlockMask of queries [q_start, q_start + q_len) over the metadata's S keys (cached per micro-batch)."""
    def build():
        B = meta.batch if meta.doc_ids is not None else None
        return create_block_mask(document_mask_mod(meta.doc_ids, window_keys=window_keys, q_start=q_start),
                                 B, None, q_len, meta.seq_len, device=meta.device, BLOCK_SIZE=block)
    return meta.cached(("flex", q_len, window_keys, q_start, block), build)


def _flex():
    """Compiled flex on CUDA (eager flex on a GPU is a dense reference); eager elsewhere."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def flex_sink_attention(q, k, v, meta: AttentionMetadata, *, scale: float, sink=None,
                        window_keys: int | None = None, q_start: int = 0):
    """q [B, Lq, Hq, D], k [B, Sk, Hkv, D], v [B, Sk, Hkv, Dv] -> [B, Lq, Hq, Dv] (V 128 with QK 192 is allowed)."""
    block_mask = document_block_mask(meta, q_len=q.shape[1], window_keys=window_keys, q_start=q_start)
    fn = _flex() if q.is_cuda else flex_attention
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if sink is None:
        out = fn(qt, kt, vt, block_mask=block_mask, scale=scale, enable_gqa=True)
    else:
        out, aux = fn(qt, kt, vt, block_mask=block_mask, scale=scale, enable_gqa=True,
                      return_aux=AuxRequest(lse=True))
        lse = aux.lse.float()  # [B, Hq, Lq], natural log
        lse2 = torch.logaddexp(lse, sink.float().view(1, -1, 1))
        out = (out.float() * torch.exp(lse - lse2).unsqueeze(-1)).to(q.dtype)
    return out.transpose(1, 2)
