"""The building blocks of MiMo-V2-Flash: RMSNorm, partial rotary embeddings, attention, dense and MoE FFNs.

Parameter names follow the Hugging Face implementation (`transformers.models.mimo_v2_flash`) so that a state dict
maps one to one. The attention cores and the expert GEMMs come from a layer spec (the interface and the reference
in `mimo_train.model.kernels.spec`; the one `parallel.backend` chooses is handed in by whoever builds the model): the model asks it for them by layer type and stays the same whatever kernels run.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimo_train.config import ModelConfig
from mimo_train.model.kernels.spec import Experts, LayerSpec  # Experts: the spec's expert module type


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE over the first `rotary_dim` of the head dims, with its own base per layer type."""

    def __init__(self, rotary_dim: int, bases: dict[str, float]) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        for layer_type, base in bases.items():
            self.register_buffer(f"{layer_type}_inv_freq", self.inverse_frequencies(base), persistent=False)

    def inverse_frequencies(self, base: float) -> torch.Tensor:
        d = self.rotary_dim
        return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float) / d))

    def set_base(self, layer_type: str, base: float) -> None:
        """Change a layer type's RoPE base (the GA base moves from 640k to 5M at the 256k stage)."""
        buf = getattr(self, f"{layer_type}_inv_freq")
        buf.copy_(self.inverse_frequencies(base).to(buf.device))

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, layer_type: str, dtype: torch.dtype):
        inv_freq = getattr(self, f"{layer_type}_inv_freq")
        freqs = position_ids[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, D]; cos/sin: [B, S, rotary_dim]. Only the first rotary_dim dims are rotated."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class Attention(nn.Module):
    """GQA attention with QK head dim 192, V head dim 128, partial RoPE, value scale, and (SWA only) a sink."""

    def __init__(self, cfg: ModelConfig, sliding: bool, apply_value_scale: bool = True, spec=None):
        super().__init__()
        spec = spec or LayerSpec()
        self.sliding = sliding
        self.layer_type = "sliding_attention" if sliding else "full_attention"
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.swa_num_key_value_heads if sliding else cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.v_head_dim = cfg.v_head_dim
        self.scale = cfg.head_dim**-0.5
        self.window_keys = cfg.window_keys
        self.v_scale = cfg.attention_value_scale if apply_value_scale else 1.0
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * cfg.v_head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * cfg.v_head_dim, cfg.hidden_size, bias=False)
        # The spec's parameters of this core (SWA: `sinks`, one logit per head that joins the softmax denominator
        # of every query of its head; None on global layers).
        for name, param in spec.attention_parameters(self.layer_type, self.num_heads).items():
            self.register_parameter(name, param)
        self.core = spec.attention_core(self.layer_type, window_keys=self.window_keys, scale=self.scale)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_meta):
        """attn_meta: the micro-batch's AttentionMetadata (document boundaries), built once in prepare()."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # Shapes come from the projections: under sequence parallelism x holds a slice of the sequence and the
        # projections gather it, and under tensor parallelism they return this rank's heads only.
        B, S = q.shape[:2]
        q = q.view(B, S, -1, self.head_dim)
        k = k.view(B, S, -1, self.head_dim)
        v = v.view(B, S, -1, self.v_head_dim) * self.v_scale
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.core(q, k, v, attn_meta, sink=self.sinks)
        return self.o_proj(out.reshape(B, S, -1))


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TopKRouter(nn.Module):
    """Sigmoid router in fp32. The correction bias steers which experts are chosen but not how they are weighted;
    it is a buffer updated by the trainer from expert loads (aux-loss-free balancing), never by gradients."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.num_experts = cfg.num_experts
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        self.min_margin: torch.Tensor | None = None  # smallest routing margin since the trainer last read it

    def forward(self, x: torch.Tensor):
        """x: [T, H]. Returns (scores [T, E] fp32, top-k weights [T, k] fp32, top-k expert indices [T, k])."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        with torch.no_grad():
            biased = scores + self.e_score_correction_bias
            if self.n_group > 1:  # group-limited routing (DeepSeek-V3); MiMo uses one group
                grouped = biased.view(-1, self.n_group, self.num_experts // self.n_group)
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
                keep = torch.zeros_like(group_scores).scatter_(
                    1, group_scores.topk(self.topk_group, dim=-1).indices, 1.0
                )
                keep = keep.bool().unsqueeze(-1).expand_as(grouped).reshape(-1, self.num_experts)
                biased = biased.masked_fill(~keep, float("-inf"))
            if self.top_k < self.num_experts:
                # One more than needed: the gap between the k-th and (k+1)-th biased score is the routing margin.
                # Parallel layouts compute scores with other rounding (~1e-7); a smaller margin can flip a choice.
                top = biased.topk(self.top_k + 1, dim=-1)
                indices = top.indices[:, : self.top_k]
                margin = (top.values[:, self.top_k - 1] - top.values[:, self.top_k]).min()
                self.min_margin = torch.minimum(self.min_margin, margin) if self.min_margin is not None else margin
            else:
                indices = biased.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, weights * self.routed_scaling_factor, indices


class MoE(nn.Module):
    """Top-k routed experts without shared experts. Also computes the sequence-wise balance loss and counts the
    tokens each expert received (for the bias update and for logging)."""

    def __init__(self, cfg: ModelConfig, spec=None) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.gate = TopKRouter(cfg)
        self.experts = (spec or LayerSpec()).experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)

    def forward(self, x: torch.Tensor):
        """x: [B, S, H] -> (y [B, S, H], seq_aux_loss_sum (scalar, summed over the B sequences), tokens_per_expert [E])."""
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        scores, weights, indices = self.gate(flat)

        # Dispatch: group the (token, slot) pairs by expert, run each expert on its rows, scatter back weighted.
        flat_experts = indices.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_of_row = order // self.top_k
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        y_sorted = self.compute_experts(flat[token_of_row], counts)
        y_sorted = y_sorted * weights.reshape(-1)[order].unsqueeze(-1).to(y_sorted.dtype)
        y = torch.zeros_like(flat).index_add_(0, token_of_row, y_sorted.to(flat.dtype))

        aux = self.balance_loss(scores.view(B, S, -1), indices.view(B, S, -1))
        return y.view(B, S, H), aux, counts.detach()

    def compute_experts(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Rows grouped by expert -> expert outputs in the same order (expert parallelism overrides this)."""
        return self.experts(rows, tokens_per_expert)

    def balance_loss(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return balance_loss(*balance_statistics(scores, indices), self.top_k)


def balance_statistics(scores: torch.Tensor, indices: torch.Tensor):
    """Per-sequence sums for the balance loss over the tokens present: (selections [B, E] without gradient,
    normalised-score sums [B, E], token count). Sums, so sequence shards on several ranks can be added up."""
    B, T, E = scores.shape
    normalised = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    with torch.no_grad():
        selected = torch.zeros(B, T, E, device=scores.device).scatter_(2, indices, 1.0).sum(dim=1)
    return selected, normalised.sum(dim=1), T


def balance_loss(selected: torch.Tensor, score_sums: torch.Tensor, tokens: int, top_k: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, summed over sequences (not yet scaled by alpha).

    For each sequence of T tokens: f_i = E / (k T) * #{t : expert i in top-k(t)}, P_i = mean_t s'_{t,i} with s'
    the sigmoid scores normalised over experts; the loss is sum_i f_i P_i. Returned summed over the batch so the
    trainer can divide by the global number of sequences.
    """
    E = selected.shape[-1]
    f = selected * (E / (top_k * tokens))
    p = score_sums / tokens
    return (f * p).sum()


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, top_k: int) -> torch.Tensor:
    """The balance loss of whole sequences held by one rank (scores [B, T, E], indices [B, T, k])."""
    return balance_loss(*balance_statistics(scores, indices), top_k)
