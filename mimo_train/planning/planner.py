"""`mimo-train plan`: enumerate parallel layouts for a GPU count and estimate, for each, the memory per GPU, the
communication per step, the step time and the MFU; rank the layouts that fit.

    mimo-train plan --config configs/model/mimo_v2_flash.yaml --gpus 512 --gpu h100 [--seq 32768] [--json]
    mimo-train plan --config configs/train/mimo_v2_flash_pretrain.yaml --gpu h100 --check   (mimo_train/planning/plan_check.py)
    mimo-train plan --config configs/model/mimo_v2_flash.yaml --readme-table                 (mimo_train/planning/plan_table.py)

The model is analytical, built from the code rather than from rules of thumb:

- **Parameters** come from the real module tree on the meta device (as `mimo-train info` does), each parameter
  sharded by the rule `parallel/parallelize.py` applies to it: q/o projections, sinks, dense FFNs, embedding and
  LM head split over tp (vocab-parallel); k/v split over tp, or one head per rank replicated when tp > KV heads;
  experts split over ep x etp; norms, routers and the MTP eh_proj replicated. Pipeline stages hold the decoder
  layers of `parallel/pipeline.py`'s split (even, first stages take the remainder), the first stage the
  embedding, the last the final norm, LM head, MTP blocks and a copy of the embedding.
- **Precision** (`Precision`): bytes per parameter of the weights, gradients, fp32 master copy and each Adam
  moment, and of saved activations. ZeRO-1 as in `parallel/data_parallel.py`: the master copy and both moments
  are sharded over each parameter's gradient group (dp x cp for tp-sharded weights, tp x dp x cp for replicated
  ones, dp x cp x tp / (ep x etp) for experts); weights and gradients are replicated within it.
  `bf16` (GPU): bf16 weights + fp32 gradients + fp32 master + 2 fp32 moments, bf16 activations.
  `fp32` (our CPU trainer): fp32 weights (they are the master) + fp32 gradients + 2 fp32 moments, fp32 activations.
- **Activations** are the tensors autograd saves in our implementation, per token, layer by layer (see
  `_attention_bytes`, `_moe_bytes`, ...): RMSNorm in plain torch, the projections' inputs (gathered once per q, k,
  v projection under SP) and outputs with the 192/128 head dims; for the `torch` kernel backend the SWA score tiles
  of S x (block + W) per head and, for GA with packed documents, the S x S probabilities of the math SDPA path; for
  the `fused` backend (the GPU assumption: `parallel/kernels/fused.py`) what its flash varlen kernel saves
  (`_flash_core_bytes`: rotated q and k, V padded to the QK head dim, the padded output, the fp32 log-sum-exp),
  measured per layer type by `mimo-train simulate` on the meta device; MoE (the same under both backends): fp32
  router input and scores, the dispatched rows (top-k x tokens x hidden), the expert intermediates and the combined
  rows; the LM head's fp32 log-softmax (vocab-parallel) for the main head and each MTP block; the all-gathered K/V
  of GA layers under CP. Sequence parallelism divides the norm/residual/MoE tokens by tp.
  Recompute (as `parallel/recompute.py` implements it): `selective` recomputes the attention core and the SwiGLU
  intermediates (routed experts and dense FFNs), `full` keeps only each decoder layer's input, and its peak is the
  larger of the loss backward and one recomputed layer's backward. The schedule sets how many micro-batches are in
  flight on a rank: 1F1B pp - r on rank r, interleaved 1F1B Megatron's 2(pp - r - 1) + (v - 1) pp + 1 chunks, ZBV
  pp, DualPipeV pp + 1 (DeepSeek-V3 Table 2). Every pipeline rank is evaluated; the memory of a layout is its worst.
- **Communication** per step of each pipeline rank and CP position class, by kind, as the code sends it
  (`rank_comm`; the busiest rank sets the step time): TP/SP all-gathers and reduce-scatters (our column-parallel
  linears gather their input each: q, k, v and gate, up separately, so 3 + 1 per attention and 2 + 1 per dense FFN forward, the reverse backward;
  the embedding, LM head and MTP blocks on their stages), EP all-to-all (dispatch + combine, forward + backward,
  balanced routing), CP halo exchange (W rows of K/V per chunk boundary that crosses ranks: one on the first and
  the last CP rank, two on the middle ones, `halo_sends`) and GA K/V all-gather, PP sends of the boundary
  activations and gradients (none at the V's turn), DP
  gradient reduce-scatter (fp32) and all-gather of the updated weights; full recompute repeats the layers'
  forward traffic. Bytes are wire bytes of ring algorithms. Each kind runs on NVLink when its group fits in a node
  (ranks are ordered pp, dp, cp, tp with tp fastest; experts ep x etp consecutive), else on InfiniBand.
- **Step time** = compute (model FLOPs of `model_report`, SWA-aware, MTP included, plus recompute FLOPs, at an
  achievable fraction of peak) / (1 - pipeline bubble) + the exposed part of each kind of communication
  (1 - overlap). Bubble: (pp - 1) / (m v + pp - 1) for 1F1B (v = 1) and interleaved; 0 for ZBV / DualPipeV when
  m >= 2 pp (the 1F1B bubble otherwise). MFU = model FLOPs / (step time x GPUs x peak).

Everything is an estimate; the assumptions are fields of `Hardware`, `Precision` and `Assumptions` and are printed
with the table. Validation: `tests/test_planner.py` compares the per-rank estimate with the measured peak memory
of real CPU training steps of the tiny model under several layouts; `tests/test_simulate.py` holds the
parameters, gradients (to the byte), activations per layer and bytes per kind of communication to what
`mimo-train simulate` measures on the real shards of the 309B layouts. The optimizer state is planned as the
even split over each gradient group that `parallel/data_parallel.py` makes (row blocks of ceil(rows / n): the
first ranks hold up to one row more per tensor).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from mimo_train.config import ConfigError, ModelConfig, ParallelConfig, load_config
from mimo_train.hardware import GPUS, Hardware
from mimo_train.precision import PRECISIONS, Precision
from parallel.pipeline import stage_layers, stage_ranks

GB = 1e9

# --------------------------------------------------------------------------------------------------------------
# Assumptions
# --------------------------------------------------------------------------------------------------------------


def kernel_of(backend: str) -> str:
    """The activation model for a `parallel.backend`: the reference `torch` kernels, or the O(S) ones every GPU
    backend uses (flash / efficient / flex attention)."""
    return "torch" if backend == "torch" else "fused"


@dataclass(frozen=True)
class Assumptions:
    compute_efficiency: float = 0.5  # achieved fraction of peak on the model's matmuls and attention
    # Grouped expert GEMMs lose efficiency when each expert gets few rows per micro-batch: their FLOPs run at
    # rows / (rows + expert_half_rows) of the efficiency above (rows = ep x tokens per rank x top-k / experts).
    expert_half_rows: float = 128.0
    reserve_gb: float = 8.0  # per GPU: CUDA context, NCCL buffers, allocator fragmentation
    overlap_tp: float = 0.5  # fraction of each kind's communication hidden behind compute
    overlap_ep: float = 0.5  # (DualPipeV overlaps the EP all-to-all of one micro-batch with another's compute)
    overlap_ep_dualpipe: float = 0.9
    overlap_cp: float = 0.5
    overlap_pp: float = 0.9
    overlap_dp: float = 0.5
    # attention kernels: "fused" (parallel.backend=fused on a GPU: flash varlen / flex, O(S) memory) or "torch"
    kernel: str = "fused"
    packed_documents: bool = True  # torch kernel: GA layers use the masked (S x S) SDPA path
    micro_batch_size: int = 1


# --------------------------------------------------------------------------------------------------------------
# The model as the planner sees it: parameters by sharding rule, per unit (decoder layer, embedding, head, MTP)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Unit:
    """Parameter counts of one pipeline-placeable unit, by sharding rule."""

    tp: int = 0  # split over tp (q/o projections, sinks, dense FFN, vocab-parallel embedding and head)
    kv: dict = field(default_factory=dict)  # {kv heads: params} k/v projections
    expert: int = 0  # split over ep x etp
    rep: int = 0  # replicated (norms, router, eh_proj)
    buffers_fp32: int = 0  # expert correction biases, rotary tables (fp32, replicated)

    @property
    def total(self) -> int:
        return self.tp + sum(self.kv.values()) + self.expert + self.rep


@dataclass
class LayerShape:
    sliding: bool
    moe: bool
    kv_heads: int


@dataclass
class ModelGeometry:
    cfg: ModelConfig
    layers: list[Unit]
    shapes: list[LayerShape]
    embed: Unit
    head: Unit  # final norm + LM head
    mtp: Unit  # all MTP blocks
    mtp_blocks: int
    total_params: int  # main + MTP, from the module tree
    everywhere: Unit = field(default_factory=Unit)  # on every pipeline rank: the rotary tables
    # Per-rank figures that do not depend on recompute or the sequence, shared by a plan's layouts.
    cache: dict = field(default_factory=dict, repr=False)


def _rule(name: str) -> str:
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return "tp"
    if ".experts." in name:
        return "expert"
    if name.endswith(("q_proj.weight", "o_proj.weight", "self_attn.sinks", "gate_proj.weight", "up_proj.weight",
                      "down_proj.weight")):
        return "tp"
    if name.endswith(("k_proj.weight", "v_proj.weight")):
        return "kv"
    return "rep"


def geometry(cfg: ModelConfig) -> ModelGeometry:
    """Parameters of the real module tree (meta device), bucketed by unit and sharding rule."""
    from mimo_train.model.info import build_meta_model

    model = build_meta_model(cfg)
    layers = [Unit() for _ in range(cfg.num_layers)]
    embed, head, mtp, everywhere = Unit(), Unit(), Unit(), Unit()
    shapes = []
    for layer in model.decoder_layers():
        shapes.append(LayerShape(layer.self_attn.sliding, layer.is_moe, layer.self_attn.num_kv_heads))
    kv_of = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "num_kv_heads") and hasattr(mod, "k_proj"):
            kv_of[name] = mod.num_kv_heads

    def unit_of(name: str) -> Unit:
        if name.startswith("model.layers."):
            return layers[int(name.split(".")[2])]
        if name.startswith("model.embed_tokens"):
            return embed
        if name.startswith("model.mtp"):
            return mtp
        if name.startswith("model.rotary_emb"):
            return everywhere
        return head  # model.norm, lm_head

    total = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        u, rule = unit_of(name), _rule(name)
        if rule == "kv":
            kv = kv_of[name.rsplit(".", 2)[0]]
            u.kv[kv] = u.kv.get(kv, 0) + n
        else:
            setattr(u, rule, getattr(u, rule) + n)
    for name, b in model.named_buffers():
        unit_of(name).buffers_fp32 += b.numel()
    return ModelGeometry(cfg, layers, shapes, embed, head, mtp, cfg.mtp.num_blocks, total, everywhere)


# --------------------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    pp_schedule: str = "1f1b"
    pp_virtual: int = 1
    recompute: str = "none"  # none | selective | full

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def edp(self) -> int:
        return self.dp * self.cp * self.tp // (self.ep * self.etp)

    @classmethod
    def of(cls, p: ParallelConfig) -> "Layout":
        """The planner's view of a `parallel` section whose dp is resolved: the same degrees, schedule, recompute."""
        return cls(**{f.name: getattr(p, f.name) for f in fields(cls)})

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(tp=self.tp, pp=self.pp, dp=self.dp, cp=self.cp, ep=self.ep, etp=self.etp,
                              pp_schedule=self.pp_schedule, pp_virtual=self.pp_virtual)

    def describe(self) -> str:
        sched = {"1f1b": "1F1B", "interleaved_1f1b": f"I1F1B(v{self.pp_virtual})", "zbv": "ZBV",
                 "dualpipev": "DualPipeV"}[self.pp_schedule]
        s = f"TP{self.tp} PP{self.pp} {sched if self.pp > 1 else ''} CP{self.cp} DP{self.dp} EP{self.ep}"
        if self.etp > 1:
            s += f" ETP{self.etp}"
        return " ".join(s.split())


