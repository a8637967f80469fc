"""Fused attention kernels with the learnable sink folded into their log-sum-exp (exact forward and backward).

A sink s (one logit per head, no value) changes only the softmax normaliser. A fused kernel returns its output
`out` and log-sum-exp `lse` over the real keys; then, exactly,

    forward:  lse2 = logaddexp(lse, s),  out2 = out * exp(lse - lse2)
    backward: the kernel's own backward with (out2, lse2) in place of (out, lse), and
              dsink = -sum over queries of exp(s - lse2) * rowsum(dout * out2).

`SinkFoldedAttention` does this around any `kernel` with `forward(q, k, v) -> (out, lse, saved)` and
`backward(dout, q, k, v, out, lse, saved) -> (dq, dk, dv)`; `kernel.lse_rows(lse)` gives the lse shaped like
out[..., 0] and `kernel.lse_native(rows)` takes it back. Without a sink (global layers) it is the kernel itself.

Kernels:
- `CpuFlashKernel`: `aten._scaled_dot_product_flash_attention_for_cpu` (+ backward) with an additive mask;
  `blocked_sliding_window` feeds it query blocks of C tokens against their own C + W keys, so the mask is
  [blocks, C, C + W], never S x S. Its global use (`cpu_global_attention`) builds an S x S mask: proof only.
- `FlashVarlenKernel` (GPU, unmeasured): `aten._flash_attention_forward/backward` over the packed documents of
  the micro-batch (cu_seqlens), with a window for SWA; the kernel needs equal head dims, so V is padded to 192.
- `EfficientVarlenKernel` (GPU, unmeasured): `aten._efficient_attention_forward/backward`, V 128 directly; its lse
  is [documents, heads, max_seqlen]: only with a tight document bound (AttentionMetadata.max_documents).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mimo_train.model.kernels.metadata import AttentionMetadata


class SinkFoldedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, kernel):
        out, lse, saved = kernel.forward(q, k, v)
        if sink is not None:
            rows = kernel.lse_rows(lse)  # [..., heads] like out[..., 0], fp32
            s = sink.float().view(kernel.sink_shape(rows))
            lse2_rows = torch.logaddexp(rows, s)
            out = (out.float() * torch.exp(rows - lse2_rows).unsqueeze(-1)).to(out.dtype)
            lse = kernel.lse_native(lse2_rows, lse)
        ctx.kernel, ctx.saved, ctx.has_sink = kernel, saved, sink is not None
        ctx.save_for_backward(q, k, v, out, lse, sink if sink is not None else q.new_zeros(0))
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sink = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = ctx.kernel.backward(dout, q, k, v, out, lse, ctx.saved)
        dsink = None
        if ctx.has_sink:
            rows = ctx.kernel.lse_rows(lse)  # lse2, shaped like out[..., 0]
            p_sink = torch.exp(sink.float().view(ctx.kernel.sink_shape(rows)) - rows)
            per_row = -(p_sink * (dout.float() * out.float()).sum(-1))
            head_axis = per_row.dim() + ctx.kernel.head_axis
            dsink = per_row.sum(dim=[d for d in range(per_row.dim()) if d != head_axis]).to(sink.dtype)
        return dq, dk, dv, dsink, None


# ---- CPU: torch's flash kernel for CPU --------------------------------------------------------------------------
class CpuFlashKernel:
    """q [N, Hq, L, D], k/v [N, Hkv, Lk, D] (V padded to D: the CPU flash kernel wants equal head dims); `mask`
    additive, broadcastable to [N, 1, L, Lk]. lse [N, Hq, L]."""

    head_axis = -2  # lse rows [N, Hq, L]

    def __init__(self, mask: torch.Tensor, scale: float) -> None:
        self.mask, self.scale = mask, scale

    def forward(self, q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(
            q, k, v, 0.0, False, attn_mask=self.mask, scale=self.scale)
        return out, lse, ()

    def backward(self, dout, q, k, v, out, lse, saved):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
            dout, q, k, v, out, lse, 0.0, False, attn_mask=self.mask, scale=self.scale)

    # lse [N, H, L] is already shaped like out[..., 0]
    @staticmethod
    def lse_rows(lse):
        return lse.float()

    @staticmethod
    def lse_native(rows, lse):
        return rows.to(lse.dtype).contiguous()

    @staticmethod
    def sink_shape(rows):
        return (1, -1, 1)



def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """The CPU flash kernel's mask: additive, of the query dtype (it rejects bool masks)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def _pad_v(v: torch.Tensor, d: int) -> torch.Tensor:
    return F.pad(v, (0, d - v.shape[-1])) if v.shape[-1] < d else v


