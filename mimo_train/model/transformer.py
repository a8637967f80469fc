"""MiMo-V2-Flash: the decoder trunk, the multi-token-prediction (MTP) blocks and the causal-LM head with losses.

The trunk has one layer type per index: global attention (GA) at i == 0 or (i + 1) % 6 == 0, sliding-window
attention (SWA, with a learnable sink and twice the KV heads) elsewhere; layer 0 has a dense SwiGLU FFN and
all others an MoE. The MTP blocks follow DeepSeek-V3: block d sees the hidden state of position i and the
embedding of token i + d and predicts token i + d + 1, sharing the embedding and the LM head with the trunk.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from data_pipeline.labels import IGNORE_INDEX
from mimo_train.config import ModelConfig
from mimo_train.model.layers import Attention, DenseMLP, MoE, RMSNorm, RotaryEmbedding
from mimo_train.model.kernels.metadata import document_ids
from mimo_train.model.kernels.spec import LayerSpec


@dataclass
class ModelOutput:
    logits: torch.Tensor
    hidden_states: torch.Tensor | None = None
    # Loss terms are sums over tokens (or sequences, for aux) so the trainer can normalise by global counts,
    # which keeps gradient accumulation and data parallelism exactly equal to one big batch.
    lm_loss_sum: torch.Tensor | None = None
    lm_tokens: torch.Tensor | None = None
    mtp_loss_sums: list[torch.Tensor] = field(default_factory=list)
    mtp_tokens: list[torch.Tensor] = field(default_factory=list)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # per depth, with return_logits (for evaluation)
    aux_loss_sum: torch.Tensor | None = None  # summed over MoE layers and sequences, before the coefficient
    expert_counts: torch.Tensor | None = None  # [num_moe_layers, E] tokens routed to each expert

    @property
    def loss(self) -> torch.Tensor | None:
        """Mean next-token cross-entropy (convenience for evaluation; training uses the sums)."""
        if self.lm_loss_sum is None:
            return None
        return self.lm_loss_sum / self.lm_tokens.clamp(min=1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, spec) -> None:
        super().__init__()
        self.sliding = not cfg.is_global_layer(layer_idx)
        self.layer_type = "sliding_attention" if self.sliding else "full_attention"
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, self.sliding, spec=spec)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, spec) if self.is_moe else DenseMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, attn_meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_meta)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, aux, counts = self.mlp(h)
            return x + y, aux, counts
        return x + self.mlp(h), None, None


class MTPBlock(nn.Module):
    """One MTP depth: [enorm(emb(x_{i+d})); hnorm(h_i)] -> eh_proj -> an SWA layer with a dense FFN -> final norm."""

    def __init__(self, cfg: ModelConfig, spec) -> None:
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, sliding=True, apply_value_scale=cfg.mtp.apply_value_scale, spec=spec)
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, hidden, token_embeds, cos, sin, attn_meta):
        x = self.eh_proj(torch.cat([self.enorm(token_embeds), self.hnorm(hidden)], dim=-1))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_meta)
        x = x + self.mlp(self.pre_mlp_layernorm(x))
        # The un-normed x feeds the next depth; the normed one feeds the shared LM head.
        return x, self.final_layernorm(x)


class MTP(nn.Module):
    def __init__(self, cfg: ModelConfig, spec) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MTPBlock(cfg, spec) for _ in range(cfg.mtp.num_blocks)])


class MiMoModel(nn.Module):
    """Embedding, decoder layers and final norm (HF name: `model`)."""

    def __init__(self, cfg: ModelConfig, spec) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # Keyed by layer index ("0".."N-1", HF names model.layers.<i>.*): a pipeline stage deletes the layers it does
        # not run, and the others keep their global names.
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, spec) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            cfg.rotary_dim, {"full_attention": cfg.rope_theta, "sliding_attention": cfg.swa_rope_theta}
        )
        self.mtp = MTP(cfg, spec) if cfg.mtp.num_blocks > 0 else None


def _generator(seed: int, *parts) -> torch.Generator:
    key = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


def shift_within_documents(t: torch.Tensor, doc_ids: torch.Tensor, d: int, fill: int) -> torch.Tensor:
    """out[:, i] = t[:, i + d] when position i + d exists and lies in the same document as i, else `fill`."""
    out = torch.full_like(t, fill)
    if d < t.shape[1]:
        same = doc_ids[:, d:] == doc_ids[:, :-d]
        out[:, :-d] = torch.where(same, t[:, d:], torch.full_like(t[:, d:], fill))
    return out


class MiMoForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec | None = None) -> None:
        """spec: the kernels of the attention cores and experts (`parallel.kernels.get_spec(parallel.backend)`);
        the reference when None."""
        super().__init__()
        self.cfg = cfg
        self.spec = spec or LayerSpec()
        self.model = MiMoModel(cfg, self.spec)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.cross_entropy = CrossEntropySum()

    # ---- initialisation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """N(0, init_std) for every weight matrix, embedding, router and sink (spec section 2.3); norms at 1;
        expert correction bias at 0. Each parameter's values depend only on (seed, its name), so a rank that holds
        a slice of a parameter can compute exactly that slice (see parallel/initialize.py)."""
        for name, p in self.named_parameters():
            p.copy_(self.initial_value(name, p.shape, seed).to(p.dtype))
        self.reset_buffers()

    def initial_value(self, name: str, shape, seed: int, experts: range | None = None) -> torch.Tensor:
        """The initial value of parameter `name` of full shape `shape`; for stacked expert weights, optionally only
        the experts in `experts` (each expert has its own random stream, so a rank makes only its own)."""
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        std = self.cfg.init_std
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            ids = experts if experts is not None else range(shape[0])
            return torch.stack([torch.randn(shape[1:], generator=_generator(seed, name, e)) * std for e in ids])
        return torch.randn(shape, generator=_generator(seed, name)) * std

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Buffers to their initial state: rotary tables from the config, expert correction biases at zero."""
        rope = self.model.rotary_emb
        rope.set_base("full_attention", self.cfg.rope_theta)
        rope.set_base("sliding_attention", self.cfg.swa_rope_theta)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()

    def decoder_layers(self) -> list[DecoderLayer]:
        """The decoder layers this model holds, in order."""
        return list(self.model.layers.values())

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.decoder_layers() if layer.is_moe]

    # ---- stage switches ---------------------------------------------------------------------------------------
    def set_global_rope_theta(self, theta: float) -> None:
        self.cfg.rope_theta = theta
        self.model.rotary_emb.set_base("full_attention", theta)

    # ---- loss bookkeeping -------------------------------------------------------------------------------------
    def count_targets(self, labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Tokens that carry a loss: [LM, MTP depth 1, ..., MTP depth K] for this batch. The trainer sums these over
        micro-batches (and ranks) first, so every loss term is a mean over the whole global batch."""
        docs = document_ids(position_ids)
        counts = [(labels != IGNORE_INDEX).sum()]
        for d in range(1, self.cfg.mtp.num_blocks + 1):
            counts.append((shift_within_documents(labels, docs, d, fill=IGNORE_INDEX) != IGNORE_INDEX).sum())
        return torch.stack(counts)

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,
        sequence_layout: "WholeSequence | None" = None,
        max_documents: int | None = None,
    ) -> ModelOutput:
        """input_ids [B, S]; position_ids [B, S] restart at 0 per packed document (default: 0..S-1);
        labels [B, S] are the next tokens (IGNORE_INDEX where no loss is taken). `sequence_layout` says which
        positions this rank computes (default: all; context parallelism passes its chunks); `max_documents`, a
        host-known bound on the documents of a row (the data stream gives one), see `prepare`."""
        batch = self.prepare(input_ids, position_ids, labels, sequence_layout, max_documents)
        x, aux_terms, counts = self.run_layers(self.embed(batch), self.decoder_layers(), batch)
        return self.head(x, batch, aux_terms, counts, return_logits)

    # The forward in pieces, so a pipeline stage can run only its own: prepare -> embed -> run_layers -> head.
    def prepare(self, input_ids, position_ids=None, labels=None, sequence_layout=None,
                max_documents: int | None = None) -> "Batch":
        """sequence_layout: which positions of the sequence this rank computes (context parallelism passes its
        chunk layout; default: all of them). max_documents: a bound on the documents of a row, when the caller
        knows it on the host (the data loader does, before the batch is copied to the device); it only shortens
        the varlen kernels' tables."""
        B, S = input_ids.shape
        # Document boundaries are computed on the device, once per micro-batch, and never read by the host: the
        # attention metadata (cu_seqlens, masks) every layer shares is derived from them on the device too.
        doc_ids = document_ids(position_ids) if position_ids is not None else None
        attn_meta = self.spec.metadata(doc_ids, B, S, input_ids.device, max_documents)
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
        layout = sequence_layout if sequence_layout is not None else WholeSequence()
        local_positions = layout.local(position_ids)
        dtype = next(self.parameters()).dtype  # the dtype of the hidden states the tables multiply
        rope = {t: self.model.rotary_emb(local_positions, t, dtype) for t in ("full_attention", "sliding_attention")}
        return Batch(input_ids, position_ids, labels, doc_ids, rope, attn_meta, layout)

    def embed(self, batch: "Batch") -> torch.Tensor:
        return self.model.embed_tokens(batch.layout.local(batch.input_ids))

    def run_layers(self, x, layers, batch: "Batch"):
        aux_terms, counts = [], []
        for layer in layers:
            x, aux, cnt = layer(x, *batch.rope[layer.layer_type], batch.attn_meta)
            if aux is not None:
                aux_terms.append(aux)
                counts.append(cnt)
        return x, aux_terms, counts

    def head(self, x, batch: "Batch", aux_terms=(), counts=(), return_logits: bool = True) -> ModelOutput:
        """Final norm, LM head and losses, then the MTP blocks."""
        m, local = self.model, batch.layout.local
        trunk_out = x
        hidden = m.norm(x)
        logits = self.lm_head(hidden)
        out = ModelOutput(logits=logits if return_logits else None, hidden_states=hidden)
        out.aux_loss_sum = torch.stack(list(aux_terms)).sum() if aux_terms else hidden.new_zeros(())
        out.expert_counts = torch.stack(list(counts)) if counts else None
        if batch.labels is None:
            return out

        out.lm_loss_sum, out.lm_tokens = self.cross_entropy(logits, local(batch.labels))
        if m.mtp is not None:
            docs = batch.doc_ids if batch.doc_ids is not None else torch.zeros_like(batch.input_ids)
            h = hidden if self.cfg.mtp.hidden_input == "final_norm" else trunk_out
            for d, block in enumerate(m.mtp.layers, start=1):
                # Depth d at position i reads token i + d and predicts token i + d + 1 (= labels[i + d]);
                # nothing crosses the end of a packed document. Shifts use the whole sequence, so they cross
                # context-parallel rank boundaries freely.
                tokens = local(shift_within_documents(batch.input_ids, docs, d, fill=0))
                targets = local(shift_within_documents(batch.labels, docs, d, fill=IGNORE_INDEX))
                h, normed = block(h, m.embed_tokens(tokens), *batch.rope["sliding_attention"], batch.attn_meta)
                mtp_logits = self.lm_head(normed)
                loss_sum, n = self.cross_entropy(mtp_logits, targets)
                if return_logits:
                    out.mtp_logits.append(mtp_logits)
                out.mtp_loss_sums.append(loss_sum)
                out.mtp_tokens.append(n)
        return out


@dataclass
class Batch:
    """A micro-batch as every piece of the forward sees it: token ids, positions, labels and document ids of the
    whole sequence, the rotary tables of this rank's part of it, which part that is (`layout.local`), and the
    attention metadata every layer shares (`mimo_train.model.kernels.metadata.AttentionMetadata`, from the layer spec)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    doc_ids: torch.Tensor | None
    rope: dict
    attn_meta: object
    layout: "WholeSequence"


class WholeSequence:
    """Every position on this rank (the default; context parallelism passes its chunk layout instead)."""

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return t


class CrossEntropySum(nn.Module):
    """The summed cross-entropy (in fp32) of logits against labels, and the number of targets. Tensor parallelism
    replaces this module by its vocab-parallel version, as it replaces the linears."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, (labels != IGNORE_INDEX).sum()
