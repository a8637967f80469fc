"""Reference kernels in plain PyTorch; they run on any device and are what CPU tests and CI use.

Sliding-window attention is computed block by block: the sequence is cut into query blocks of C tokens, and each
block attends only to its own keys and the W keys before it. Memory and compute therefore grow as S x (C + W),
never S x S, which is what makes 32k+ sequences with a 128-token window cheap even without a fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _block_size(window: int, seq_len: int) -> int:
    # A block as wide as the window balances the wasted (masked) half of each score tile against the number of
    # blocks; small windows get a floor so tiny tiles do not dominate.
    return max(16, min(window, seq_len)) if window > 0 else min(64, seq_len)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window_keys: int,
    scale: float,
    sink: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention over the last `window_keys` keys (the query included), with an optional learnable sink.

    q: [B, S, Hq, D], k: [B, S, Hkv, D], v: [B, S, Hkv, Dv], sink: [Hq] or None, doc_ids: [B, S] or None.
    The sink is a per-head logit that joins the softmax denominator only (it has no value vector):
    p_ij = exp(a_ij - m) / (exp(sink - m) + sum_j' exp(a_ij' - m)), m = max(max_j a_ij, sink).
    """
    B, S, Hq, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    G = Hq // Hkv
    W = window_keys - 1  # keys before the query that it may still see
    C = _block_size(W, S)
    nb = -(-S // C)
    Sp = nb * C

    # Pad: W empty keys in front (so block b sees keys [b*C - W, (b+1)*C)), and the tail up to whole blocks.
    qp = F.pad(q, (0, 0, 0, 0, 0, Sp - S))
    kp = F.pad(k, (0, 0, 0, 0, W, Sp - S))
    vp = F.pad(v, (0, 0, 0, 0, W, Sp - S))
    # unfold gives overlapping views [B, nb, Hkv, D, C + W] without copying.
    k_blocks = kp.unfold(1, C + W, C)
    v_blocks = vp.unfold(1, C + W, C)

    q_blocks = qp.view(B, nb, C, Hkv, G, D).permute(0, 1, 3, 4, 2, 5)  # [B, nb, Hkv, G, C, D]
    k_blocks = k_blocks.unsqueeze(3)  # [B, nb, Hkv, 1, D, C+W]
    v_blocks = v_blocks.unsqueeze(3).transpose(-1, -2)  # [B, nb, Hkv, 1, C+W, Dv]
    scores = torch.matmul(q_blocks, k_blocks) * scale  # [B, nb, Hkv, G, C, C+W]

    allowed = _window_mask(B, S, Sp, C, W, nb, doc_ids, q.device)  # [B or 1, nb, 1, 1, C, C+W]
    scores = scores.masked_fill(~allowed, float("-inf"))

    if sink is not None:
        # The whole sink softmax (max, exp, sum, divide) runs in fp32, whatever the activation dtype.
        scores = scores.float()
        sink = sink.float().view(1, 1, Hkv, G, 1, 1)
        m = torch.maximum(scores.amax(dim=-1, keepdim=True), sink).detach()
        e = torch.exp(scores - m)
        probs = e / (e.sum(dim=-1, keepdim=True) + torch.exp(sink - m))
    else:
        probs = torch.softmax(scores, dim=-1)

    out = torch.matmul(probs.to(v.dtype), v_blocks)  # [B, nb, Hkv, G, C, Dv]
    out = out.permute(0, 1, 4, 2, 3, 5).reshape(B, Sp, Hq, Dv)
    return out[:, :S]


def _window_mask(B, S, Sp, C, W, nb, doc_ids, device) -> torch.Tensor:
    """Which (query, key) pairs of each block may attend: causal, inside the window, same document, real key."""
    i = torch.arange(C, device=device).view(C, 1)
    j = torch.arange(C + W, device=device).view(1, C + W)
    band = (j >= i) & (j <= i + W)  # key position b*C - W + j lies within [q - W, q]
    key_pos = torch.arange(nb, device=device).view(nb, 1) * C - W + torch.arange(C + W, device=device).view(1, -1)
    key_real = (key_pos >= 0) & (key_pos < S)  # [nb, C+W]
    allowed = band.view(1, C, C + W) & key_real.view(nb, 1, C + W)  # [nb, C, C+W]
    if doc_ids is None:
        return allowed.view(1, nb, 1, 1, C, C + W)
    docs = F.pad(doc_ids, (W, Sp - S), value=-1)  # [B, W + Sp]
    key_docs = docs.unfold(1, C + W, C)  # [B, nb, C+W]
    query_docs = docs[:, W:].view(B, nb, C)
    same_doc = query_docs.unsqueeze(-1) == key_docs.unsqueeze(-2)  # [B, nb, C, C+W]
    return (allowed.unsqueeze(0) & same_doc).view(B, nb, 1, 1, C, C + W)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Full causal attention (global-attention layers), GQA without materialising repeated K/V."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if doc_ids is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    else:
        S = q.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        mask = causal & (doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2))  # [B, S, S]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def causal_attention_at(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int, scale: float, doc_ids: torch.Tensor | None
) -> torch.Tensor:
    """Causal attention of queries at positions [q_start, q_start + Lq) over keys at positions [0, Sk) (a chunk of
    a longer sequence, under context parallelism). doc_ids [B, Sk] cover the key positions."""
    Lq, Sk = q.shape[1], k.shape[1]
    q_pos = torch.arange(q_start, q_start + Lq, device=q.device).view(Lq, 1)
    mask = q_pos >= torch.arange(Sk, device=q.device).view(1, Sk)
    if doc_ids is not None:
        q_docs = doc_ids[:, q_start:q_start + Lq]
        mask = mask & (q_docs.unsqueeze(-1) == doc_ids.unsqueeze(-2))
        mask = mask.unsqueeze(1)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def expert_mlp(
    x_sorted: torch.Tensor, tokens_per_expert: list[int], gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    """SwiGLU experts over tokens already grouped by expert (a loop stands in for the grouped GEMM on CPU).

    x_sorted: [N, H] rows grouped by expert in order; tokens_per_expert: N split into the local experts;
    gate_up_proj: [E, 2I, H]; down_proj: [E, H, I]. Returns [N, H].
    """
    outputs = []
    for e, chunk in enumerate(torch.split(x_sorted, tokens_per_expert)):
        if chunk.shape[0] == 0:
            continue
        gate, up = F.linear(chunk, gate_up_proj[e]).chunk(2, dim=-1)
        outputs.append(F.linear(F.silu(gate) * up, down_proj[e]))
    if not outputs:  # no token was routed to any local expert
        # Stay in the autograd graph even so: under expert parallelism the backward of the return all-to-all
        # must run on every rank, including one that received nothing.
        return x_sorted.new_zeros(0, down_proj.shape[1]) + 0 * x_sorted.sum()
    return torch.cat(outputs, dim=0)
