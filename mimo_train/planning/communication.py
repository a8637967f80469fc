"""The communication of one pipeline rank per step, by kind (tp, ep, cp, pp, dp), as the code sends it, and the
link each kind runs on (the model is described in `estimator.py`)."""

from __future__ import annotations

import functools
from dataclasses import replace

from mimo_train.config import ParallelConfig
from mimo_train.hardware import Hardware
from mimo_train.planning.geometry import GB, Layout, ModelGeometry, pipeline_split, rank_units
from mimo_train.planning.memory import ActShape, _heads, _local_params
from mimo_train.precision import Precision
from parallel.pipeline import stage_ranks


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


def _link(hw: Hardware, span: int) -> float:
    """Bandwidth (bytes/s) of a group whose ranks span `span` consecutive global ranks."""
    return (hw.nvlink_gbs if span <= hw.gpus_per_node else hw.ib_gbs) * GB


def cp_positions(cp: int) -> list[int]:
    """One context-parallel rank of each position class: the first (it holds the sequence's first and last chunk:
    one halo to send), a middle one (two), the last (one: its two chunks are adjacent, that halo stays local)."""
    return sorted({0, min(1, cp - 1), cp - 1})
