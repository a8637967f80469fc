"""The memory of one pipeline rank: its parameters, gradients and ZeRO-1 optimizer state, the activations autograd
saves per layer type and per micro-batch in flight, and the backward's working memory (the model is described in
`estimator.py`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from mimo_train.config import Layout, ModelConfig
from mimo_train.planning.geometry import Assumptions, LayerShape, ModelGeometry, Unit, rank_units
from mimo_train.precision import Precision
from parallel.sharding import kv_split


# --------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------


def _local_params(u: Unit, L: Layout) -> list[tuple[float, int]]:
    """[(parameters held by this rank, size of their ZeRO-1 gradient group)] for a unit."""
    dpcp = L.dp * L.cp
    out = [(u.tp / L.tp, dpcp), (u.rep, L.tp * dpcp), (u.expert / (L.ep * L.etp), L.edp)]
    for kv, n in u.kv.items():  # a replicated head's gradients are summed over its replicas and their dp x cp peers
        per_rank, replicas = kv_split(kv, L.tp)
        out.append((n * per_rank / kv, dpcp * replicas))
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


def _heads(cfg: ModelConfig, kv_heads: int, tp: int) -> tuple[float, int]:
    """(query heads, KV heads) of one tensor-parallel rank."""
    return cfg.num_attention_heads / tp, kv_split(kv_heads, tp)[0]


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