def sliding_window_block_mask(meta: AttentionMetadata, window_keys: int, block: int) -> torch.Tensor:
    """Which (query, key) pairs of each query block may attend, [B, nb, C, C + W] bool: causal, inside the window,
    same document, a real key. Query rows of the padding past S may attend their own (padding) key only, so no row
    is empty (an empty row has lse -inf). Built once per micro-batch (cached on the metadata)."""
    def build():
        B, S, dev = meta.batch, meta.seq_len, meta.device
        W, C = window_keys - 1, block
        nb = -(-S // C)
        i = torch.arange(C, device=dev).view(C, 1)
        j = torch.arange(C + W, device=dev).view(1, C + W)
        band = (j >= i) & (j <= i + W)  # key b*C - W + j lies within [q - W, q]
        key_pos = torch.arange(nb, device=dev).view(nb, 1, 1) * C - W + j  # [nb, 1, C+W]
        query_pos = torch.arange(nb, device=dev).view(nb, 1, 1) * C + i  # [nb, C, 1]
        allowed = band & (key_pos >= 0) & (key_pos < S)  # [nb, C, C+W]
        if meta.doc_ids is not None:
            docs = F.pad(meta.doc_ids, (W, nb * C - S), value=-1)  # [B, W + nb*C]
            key_docs = docs.unfold(1, C + W, C)  # [B, nb, C+W]
            query_docs = docs[:, W:].view(B, nb, C)
            allowed = allowed & (query_docs.unsqueeze(-1) == key_docs.unsqueeze(-2))
        padding_row = (query_pos >= S) & (j == i + W)
        return (allowed | padding_row).expand(B, nb, C, C + W)
    return meta.cached(("swa_blocks", window_keys, block), build)


def window_block_size(window_keys: int, seq_len: int) -> int:
    # as the reference: a block as wide as the window, at least 16
    W = window_keys - 1
    return max(16, min(W, seq_len)) if W > 0 else min(64, seq_len)


def blocked_sliding_window(q, k, v, meta: AttentionMetadata, *, window_keys: int, scale: float, sink):
    """SWA + sink through the CPU flash kernel, query block by query block. q [B, S, Hq, D], k [B, S, Hkv, D],
    v [B, S, Hkv, Dv] -> [B, S, Hq, Dv]. The block views (pad, unfold) are ordinary autograd ops outside the
    fused Function, so overlapping key blocks sum their gradients."""
    B, S, Hq, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    W = window_keys - 1
    C = window_block_size(window_keys, S)
    nb = -(-S // C)
    Sp = nb * C
    qb = F.pad(q, (0, 0, 0, 0, 0, Sp - S)).view(B, nb, C, Hq, D).permute(0, 1, 3, 2, 4).reshape(B * nb, Hq, C, D)

    def key_blocks(t):  # [B, W + Sp, Hkv, D] -> [B * nb, Hkv, C + W, D]
        blocks = F.pad(t, (0, 0, 0, 0, W, Sp - S)).unfold(1, C + W, C)  # [B, nb, Hkv, D, C+W]
        return blocks.permute(0, 1, 2, 4, 3).reshape(B * nb, Hkv, C + W, t.shape[-1])

    kb, vb = key_blocks(k), key_blocks(_pad_v(v, D))
    mask = meta.cached(("swa_additive", window_keys, C, q.dtype), lambda: _additive(
        sliding_window_block_mask(meta, window_keys, C), q.dtype).reshape(B * nb, 1, C, C + W))
    out = SinkFoldedAttention.apply(qb.contiguous(), kb.contiguous(), vb.contiguous(), sink,
                                    CpuFlashKernel(mask, scale))
    out = out.view(B, nb, Hq, C, D).permute(0, 1, 3, 2, 4).reshape(B, Sp, Hq, D)
    return out[:, :S, :, :Dv]


def global_mask(meta: AttentionMetadata, q_start: int, q_len: int) -> torch.Tensor:
    """[B or 1, 1, q_len, Sk] bool: causal (queries at [q_start, q_start + q_len) of keys [0, Sk)) and same
    document. Dense: the CPU proof path only."""
    def build():
        Sk, dev = meta.seq_len, meta.device
        q_pos = torch.arange(q_start, q_start + q_len, device=dev).view(q_len, 1)
        allowed = (q_pos >= torch.arange(Sk, device=dev).view(1, Sk)).unsqueeze(0)
        if meta.doc_ids is not None:
            docs = meta.doc_ids
            allowed = allowed & (docs[:, q_start:q_start + q_len].unsqueeze(-1) == docs.unsqueeze(-2))
        return allowed.unsqueeze(1)
    return meta.cached(("global_dense", q_start, q_len), build)


def cpu_global_attention(q, k, v, meta: AttentionMetadata, *, scale: float, q_start: int = 0):
    """Causal + documents through the CPU flash kernel (an additive [Lq, Sk] mask: for proof, not for speed)."""
    D, Dv = q.shape[-1], v.shape[-1]
    mask = meta.cached(("global_additive", q_start, q.shape[1], q.dtype),
                       lambda: _additive(global_mask(meta, q_start, q.shape[1]), q.dtype))
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, _pad_v(v, D)))
    out = SinkFoldedAttention.apply(qt, kt, vt, None, CpuFlashKernel(mask, scale))
    return out.transpose(1, 2)[..., :Dv]