# --------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------


def _local_params(u: Unit, L: Layout) -> list[tuple[float, int]]:
    """[(parameters held by this rank, size of their ZeRO-1 gradient group)] for a unit."""
    dpcp = L.dp * L.cp
    out = [(u.tp / L.tp, dpcp), (u.rep, L.tp * dpcp), (u.expert / (L.ep * L.etp), L.edp)]
    for kv, n in u.kv.items():
        if kv >= L.tp:
            out.append((n / L.tp, dpcp))
        else:  # one head per rank, replicated on tp / kv ranks, whose gradients are summed with their dp x cp peers
            out.append((n / kv, dpcp * (L.tp // kv)))
    return out


def state_bytes(units: list[Unit], L: Layout, prec: Precision) -> dict[str, float]:
    params = grads = optim = 0.0
    for u in units:
        for n, group in _local_params(u, L):
            params += n * prec.param_bytes
            grads += n * prec.grad_bytes
            optim += n * (prec.master_bytes + 2 * prec.moment_bytes) / group
        params += u.buffers_fp32 * 4
    return {"params": params, "grads": grads, "optimizer": optim}


def pipeline_split(geo: ModelGeometry, L: Layout) -> tuple[list[list[int]], list[int]]:
    """`parallel/pipeline.py`'s decoder layers per stage and the pipeline rank of each stage (cached per layout)."""
    key = ("split", L.pp, L.pp_virtual, L.pp_schedule)
    if key not in geo.cache:
        if L.pp == 1:
            geo.cache[key] = ([list(range(geo.cfg.num_layers))], [0])
        else:
            geo.cache[key] = (stage_layers(L.parallel_config(), geo.cfg), stage_ranks(L.parallel_config()))
    return geo.cache[key]


def rank_units(geo: ModelGeometry, L: Layout, pp_rank: int) -> list[Unit]:
    """The units pipeline rank `pp_rank` holds: its stages' decoder layers (`parallel/pipeline.py`'s split and
    placement), the embedding on the first stage (and a copy on the last when MTP reads it), the final norm, head
    and MTP on the last. In a V (ZBV, DualPipeV) rank 0 holds both the first and the last stage."""
    if L.pp == 1:
        return geo.layers + [geo.embed, geo.head, geo.mtp, geo.everywhere]
    stages, ranks = pipeline_split(geo, L)
    local = [si for si in range(len(stages)) if ranks[si] == pp_rank]
    units = [geo.layers[i] for si in local for i in stages[si]]
    has_first, has_last = 0 in local, len(stages) - 1 in local
    if has_first or (has_last and geo.mtp_blocks > 0):
        units.append(geo.embed)  # one parameter when both stages are local
    if has_last:
        units += [geo.head, geo.mtp]
    return units + [geo.everywhere]


@dataclass(frozen=True)
class ActShape:
    """Per micro-batch, on one rank: tokens in the attention region (the CP chunk), in the SP region, etc."""

    tokens: float  # mbs x seq / cp: the tokens whose q/k/v this rank computes (full over tp)
    sp_tokens: float  # tokens / tp: norms, residuals, MoE routing
    seq: int
    cp: int
    tp: int
    mbs: int


def _norm_bytes(cfg: ModelConfig, a: int, kernel: str) -> float:
    """Per SP token: RMSNorm in plain torch under either backend (the `fused` spec replaces the attention cores
    and the expert GEMMs only): x.float() (saved by the rsqrt product) and the normalised x."""
    return 4 * cfg.hidden_size + a * cfg.hidden_size + 4


def _heads(cfg: ModelConfig, kv_heads: int, tp: int) -> tuple[float, float]:
    return cfg.num_attention_heads / tp, (kv_heads / tp if kv_heads >= tp else 1)


def _attention_bytes(cfg: ModelConfig, sliding: bool, kv_heads: int, s: ActShape, a: int, A: Assumptions,
                     recompute: str) -> float:
    """Saved bytes of one attention layer per micro-batch (input projections to o_proj)."""
    h, D, Dv = cfg.hidden_size, cfg.head_dim, cfg.v_head_dim
    hq, hkv = _heads(cfg, kv_heads, s.tp)
    T = s.tokens
    torch_kernel = A.kernel == "torch"
    # Inputs of the column-parallel projections: the (all-gathered, under SP) normed input, gathered once per q/k/v
    # projection (either backend). Plus the o_proj input (the attention output).
    gathers = 3 if s.tp > 1 else 1
    b = T * (gathers * h + hq * Dv) * a
    W = cfg.window_keys - 1
    if sliding:
        if torch_kernel and recompute == "none":
            C = max(16, min(W, s.seq)) if W > 0 else min(64, s.seq)
            Tq = T + (2 * W * s.mbs if s.cp > 1 else 0)  # CP: halo rows prepended to each chunk
            keys = C + W
            b += Tq * a * (hq * D + hq * D * keys / C + 3 * hq * keys + hq * Dv * keys / C + 3 * hq) + Tq * keys
        elif torch_kernel:  # the core recomputed: q, k, v and the log-sum-exp
            b += T * (a * (hq * D + hkv * (D + Dv)) + 4 * hq)
        else:
            b += _flash_core_bytes(cfg, s, a, hq, hkv, recompute, sliding=True)
    else:
        keys_kv = T * (s.cp if s.cp > 1 else 1)  # GA under CP: the all-gathered K/V of the whole sequence
        # The torch kernel's GA goes through masked SDPA (packed documents; under CP always: each chunk attends to
        # the keys before its end through a mask), whose CPU math path computes in fp32 whatever the activation
        # dtype: it saves q, K/V expanded to the query heads and the probabilities, all fp32 (measured by
        # `mimo-train simulate`).
        if torch_kernel and (A.packed_documents or s.cp > 1) and recompute == "none":
            f32 = 4
            if s.cp > 1:  # each of the two chunks attends to the keys before its end: (2cp + 1) L keys per row
                L = s.seq / (2 * s.cp)
                probs = s.mbs * hq * L * L * (2 * s.cp + 1)
                kv_rows = s.mbs * L * (2 * s.cp + 1)
                b += f32 * (T * hq * D + kv_rows * hq * (D + Dv) + probs)
            else:  # q, K/V expanded to the query heads, the S x S probabilities
                b += f32 * (T * hq * (2 * D + Dv) + s.mbs * hq * s.seq * s.seq)
        elif torch_kernel:
            b += T * (a * hq * D + 4 * hq) + keys_kv * hkv * (D + Dv) * a
        else:
            b += _flash_core_bytes(cfg, s, a, hq, hkv, recompute, sliding=False)
    return b


def _flash_core_bytes(cfg: ModelConfig, s: "ActShape", a: int, hq: float, hkv: float, recompute: str,
                      sliding: bool) -> float:
    """The `fused` backend's attention on a GPU (flash varlen, `parallel/kernels/sink_attention.py`), as
    `mimo-train simulate` runs it: the projections' outputs (q, k, v before RoPE) and what the kernel saves:
    the rotated q, k, V padded to the QK head dim, the (padded) output and the fp32 log-sum-exp. SWA under CP:
    each of the two chunks gets W halo rows of keys and placeholder queries. GA under CP: the all-gathered K
    (one buffer) and, per chunk, V padded for the keys up to the chunk's end ((2cp + 1) / 2cp of the sequence).
    `selective` recomputes the core: the projections' outputs stay, and the checkpoint keeps its inputs (the
    rotated q, k and v). (Flex, the GPU default for GA, saves V and the output unpadded: this is an upper bound
    for it.)"""
    D, Dv, T = cfg.head_dim, cfg.v_head_dim, s.tokens
    b = T * (hq * D + hkv * (D + Dv)) * a
    if recompute != "none":
        # GA under CP: the checkpointed core's inputs are the all-gathered K/V of the whole sequence
        kv_rows = T * s.cp if (not sliding and s.cp > 1) else T
        return 2 * b + (kv_rows - T) * hkv * (D + Dv) * a
    if sliding:
        W = cfg.window_keys - 1
        rows = T + (2 * W * s.mbs if s.cp > 1 else 0)
        return b + rows * ((2 * hq + 2 * hkv) * D * a + 4 * hq)
    keys = T * s.cp
    v_rows = keys * (2 * s.cp + 1) / (2 * s.cp) if s.cp > 1 else keys
    return b + T * (2 * hq * D * a + 4 * hq) + (keys + v_rows) * hkv * D * a


def _moe_bytes(cfg: ModelConfig, s: ActShape, a: int, A: Assumptions, recompute: str) -> float:
    """Saved bytes of one MoE FFN per micro-batch: router (fp32), dispatch, experts, combine."""
    h, k, E, I = cfg.hidden_size, cfg.num_experts_per_tok, cfg.num_experts, cfg.moe_intermediate_size
    T = s.sp_tokens
    router = T * (4 * h + 4 * E + k * 36)  # fp32 input and scores; top-k ids, weights, the dispatch order
    # Either backend (the fused one's grouped GEMM saves the same): dispatched rows, expert outputs, weighted
    # outputs; gate_up output, SiLU, product.
    rows = T * k * 3 * h * a
    inter = T * k * 4 * I * a
    if recompute == "selective":
        inter = 0.0
    return router + rows + inter


def _dense_bytes(cfg: ModelConfig, s: ActShape, a: int, A: Assumptions, recompute: str) -> float:
    h, I = cfg.hidden_size, cfg.intermediate_size / s.tp
    if recompute == "selective":  # the whole FFN is recomputed (`parallel/recompute.py`): it keeps its input only,
        return s.sp_tokens * h * a  # the sequence-parallel slice (its gathers are recomputed with it)
    gathers = 2 if s.tp > 1 else 1  # gate and up gather their input each (either backend)
    inter = 4 * I
    return s.tokens * (gathers * h + inter) * a


def layer_transient(cfg: ModelConfig, shape: LayerShape, s: ActShape, a: int, A: Assumptions) -> float:
    """Working memory of one layer's backward on top of what is saved: the gradients of its largest saved tensors
    (torch kernel: the GA S x S probabilities, or the SWA score tiles, twice: softmax backward's input and output;
    MoE: the gradient of the expert fc1 output)."""
    hq, _ = _heads(cfg, shape.kv_heads, s.tp)
    t = 0.0
    if A.kernel == "torch":
        if not shape.sliding and A.packed_documents:
            if s.cp > 1:
                L = s.seq / (2 * s.cp)
                t = 2 * a * s.mbs * hq * L * L * (2 * s.cp + 1) / 2  # one chunk at a time (the larger)
            else:
                t = 2 * a * s.mbs * hq * s.seq * s.seq
        elif shape.sliding:
            W = cfg.window_keys - 1
            C = max(16, min(W, s.seq)) if W > 0 else min(64, s.seq)
            t = 2 * a * s.tokens * hq * (C + W)
    if shape.moe:
        t = max(t, s.sp_tokens * cfg.num_experts_per_tok * 2 * cfg.moe_intermediate_size * a)
    return t


def layer_bytes(cfg: ModelConfig, shape: LayerShape, s: ActShape, a: int, A: Assumptions, recompute: str) -> float:
    """Saved activation bytes of one decoder layer for one micro-batch."""
    if recompute == "full":
        return s.sp_tokens * cfg.hidden_size * a  # the layer input only
    b = 2 * s.sp_tokens * _norm_bytes(cfg, a, A.kernel)
    b += _attention_bytes(cfg, shape.sliding, shape.kv_heads, s, a, A, recompute)
    b += _moe_bytes(cfg, s, a, A, recompute) if shape.moe else _dense_bytes(cfg, s, a, A, recompute)
    return b


def head_bytes(cfg: ModelConfig, mtp_blocks: int, s: ActShape, a: int, A: Assumptions, recompute: str) -> dict:
    """Last stage, one micro-batch: final norm, LM head input and fp32 log-softmax (vocab-parallel), the MTP
    blocks (norms, eh_proj, an SWA layer with a dense FFN, their own head); and the transient of the loss
    backward (the log-softmax gradient and the logits gradient, fp32)."""
    h, V = cfg.hidden_size, cfg.vocab_size / s.tp
    norm = s.sp_tokens * _norm_bytes(cfg, a, A.kernel)
    gathers_head = s.tokens * h * a
    ce = s.tokens * V * 4
    main = norm + gathers_head + ce
    block = (5 * norm + s.sp_tokens * 2 * h * a
             + _attention_bytes(cfg, True, cfg.swa_num_key_value_heads, s, a, A, recompute)
             + _dense_bytes(cfg, s, a, A, recompute) + gathers_head + ce)
    transient = (2 if s.tp == 1 else 1) * s.tokens * V * 4
    return {"head": main + mtp_blocks * block, "loss_transient": transient, "logits_one": ce}


# --------------------------------------------------------------------------------------------------------------
# Communication: what the code sends, per rank (checked against `mimo-train simulate`)
# --------------------------------------------------------------------------------------------------------------

# Tensor-parallel collectives of one forward, in units of one sequence-parallel gather of the hidden state (the
# backward sends the same: each all-gather's backward is a reduce-scatter and vice versa). Our column-parallel
# linears gather their input each (q, k and v separately; gate and up separately), a row-parallel one
# reduce-scatters its output: attention 3 + 1, dense FFN 2 + 1; the vocab-parallel embedding reduce-scatters
# once, the LM head gathers once; an MTP block = its embedding lookup + attention + dense FFN + the head.
TP_UNITS = {"attention": 4, "dense": 3, "embedding": 1, "head": 1}


def pipeline_sends(L: Layout, pp_rank: int, micro_batches: int) -> int:
    """Tensors pipeline rank `pp_rank` sends per step: each local stage's output forward (unless the next stage is
    on the same rank, as at the V's turn, or it is the last) and its input gradient back (unless first)."""
    if L.pp == 1:
        return 0
    return _sends_per_micro_batch(L.pp, L.pp_schedule, L.pp_virtual, pp_rank) * micro_batches


@functools.lru_cache(maxsize=4096)
def _sends_per_micro_batch(pp: int, schedule: str, virtual: int, pp_rank: int) -> int:
    ranks = stage_ranks(ParallelConfig(pp=pp, pp_schedule=schedule, pp_virtual=virtual))
    n = len(ranks)
    return sum((s < n - 1 and ranks[s + 1] != r) + (s > 0 and ranks[s - 1] != r)
               for s, r in enumerate(ranks) if r == pp_rank)


def rank_comm(geo: ModelGeometry, L: Layout, pp_rank: int, s: "ActShape", m: int, prec: Precision,
              cp_rank: int | None = None) -> dict[str, float]:
    """Bytes pipeline rank `pp_rank` sends per step, by kind, with ring conventions (all-gather and reduce-scatter
    (n - 1) / n of the whole buffer, all-reduce 2 (n - 1) / n, all-to-all the rows that leave the rank, broadcast
    (n - 1) / n). `cp_rank` (default the last) matters for the SWA halo only: see `halo_sends`."""
    cfg, a, h = geo.cfg, prec.act_bytes, geo.cfg.hidden_size
    cp_rank = L.cp - 1 if cp_rank is None else cp_rank
    stages, ranks = pipeline_split(geo, L)
    local = [si for si in range(len(stages)) if ranks[si] == pp_rank]
    shapes = [geo.shapes[i] for si in local for i in stages[si]]
    has_first, has_last = 0 in local, len(stages) - 1 in local
    mtp = geo.mtp_blocks if has_last else 0
    # Forward passes whose communication is repeated: full recompute runs each layer's forward again (selective
    # recomputes only local kernels: attention cores inside the CP exchange, expert GEMMs inside the all-to-all).
    layer_passes = 2 + (1 if L.recompute == "full" else 0)
    comm = {"tp": 0.0, "ep": 0.0, "cp": 0.0, "pp": 0.0, "dp": 0.0}
    if L.tp > 1:
        unit = s.tokens * h * a * (L.tp - 1) / L.tp
        layers = sum(TP_UNITS["attention"] + (0 if sh.moe else TP_UNITS["dense"]) for sh in shapes)
        once = (TP_UNITS["embedding"] * has_first + TP_UNITS["head"] * has_last
                + mtp * (TP_UNITS["embedding"] + TP_UNITS["attention"] + TP_UNITS["dense"] + TP_UNITS["head"]))
        comm["tp"] = unit * (layers * layer_passes + once * 2) * m
    if L.ep > 1:
        rows = s.sp_tokens * cfg.num_experts_per_tok * h * a * (L.ep - 1) / L.ep
        comm["ep"] = 2 * rows * layer_passes * sum(sh.moe for sh in shapes) * m  # dispatch + combine
    if L.cp > 1:
        kv_sw = _heads(cfg, cfg.swa_num_key_value_heads, L.tp)[1]
        kv_ga = _heads(cfg, cfg.num_key_value_heads, L.tp)[1]
        halo = halo_sends(L.cp, cp_rank) * (cfg.window_keys - 1) * s.mbs * kv_sw * (cfg.head_dim + cfg.v_head_dim) * a
        gather = s.tokens * (L.cp - 1) * kv_ga * (cfg.head_dim + cfg.v_head_dim) * a
        per_pass = sum(halo if sh.sliding else gather for sh in shapes)
        comm["cp"] = (per_pass * layer_passes + mtp * halo * 2) * m
    comm["pp"] = s.sp_tokens * h * a * pipeline_sends(L, pp_rank, m)
    key = ("dp", replace(L, recompute="none"), pp_rank, prec)
    if key not in geo.cache:
        geo.cache[key] = dp_step_bytes(geo, L, pp_rank, prec)
    comm["dp"] = geo.cache[key]
    return comm


def halo_sends(cp: int, cp_rank: int) -> int:
    """SWA halos context-parallel rank `cp_rank` puts on the wire per layer. It holds chunks r and 2cp - 1 - r
    (`parallel/context_parallel.py`); each chunk sends its last W rows to the holder of the next one: chunk r to
    rank r + 1 (to itself on the last rank, whose two chunks are adjacent: no wire), chunk 2cp - 1 - r to rank
    r - 1 (none from rank 0, whose second chunk ends the sequence)."""
    return int(cp_rank < cp - 1) + int(cp_rank > 0)


def dp_step_bytes(geo: ModelGeometry, L: Layout, pp_rank: int, prec: Precision) -> float:
    """The optimizer step's traffic as `parallel/data_parallel.py` does it: each gradient group's fp32 main
    gradients reduce-scattered, the updated weights all-gathered (row blocks, even but for the padding of the
    last block); the first and last stage's embedding copies all-reduced over their pair first."""
    total = 0.0
    units = rank_units(geo, L, pp_rank)
    for u in units:
        for n, g in _local_params(u, L):
            if g > 1:
                total += n * (prec.grad_bytes + prec.param_bytes) * (g - 1) / g
    if L.pp > 1 and geo.mtp_blocks > 0 and pipeline_split(geo, L)[1][-1] != 0:
        stages = pipeline_split(geo, L)[1]
        if pp_rank in (stages[0], stages[-1]):  # the tied pair: all-reduce over 2 ranks
            total += geo.embed.tp / L.tp * prec.grad_bytes
    return total


# --------------------------------------------------------------------------------------------------------------
# Estimate of one layout
# --------------------------------------------------------------------------------------------------------------


def in_flight(L: Layout, rank: int, m: int) -> float:
    """Micro-batches (in units of this rank's whole layer set) whose activations rank `rank` holds at its peak."""
    pp, v = L.pp, L.pp_virtual
    if pp == 1:
        return 1
    if L.pp_schedule == "1f1b":
        return min(pp - rank, m)
    if L.pp_schedule == "interleaved_1f1b":
        chunks = min(2 * (pp - rank - 1) + (v - 1) * pp + 1, m * v)
        return chunks / v
    if L.pp_schedule == "zbv":
        return min(pp, m)
    return min(pp + 1, m)  # dualpipev


def bubble(L: Layout, m: int) -> float:
    pp, v = L.pp, L.pp_virtual
    if pp == 1:
        return 0.0
    if L.pp_schedule in ("zbv", "dualpipev") and m >= 2 * pp:
        return 0.0
    vv = v if L.pp_schedule == "interleaved_1f1b" else 1
    return (pp - 1) / (m * vv + pp - 1)


def _link(hw: Hardware, span: int) -> float:
    """Bandwidth (bytes/s) of a group whose ranks span `span` consecutive global ranks."""
    return (hw.nvlink_gbs if span <= hw.gpus_per_node else hw.ib_gbs) * GB


def cp_positions(cp: int) -> list[int]:
    """One context-parallel rank of each position class: the first (it holds the sequence's first and last chunk:
    one halo to send), a middle one (two), the last (one: its two chunks are adjacent, that halo stays local)."""
    return sorted({0, min(1, cp - 1), cp - 1})


def rank_memory(geo: ModelGeometry, L: Layout, r: int, s: "ActShape", m: int, prec: Precision, A: Assumptions,
                stages: list[list[int]], ranks: list[int]) -> dict[str, float]:
    """Bytes pipeline rank `r` holds at its peak, by term: state, the activations of its micro-batches in flight,
    the last stage's head and MTP blocks, and the backward's working memory on top."""
    cfg, a = geo.cfg, prec.act_bytes
    local = [si for si in range(len(stages)) if ranks[si] == r]
    layer_ids = [i for si in local for i in stages[si]]
    has_last = len(stages) - 1 in local
    key = ("state", replace(L, recompute="none"), r, prec)
    if key not in geo.cache:
        geo.cache[key] = state_bytes(rank_units(geo, L, r), L, prec)
    mem = dict(geo.cache[key])
    saved, work = _per_shape(cfg, geo.shapes, layer_ids, s, a, A, L.recompute)
    act = sum(saved[i] for i in layer_ids) * in_flight(L, r, m)
    hb = head_bytes(cfg, geo.mtp_blocks, s, a, A, "none" if L.recompute == "full" else L.recompute)
    head = hb["head"] if has_last else 0.0
    loss_transient = hb["loss_transient"] if has_last else 0.0
    # The backward's working memory on top of what is saved: the loss (last stage) or one layer's core.
    layer_t = [work[i] for i in layer_ids]
    if L.recompute == "full" and layer_ids:
        # A layer is recomputed only after the loss backward has freed the head's activations: the peak is the
        # larger phase (head + loss gradient, or one layer's full activations + its backward working memory), not
        # their sum. Written as the part above the head, to keep the breakdown additive.
        recomputed = max(layer_bytes(cfg, geo.shapes[i], s, a, A, "none") + work[i] for i in layer_ids)
        transient = max(loss_transient, recomputed - head)
    else:
        transient = max([loss_transient] + layer_t)
    mem.update({"activations": act, "head_and_mtp": head, "transient": transient})
    mem["total"] = sum(mem.values())
    mem["pp_rank"] = r
    return mem


def _per_shape(cfg: ModelConfig, shapes: list[LayerShape], layer_ids: list[int], s: "ActShape", a: int,
               A: Assumptions, recompute: str) -> tuple[dict[int, float], dict[int, float]]:
    """{layer: saved bytes}, {layer: backward working memory}, computed once per distinct layer shape."""
    cache: dict[tuple, tuple[float, float]] = {}
    saved, work = {}, {}
    for i in layer_ids:
        sh = shapes[i]
        key = (sh.sliding, sh.moe, sh.kv_heads)
        if key not in cache:
            cache[key] = (layer_bytes(cfg, sh, s, a, A, recompute), layer_transient(cfg, sh, s, a, A))
        saved[i], work[i] = cache[key]
    return saved, work


@dataclass
class Estimate:
    layout: Layout
    fits: bool
    runnable: bool
    memory: dict[str, float]  # per GPU (the worst rank), bytes
    comm: dict[str, float]  # bytes sent per GPU per step, by kind
    comm_time: dict[str, float]  # seconds, before overlap
    step_time: float
    mfu: float
    bubble: float
    compute_time: float
    micro_batches: int
    notes: list[str] = field(default_factory=list)
    simulated: dict | None = None  # `verify`: what `mimo-train simulate` measured for this layout
    comm_rank: tuple[int, int] = (0, 0)  # (pipeline rank, context-parallel rank) of the busiest rank

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layout"] = {**asdict(self.layout), "name": self.layout.describe()}
        return d


def estimate(geo: ModelGeometry, L: Layout, seq: int, global_batch: int, hw: Hardware, prec: Precision,
             A: Assumptions, flops_per_token: float, expert_flops_per_token: float = 0.0,
             time_unfit: bool = True) -> Estimate:
    """Memory of the worst rank, communication of the busiest, step time and MFU of layout L. `time_unfit=False`:
    a layout that does not fit gets its memory only (no communication, an infinite step time)."""
    cfg = geo.cfg
    a = prec.act_bytes
    mbs = A.micro_batch_size
    m = global_batch // (L.dp * mbs)  # micro-batches per pipeline per step
    s = ActShape(tokens=mbs * seq / L.cp, sp_tokens=mbs * seq / L.cp / L.tp, seq=seq, cp=L.cp, tp=L.tp, mbs=mbs)
    # The pipeline's own split and placement (an even split; the planner does not search pp_layout).
    stages, ranks = pipeline_split(geo, L)
    worst = max((rank_memory(geo, L, r, s, m, prec, A, stages, ranks) for r in range(L.pp)),
                key=lambda mem: mem["total"])
    usable = (hw.memory_gb - A.reserve_gb) * GB
    if not time_unfit and worst["total"] > usable:
        zero = dict.fromkeys(("tp", "ep", "cp", "pp", "dp"), 0.0)
        return Estimate(L, False, L.etp == 1, worst, zero, dict(zero), math.inf, 0.0, bubble(L, m), math.inf, m)

    # ---- communication per GPU per step (bytes sent) of the busiest rank, and its time -------------------------
    # Every pipeline rank at every context-parallel position class (their SWA halo differs: see `cp_positions`).
    # Only full recompute changes the traffic (it repeats the forward's): the other modes share one computation.
    key = ("comm", replace(L, recompute="full" if L.recompute == "full" else "none"), s, m, prec)
    if key not in geo.cache:
        per_rank = [(rank_comm(geo, L, r, s, m, prec, cp_rank=c), r, c)
                    for r in range(L.pp) for c in cp_positions(L.cp)]
        geo.cache[key] = max(per_rank, key=lambda x: sum(x[0].values()))
    comm, comm_pp, comm_cp = geo.cache[key]
    comm = dict(comm)

    # Links: tp consecutive; cp stride tp; ep x etp consecutive (MoE mesh); dp stride cp x tp; pp stride dp cp tp.
    span = {"tp": L.tp, "cp": L.cp * L.tp, "ep": L.ep * L.etp, "dp": L.dp * L.cp * L.tp, "pp": L.world}
    comm_time = {kind: v / _link(hw, span[kind]) for kind, v in comm.items()}
    overlap = {"tp": A.overlap_tp, "ep": A.overlap_ep_dualpipe if L.pp_schedule == "dualpipev" and L.pp > 1
               else A.overlap_ep, "cp": A.overlap_cp, "pp": A.overlap_pp, "dp": A.overlap_dp}

    # ---- compute ----------------------------------------------------------------------------------------------
    tokens_step = global_batch * seq
    model_flops = flops_per_token * tokens_step
    hw_flops = model_flops
    if L.recompute == "full":
        hw_flops *= 4 / 3  # one more forward of every layer
    elif L.recompute == "selective":
        hw_flops *= 1.06  # the attention core and the expert fc1 + SwiGLU again (about 6% of the step)
    rows = L.ep * s.sp_tokens * cfg.num_experts_per_tok / cfg.num_experts
    expert_share = expert_flops_per_token / flops_per_token
    slowdown = (1 - expert_share) + expert_share * (rows + A.expert_half_rows) / rows
    compute = hw_flops * slowdown / L.world / (hw.peak_tflops * 1e12 * A.compute_efficiency)
    bub = bubble(L, m)
    exposed = sum(t * (1 - overlap[kind]) for kind, t in comm_time.items())
    step = compute / (1 - bub) + exposed
    mfu = model_flops / (step * L.world * hw.peak_tflops * 1e12)
    notes = []
    runnable = L.etp == 1
    if not runnable:
        notes.append("etp>1: not yet runnable (expert-tensor parallelism is not implemented in the trainer)")
    return Estimate(L, worst["total"] <= usable, runnable, worst, comm, comm_time, step, mfu, bub, compute, m, notes,
                    comm_rank=(comm_pp, comm_cp))


# --------------------------------------------------------------------------------------------------------------
# Enumeration and ranking
# --------------------------------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(cfg: ModelConfig, gpus: int, seq: int, global_batch: int, *, max_tp: int = 8,
                      etp_options=(1, 2), recompute_options=ParallelConfig.RECOMPUTE,
                      micro_batch_size: int = 1) -> list[Layout]:
    """Every layout that passes `validate_layout` (etp > 1 checked with the rule relaxed) and splits the batch."""
    from parallel.topology import validate_layout

    out = []
    for tp in [d for d in _divisors(gpus) if d <= max_tp]:
        for pp in [d for d in _divisors(gpus // tp) if d <= cfg.num_layers]:
            for cp in _divisors(gpus // (tp * pp)):
                dp = gpus // (tp * pp * cp)
                if global_batch % (dp * micro_batch_size):
                    continue
                m = global_batch // (dp * micro_batch_size)
                scheds = [("1f1b", 1)]
                if pp > 1:
                    scheds += [("interleaved_1f1b", v) for v in (2, 3, 4) if pp * v <= cfg.num_layers]
                    scheds += [("zbv", 2)] if 2 * pp <= cfg.num_layers else []
                    scheds += [("dualpipev", 2)] if 2 * pp <= cfg.num_layers and m >= 2 * pp else []
                for ep in _divisors(cfg.num_experts):
                    for etp in etp_options:
                        if (dp * cp * tp) % (ep * etp):
                            continue
                        for sched, v in scheds:
                            L = Layout(tp, pp, dp, cp, ep, etp, sched, v)
                            p = L.parallel_config()
                            p.etp = 1  # validate the rest; etp > 1 is modelled, marked not yet runnable
                            try:
                                p.validate()
                                validate_layout(p, cfg, L.world, seq)
                            except ConfigError:
                                continue
                            for rc in recompute_options:
                                out.append(replace(L, recompute=rc))
    return out


def plan(cfg: ModelConfig, gpus: int, gpu: str = "h100", seq: int = 32768, global_batch: int | None = None,
         precision: str = "bf16", assumptions: Assumptions | None = None, hardware: Hardware | None = None,
         layouts: list[Layout] | None = None, time_unfit: bool = True, etp_options=(1, 2),
         geo: ModelGeometry | None = None) -> dict[str, Any]:
    """Estimates for every valid layout, ranked: fitting (and runnable) layouts by step time, then the rest
    (`time_unfit=False`: by memory only; `etp_options`: the expert-tensor parallelism searched; `geo`: the
    model's `geometry`, to share between plans of one model)."""
    from mimo_train.model.info import model_report

    A = assumptions or Assumptions()
    hw = hardware or GPUS[gpu]
    prec = PRECISIONS[precision]
    if global_batch is None:  # the recipe: 2^26 tokens per step (2048 x 32k, 256 x 256k)
        global_batch = max(1, 2**26 // seq)
    geo = geo or geometry(cfg)
    flops = float(model_report(cfg, seq)["flops_per_token"]["total"])
    if layouts is None:
        layouts = enumerate_layouts(cfg, gpus, seq, global_batch, micro_batch_size=A.micro_batch_size,
                                    etp_options=etp_options)
    expert_flops = 6 * sum(u.expert for u in geo.layers) * cfg.num_experts_per_tok / cfg.num_experts
    results = [estimate(geo, L, seq, global_batch, hw, prec, A, flops, expert_flops, time_unfit) for L in layouts]
    results.sort(key=lambda e: (not e.fits, not e.runnable, e.step_time if e.fits else e.memory["total"]))
    return {"gpus": gpus, "gpu": asdict(hw), "seq": seq, "global_batch": global_batch, "precision": prec.byte_sizes(),
            "assumptions": asdict(A), "flops_per_token": flops, "params": geo.total_params, "results": results}


# --------------------------------------------------------------------------------------------------------------
# Held to the code: verification by simulation, and where a layout fits when none does here
# --------------------------------------------------------------------------------------------------------------

# `--verify` holds the plan to what `mimo-train simulate` builds, rank by rank: parameters and gradients to the
# byte, the optimizer state within its row padding (ceil(rows / n) row blocks: a few hundred bytes), the bytes sent
# per kind and the activations per layer type within these fractions.
MEMORY_TOLERANCE = 0.10  # kept for callers: a rank's state may exceed the plan by this fraction of the total
OPTIMIZER_SLACK_BYTES = 4096
COMM_TOLERANCE = 0.10
ACTIVATION_TOLERANCE = 0.10
ACTIVATION_FLOOR_BYTES = 4 * 2**20  # a fully recomputed layer keeps ~17 MB; its checkpoint's few MB are not planned


def runnable_config(L: Layout, kernel: str = "fused") -> ParallelConfig:
    """The layout as `parallel.*`, recompute and the kernel backend the plan assumed included."""
    return replace(L.parallel_config(), recompute=L.recompute, backend="torch" if kernel == "torch" else "fused")


def top_pick(cfg: ModelConfig, gpus: int, gpu: str = "h100", seq: int = 32768,
             global_batch: int | None = None) -> ParallelConfig:
    """The fastest fitting, runnable layout of `plan` (a ConfigError when none fits)."""
    p = plan(cfg, gpus, gpu, seq, global_batch)
    best = p["results"][0] if p["results"] else None
    if best is None or not (best.fits and best.runnable):
        raise ConfigError(f"plan: no runnable layout fits {gpus} x {gpu.upper()} at seq {seq}; give --layout")
    return runnable_config(best.layout)


def _off(sim: float, planned: float, rel: float, floor: float = 1e6) -> bool:
    return abs(sim - planned) > max(rel * abs(planned), floor)


def _rank_differences(geo: ModelGeometry, e: Estimate, r: dict, s: "ActShape", prec: Precision) -> list[str]:
    """What one simulated rank holds and sends that the plan of the same rank (pipeline and CP position) does not."""
    L = e.layout
    planned = state_bytes(rank_units(geo, L, r["pp_rank"]), L, prec)
    out = []
    if r["param_bytes"] + r["buffer_bytes"] != planned["params"]:
        out.append(f"rank {r['rank']} parameters {r['param_bytes'] + r['buffer_bytes']:,} B, planned "
                   f"{planned['params']:,.0f}")
    if r["grad_bytes"] != planned["grads"]:
        out.append(f"rank {r['rank']} gradients {r['grad_bytes']:,} B, planned {planned['grads']:,.0f}")
    if abs(r["optimizer_bytes"] - planned["optimizer"]) > OPTIMIZER_SLACK_BYTES:
        out.append(f"rank {r['rank']} optimizer state {r['optimizer_bytes']:,} B, planned {planned['optimizer']:,.0f}")
    comm = rank_comm(geo, L, r["pp_rank"], s, e.micro_batches, prec, cp_rank=r["cp_rank"])
    for kind, v in comm.items():
        if _off(r["comm"].get(kind, 0.0), v, COMM_TOLERANCE):
            out.append(f"rank {r['rank']} {kind} {r['comm'].get(kind, 0.0) / GB:.2f} GB/step, planned {v / GB:.2f}")
    return out


def verify(cfg: ModelConfig, e: Estimate, seq: int, global_batch: int, precision: str = "bf16",
           progress=None, assumptions: Assumptions | None = None) -> dict[str, Any]:
    """Build every rank class of `e`'s layout with `mimo-train simulate` (with the plan's kernel backend) and hold
    the plan of each rank to it (see the tolerances above), and each layer type's activations under the layout's
    recompute mode to the planned ones."""
    from mimo_train.planning.simulate import layer_activations, memory_total, simulate

    A = assumptions or Assumptions()
    p = runnable_config(e.layout, A.kernel)
    sim = simulate(cfg, p, seq, global_batch, precision, activations=False, progress=progress)
    geo, prec, L = geometry(cfg), PRECISIONS[precision], e.layout
    s = ActShape(tokens=A.micro_batch_size * seq / L.cp, sp_tokens=A.micro_batch_size * seq / L.cp / L.tp, seq=seq,
                 cp=L.cp, tp=L.tp, mbs=A.micro_batch_size)
    problems = [d for r in sim["ranks"] for d in _rank_differences(geo, e, r, s, prec)]
    shapes = {("swa" if sh.sliding else "ga") + ("_moe" if sh.moe else "_dense"): sh for sh in reversed(geo.shapes)}
    activations = {}
    for kind, run in layer_activations(cfg, p, seq, precision, (L.recompute,))[L.recompute].items():
        planned = layer_bytes(cfg, shapes[kind], s, prec.act_bytes, A, L.recompute)
        activations[kind] = {"simulated": run["saved_bytes"], "planned": planned}
        if _off(run["saved_bytes"], planned, ACTIVATION_TOLERANCE, ACTIVATION_FLOOR_BYTES):
            problems.append(f"{kind} layer activations {run['saved_bytes'] / GB:.3f} GB, planned {planned / GB:.3f}")
    busiest = max(sim["ranks"], key=lambda r: sum(r["comm"].values()))
    record = {"ranks_built": len(sim["ranks"]), "state_bytes": max(memory_total(r) for r in sim["ranks"]),
              "optimizer_balance": sim["optimizer_balance"], "total_params": sim["total_params"],
              "busiest_rank": busiest["rank"], "comm": busiest["comm"],
              "planned_comm": rank_comm(geo, L, busiest["pp_rank"], s, e.micro_batches, prec,
                                        cp_rank=busiest["cp_rank"]),
              "activations": activations, "problems": problems, "within_tolerance": not problems}
    e.simulated = record
    return record


def format_verification(e: Estimate) -> str:
    v = e.simulated
    kinds = ", ".join(f"{k} {v['comm'].get(k, 0.0) / GB:.1f}/{v['planned_comm'][k] / GB:.1f}"
                      for k in ("tp", "ep", "cp", "pp", "dp"))
    acts = ", ".join(f"{k} {a['simulated'] / 1e6:.0f}/{a['planned'] / 1e6:.0f} MB" for k, a in v["activations"].items())
    verdict = ("every rank as planned" if v["within_tolerance"] else
               f"OUTSIDE the tolerances: {'; '.join(v['problems'][:4])}")
    return (f"built by simulate: {e.layout.describe()} ({v['ranks_built']} rank classes, each against its own plan: "
            f"state to the byte, communication per kind and activations per layer within "
            f"{COMM_TOLERANCE:.0%}): {verdict}; optimizer state balance within a stage {v['optimizer_balance']:.1%}; "
            f"busiest rank {v['busiest_rank']}, GB/step simulated/planned: {kinds}; activations per layer "
            f"({e.layout.recompute} recompute), simulated/planned: {acts}")


def where_it_fits(cfg: ModelConfig, gpus: int, gpu: str, seq: int, global_batch: int | None, precision: str,
                  A: Assumptions, max_gpus: int = 4096,
                  types: dict[str, Hardware] | None = None) -> list[tuple[int, str, Estimate]]:
    """When nothing fits: the smallest cluster of the same GPU (doubling the count) and the first GPU type with
    more memory at the same count, with their best layout. `types`: the GPU table (default GPUS)."""
    types = types or GPUS
    found = []

    def best(n: int, name: str) -> Estimate | None:
        res = plan(cfg, n, name, seq, global_batch, precision, A, types[name])["results"]
        return res[0] if res and res[0].fits else None

    n = gpus * 2
    while n <= max_gpus:
        e = best(n, gpu)
        if e is not None:
            found.append((n, gpu, e))
            break
        n *= 2
    for name, hw in sorted(types.items(), key=lambda kv: kv[1].memory_gb):
        if hw.memory_gb > types[gpu].memory_gb:
            e = best(gpus, name)
            if e is not None:
                found.append((gpus, name, e))
                break
    return found


# --------------------------------------------------------------------------------------------------------------
# Calibration from measurements (bench/gpu results)
# --------------------------------------------------------------------------------------------------------------

# The fields `plan --calibrate FILE` reads: a JSON object with an optional "gpu" (the GPU type measured) and a
# "measured" object of any of these keys, each replacing the assumption of the same name.
CALIBRATION_FIELDS = {
    "compute_efficiency": "achieved fraction of the bf16 peak on the model's matmuls and attention (a train step's "
                          "model FLOPs / (time x peak))",
    "expert_half_rows": "rows per expert at which the grouped expert GEMM reaches half its efficiency",
    "peak_tflops": "the GPU's dense bf16 peak",
    "nvlink_gbs": "achieved per-GPU bus bandwidth inside a node (GB/s)",
    "ib_gbs": "achieved per-GPU bus bandwidth across nodes (GB/s)",
    "overlap_tp": "fraction of TP communication hidden", "overlap_ep": "fraction of EP communication hidden",
    "overlap_cp": "fraction of CP communication hidden", "overlap_pp": "fraction of PP communication hidden",
    "overlap_dp": "fraction of DP communication hidden",
}
HARDWARE_FIELDS = ("peak_tflops", "nvlink_gbs", "ib_gbs")


def load_calibration(path: str) -> dict[str, float]:
    """The measured values of a calibration file (see CALIBRATION_FIELDS), checked."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--calibrate {path}: cannot read it as JSON ({err})") from None
    measured = data.get("measured") if isinstance(data, dict) else None
    if not isinstance(measured, dict):
        raise ConfigError(f"--calibrate {path}: needs an object \"measured\" with any of "
                          f"{', '.join(CALIBRATION_FIELDS)}")
    unknown = sorted(set(measured) - set(CALIBRATION_FIELDS))
    if unknown:
        raise ConfigError(f"--calibrate {path}: unknown measured fields {unknown}; known: "
                          f"{', '.join(CALIBRATION_FIELDS)}")
    for key, value in measured.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"--calibrate {path}: measured.{key} must be a positive number, got {value!r}")
        if key.startswith("overlap_") or key == "compute_efficiency":
            if value > 1:
                raise ConfigError(f"--calibrate {path}: measured.{key} is a fraction and must be <= 1, got {value}")
    return {k: float(v) for k, v in measured.items()}


def calibration_device(path: str) -> str | None:
    """The device type a calibration file says it was measured on (its "gpu" field), if any."""
    with open(path) as f:
        data = json.load(f)
    gpu = data.get("gpu") if isinstance(data, dict) else None
    return str(gpu).lower() if gpu else None


def check_calibration_device(path: str, gpu: str, force: bool) -> None:
    """A calibration applies to the device type it was measured on: refuse another one's unless forced."""
    measured_on = calibration_device(path)
    if measured_on is not None and measured_on != gpu and not force:
        raise ConfigError(f"--calibrate {path}: measured on {measured_on}, and this plan is for --gpu {gpu}; "
                          f"calibrate on a {gpu.upper()} (python -m bench.gpu), or pass --force-calibration to "
                          f"apply it anyway")


def calibrated(A: Assumptions, hw: Hardware, measured: dict[str, float]) -> tuple[Assumptions, Hardware]:
    hw = replace(hw, **{k: v for k, v in measured.items() if k in HARDWARE_FIELDS})
    A = replace(A, **{k: v for k, v in measured.items() if k not in HARDWARE_FIELDS})
    return A, hw


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def assumptions_line(p: dict[str, Any]) -> str:
    """Every assumption the plan used (the fields of Hardware, Precision and Assumptions), name=value."""
    fields = {**{f"gpu.{k}": v for k, v in p["gpu"].items() if k != "name"},
              **{f"precision.{k}": v for k, v in p["precision"].items() if k != "name"}, **p["assumptions"]}
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


def format_plan(p: dict[str, Any], top: int) -> str:
    hw, A = p["gpu"], p["assumptions"]
    res = p["results"]
    n_fit = sum(e.fits for e in res)
    lines = [
        f"{p['gpus']} x {hw['name'].upper()} ({hw['memory_gb']:.0f} GB, {hw['peak_tflops']:.0f} TFLOP/s bf16), "
        f"seq {p['seq']:,}, global batch {p['global_batch']} sequences, micro-batch {A['micro_batch_size']}; "
        f"{len(res)} layouts, {n_fit} fit in {hw['memory_gb'] - A['reserve_gb']:.0f} GB",
        f"model {p['params'] / 1e9:.2f}B params, {p['flops_per_token'] / 1e9:.1f} GFLOP/token (fwd+bwd, SWA-aware, "
        f"MTP incl.); precision {p['precision']['name']}, attention kernel {A['kernel']}, compute at "
        f"{A['compute_efficiency']:.0%} of peak, NVLink {hw['nvlink_gbs']:.0f} GB/s, IB {hw['ib_gbs']:.0f} GB/s",
        "",
        f"{'#':>3} {'layout':<34} {'recomp':<9} {'mem GB':>7} {'(par':>5} {'grad':>5} {'opt':>5} {'act':>6} "
        f"{'head)':>6} {'TP':>6} {'EP':>6} {'CP':>6} {'PP':>6} {'DP':>6} {'bubble':>6} {'step s':>7} {'MFU':>6} fits "
        "sim",
        f"{'':>3} {'':<34} {'':<9} {'':>7} {'':>5} {'':>5} {'':>5} {'':>6} {'':>6} "
        + " ".join(f"{'GB/st':>6}" for _ in range(5)),
    ]
    for i, e in enumerate(res[:top], 1):
        mem, c = e.memory, e.comm
        fits = "yes" if e.fits else "NO"
        if not e.runnable:
            fits += "*"
        lines.append(
            f"{i:>3} {e.layout.describe():<34} {e.layout.recompute:<9} {_gb(mem['total']):>7} {_gb(mem['params']):>5} "
            f"{_gb(mem['grads']):>5} {_gb(mem['optimizer']):>5} {_gb(mem['activations']):>6} "
            f"{_gb(mem['head_and_mtp'] + mem['transient']):>6} "
            + " ".join(f"{_gb(c[k]):>6}" for k in ("tp", "ep", "cp", "pp", "dp"))
            + f" {e.bubble:>6.1%} {e.step_time:>7.2f} {e.mfu:>6.1%} {fits:<4} "
            + ("built" if e.simulated else "-"))
    if any(not e.runnable for e in res[:top]):
        lines.append("* etp > 1: modelled, not yet runnable (expert-tensor parallelism is not implemented)")
    lines.append("memory: the worst pipeline rank; comm: bytes sent per step by the busiest rank; step time = "
                 "compute / (1 - bubble) + exposed communication")
    lines.append("sim: built = every rank class was built with the real code on a fake process group (`mimo-train "
                 "simulate`, run here by --verify); - = not built (`plan --verify` builds the top pick)")
    for e in res[:top]:
        if e.simulated:
            lines.append(format_verification(e))
    lines.append("step time and MFU are estimates, not measurements; assumptions: " + assumptions_line(p))
    if p.get("measured"):
        lines.append("measured (--calibrate): " + ", ".join(f"{k}={v:g}" for k, v in p["measured"].items())
                     + "; every other figure is an assumption")
    else:
        lines.append("measured: nothing (no --calibrate): every figure above is an assumption")
    if "fits_elsewhere" in p:
        if p["fits_elsewhere"]:
            lines.append(f"nothing fits on {p['gpus']} x {hw['name'].upper()}; smallest that fit: " + "; ".join(
                f"{n} x {g.upper()}: {name}, {rc} recompute, {mem / GB:.1f} GB, {step:.0f} s/step"
                for n, g, name, rc, mem, step in p["fits_elsewhere"]))
        else:
            lines.append(f"nothing fits on {p['gpus']} x {hw['name'].upper()}, nor on a larger cluster or GPU")
    return "\n".join(lines)


def model_config(path: str, overrides: list[str], mtp_blocks: int) -> ModelConfig:
    """The model of a model or training YAML, with overrides (bare keys are model keys) and the MTP blocks trained
    (-1: as in the file)."""
    overrides = [o if o.split("=", 1)[0].split(".")[0] in ("model", "train", "parallel", "data", "run")
                 else f"model.{o}" for o in overrides]
    if mtp_blocks >= 0:
        overrides.append(f"model.mtp.num_blocks={mtp_blocks}")
    return load_config(path, overrides).model


def run_check(args: argparse.Namespace) -> int:
    """`plan --check`: the config's own layout in every stage; exit 0 when every stage fits, 1 when one does not."""
    from mimo_train.planning.plan_check import check_config, first_failure, format_check

    try:
        cfg = load_config(args.config, args.overrides)
        hw = GPUS[args.gpu]
        checks = check_config(cfg, hw, args.gpus, Assumptions(reserve_gb=args.reserve_gb))
    except (ConfigError, ValueError, KeyError) as e:
        print(f"mimo-train plan --check: {e}", file=sys.stderr)
        return 2
    print(format_check(checks))
    bad = first_failure(checks)
    if bad is not None:
        print(f"mimo-train plan --check: {bad.verdict()}", file=sys.stderr)
        return 1
    return 0


def _layouts_asked(args: argparse.Namespace) -> list[Layout] | None:
    """--layout: the one layout to estimate (world size from it, or --gpus), else None (enumerate)."""
    if not args.layout:
        return None
    from mimo_train.planning.simulate import parallel_config, parse_layout

    p = parallel_config(parse_layout(args.layout), args.gpus)
    args.gpus = p.world_size
    return [Layout(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep, etp=p.etp, pp_schedule=p.pp_schedule,
                   pp_virtual=p.pp_virtual, recompute=p.recompute)]


def run_plan(args: argparse.Namespace) -> int:
    if args.check:
        return run_check(args)
    if args.readme_table:
        from mimo_train.planning.plan_table import readme_table

        cfg = model_config(args.config, args.overrides, args.mtp_blocks)
        print(readme_table(cfg, progress=lambda msg: print(msg, file=sys.stderr, flush=True)))
        return 0
    try:
        layouts = _layouts_asked(args)
        if args.gpus is None:
            raise ConfigError("--gpus: required (or give --layout, or --check a training config)")
        cfg = model_config(args.config, args.overrides, args.mtp_blocks)
        A = Assumptions(compute_efficiency=args.efficiency, reserve_gb=args.reserve_gb, kernel=args.kernel,
                        micro_batch_size=args.micro_batch_size)
        hw = GPUS[args.gpu]
        hw = replace(hw, **{k: v for k, v in (("nvlink_gbs", args.nvlink_gbs), ("ib_gbs", args.ib_gbs),
                                              ("peak_tflops", args.peak_tflops)) if v})
        measured = load_calibration(args.calibrate) if args.calibrate else {}
        if args.calibrate:
            check_calibration_device(args.calibrate, args.gpu, args.force_calibration)
        A, hw = calibrated(A, hw, measured)
        p = plan(cfg, args.gpus, args.gpu, args.seq, args.global_batch, args.precision, A, hw, layouts)
    except (ConfigError, ValueError, KeyError) as e:
        print(f"mimo-train plan: {e}", file=sys.stderr)
        return 2
    if not p["results"]:
        print(f"mimo-train plan: no valid layout for {args.gpus} GPUs at seq {args.seq}", file=sys.stderr)
        return 1
    p["measured"] = measured
    if args.verify:
        for e in [e for e in p["results"] if e.fits and e.runnable][: args.verify]:
            if not args.json:
                print(f"verifying {e.layout.describe()} with mimo-train simulate ...", file=sys.stderr, flush=True)
            verify(cfg, e, args.seq, p["global_batch"], args.precision, assumptions=A)
    if not any(e.fits for e in p["results"]):
        p["fits_elsewhere"] = [(n, g, e.layout.describe(), e.layout.recompute, e.memory["total"], e.step_time)
                               for n, g, e in where_it_fits(cfg, args.gpus, args.gpu, args.seq, args.global_batch,
                                                            args.precision, A)]
    if args.json:
        out = {k: v for k, v in p.items() if k != "results"}
        out["results"] = [e.to_dict() for e in p["results"][: args.top]]
        out["num_layouts"] = len(p["results"])
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(p, args.top))
    return 0 if all(e.simulated is None or e.simulated["within_tolerance"] for e in p["results"]) else 1


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="rank parallel layouts for a GPU count: memory per GPU, communication, step time, MFU",
        description="Enumerate the valid TP/PP(+schedule)/CP/DP/EP/ETP/recompute layouts for a number of GPUs and "
                    "estimate memory per GPU, communication per step, step time and MFU (see mimo_train/planning/planner.py "
                    "for the model and its assumptions).")
    p.add_argument("--config", required=True, help="a model YAML (configs/model/*.yaml) or a training YAML")
    p.add_argument("--gpus", type=int, default=None,
                   help="number of GPUs to plan for (required unless --layout or --check gives it)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU type (memory, peak FLOP/s, links; default h100)")
    p.add_argument("--seq", type=int, default=32768, help="sequence length (default 32768)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per step (default: 2^26 tokens / seq, the recipe: 2048 at 32k, 256 at 256k)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--mtp-blocks", type=int, default=1,
                   help="MTP blocks trained (default 1, the pre-training recipe; -1: as in the config)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16",
                   help="weights, gradients and optimizer-state precision (default bf16)")
    p.add_argument("--kernel", choices=("fused", "torch"), default="fused",
                   help="attention kernels for the activation model (fused: parallel.backend=fused's flash/flex "
                        "kernels on GPUs)")
    p.add_argument("--efficiency", type=float, default=Assumptions.compute_efficiency,
                   help="achieved fraction of peak FLOP/s on compute (default %(default)s)")
    p.add_argument("--reserve-gb", type=float, default=Assumptions.reserve_gb,
                   help="GPU memory kept free for the CUDA context, NCCL and fragmentation (default %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="override the GPU's peak")
    p.add_argument("--nvlink-gbs", type=float, default=0.0, help="override the intra-node bandwidth (GB/s)")
    p.add_argument("--ib-gbs", type=float, default=0.0, help="override the inter-node bandwidth per GPU (GB/s)")
    p.add_argument("--verify", type=int, nargs="?", const=1, default=0, metavar="N",
                   help="build the top N fitting layouts (default 1) with `mimo-train simulate` and compare")
    p.add_argument("--calibrate", default="", metavar="FILE",
                   help="bench/gpu results (JSON: {\"measured\": {...}}): replace the assumed efficiency, "
                        "bandwidths and overlaps by the measured ones (fields: planner.CALIBRATION_FIELDS)")
    p.add_argument("--layout", default="", help="estimate this one layout (keys of parallel.*, as simulate's "
                                                "--layout, e.g. tp=2,pp=16,cp=4,dp=4,ep=8,recompute=selective)")
    p.add_argument("--check", action="store_true",
                   help="--config is a training YAML: estimate its own layout in every stage on --gpu; exit 0 when "
                        "every stage fits, 1 when one does not (naming the stage, rank, need and budget)")
    p.add_argument("--readme-table", action="store_true",
                   help="print the README's table of recommended layouts (64/512/2048 H100s, 64 H200s; 32k, 256k)")
    p.add_argument("--force-calibration", action="store_true",
                   help="apply a --calibrate file measured on another device type than --gpu")
    p.add_argument("--top", type=int, default=10, help="how many layouts to print (default 10)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="model overrides, e.g. model.num_layers=24")
    p.set_defaults(func=run_plan)
    return p