# ---- GPU: flash (varlen, window) and efficient (varlen) kernels; written for Hopper, not measured ----------------
class FlashVarlenKernel:
    """q [T, Hq, D], k/v [T, Hkv, D] (documents packed end to end; V padded to D); lse [Hq, T]."""

    head_axis = -1  # lse rows [T, Hq]

    def __init__(self, cu_q, cu_k, max_q: int, max_k: int, scale: float, is_causal: bool,
                 window_left: int | None) -> None:
        self.cu_q, self.cu_k, self.max_q, self.max_k = cu_q, cu_k, max_q, max_k
        self.scale, self.is_causal, self.window_left = scale, is_causal, window_left

    def _window(self):
        return ({"window_size_left": self.window_left, "window_size_right": 0}
                if self.window_left is not None else {})

    def forward(self, q, k, v):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward.default(
            q, k, v, self.cu_q, self.cu_k, self.max_q, self.max_k, 0.0, self.is_causal, False,
            scale=self.scale, **self._window())
        return out, lse, (rng_state, unused)

    def backward(self, dout, q, k, v, out, lse, saved):
        rng_state, unused = saved
        dq, dk, dv = torch.ops.aten._flash_attention_backward.default(
            dout, q, k, v, out, lse, self.cu_q, self.cu_k, self.max_q, self.max_k, 0.0, self.is_causal,
            rng_state, unused, scale=self.scale, **self._window())
        return dq, dk, dv

    @staticmethod
    def lse_rows(lse):  # [Hq, T] -> [T, Hq]
        return lse.float().t()

    @staticmethod
    def lse_native(rows, lse):
        return rows.t().contiguous().to(lse.dtype)

    @staticmethod
    def sink_shape(rows):
        return (1, -1)


def flash_varlen_attention(q, k, v, meta: AttentionMetadata, *, scale: float, sink=None,
                           window_keys: int | None = None, q_start: int = 0):
    """[B, Lq, Hq, D] queries (positions [q_start, q_start + Lq)) over [B, Sk, Hkv, *] keys, documents as packed
    sequences (cu_seqlens from the metadata: static size, no host sync; max_seqlen bounded by Sk). Flash aligns
    causal masks bottom-right, so a query chunk that ends at Sk (context parallelism) pairs with its keys."""
    B, Lq, Hq, D = q.shape
    Sk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    kernel = FlashVarlenKernel(meta.cu_seqlens(q_start), meta.cu_seqlens(0), Lq, Sk, scale, True,
                               window_keys - 1 if window_keys is not None else None)
    out = SinkFoldedAttention.apply(q.reshape(B * Lq, Hq, D), k.reshape(B * Sk, Hkv, D),
                                    _pad_v(v, D).reshape(B * Sk, Hkv, D), sink, kernel)
    return out.view(B, Lq, Hq, D)[..., :Dv]


class EfficientVarlenKernel:
    """q [1, T, Hq, D], k/v [1, T, H, *] with GQA expanded (the kernel has no GQA); no sink (global layers)."""

    head_axis = -1

    def __init__(self, cu_q, cu_k, max_q: int, max_k: int, scale: float, mask_type: int) -> None:
        self.cu_q, self.cu_k, self.max_q, self.max_k = cu_q, cu_k, max_q, max_k
        self.scale, self.mask_type = scale, mask_type

    def forward(self, q, k, v):
        out, lse, seed, offset, _, _ = torch.ops.aten._efficient_attention_forward.default(
            q, k, v, None, self.cu_q, self.cu_k, self.max_q, self.max_k, 0.0, self.mask_type, True,
            scale=self.scale)
        return out, lse, (seed, offset)

    def backward(self, dout, q, k, v, out, lse, saved):
        seed, offset = saved
        dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward.default(
            dout, q, k, v, None, out, self.cu_q, self.cu_k, self.max_q, self.max_k, lse, 0.0, seed, offset,
            self.mask_type, False, scale=self.scale)
        return dq, dk, dv


def efficient_varlen_attention(q, k, v, meta: AttentionMetadata, *, scale: float, q_start: int = 0):
    """Global causal + documents through the efficient kernel (V 128 directly). custom_mask_type 2 is causal
    aligned bottom-right, which pairs each document's queries (the chunk's) with its keys. GQA is expanded."""
    B, Lq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kernel = EfficientVarlenKernel(meta.cu_seqlens(q_start), meta.cu_seqlens(0), Lq, Sk, scale, 2)
    k_all = k.repeat_interleave(G, dim=2).reshape(1, B * Sk, Hq, D)
    v_all = v.repeat_interleave(G, dim=2).reshape(1, B * Sk, Hq, v.shape[-1])
    out = SinkFoldedAttention.apply(q.reshape(1, B * Lq, Hq, D), k_all, v_all, None, kernel)
    return out.view(B, Lq, Hq, -1)
