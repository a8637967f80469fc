"""The layout estimator behind `mimo-train plan` (its command line is `plan_cli.py`): enumerate the parallel layouts
for a GPU count and estimate, for each, the memory per GPU, the communication per step, the step time and the MFU;
rank the layouts that fit.

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

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mimo_train.config import ConfigError, ModelConfig, ParallelConfig
from mimo_train.hardware import GPUS, Hardware
from mimo_train.planning.communication import _link, cp_positions, rank_comm
from mimo_train.planning.geometry import GB, Assumptions, Layout, ModelGeometry, geometry, pipeline_split
from mimo_train.planning.memory import ActShape, rank_memory
from mimo_train.precision import PRECISIONS, Precision


# --------------------------------------------------------------------------------------------------------------
# Estimate of one layout
# --------------------------------------------------------------------------------------------------------------


def bubble(L: Layout, m: int) -> float:
    pp, v = L.pp, L.pp_virtual
    if pp == 1:
        return 0.0
    if L.pp_schedule in ("zbv", "dualpipev") and m >= 2 * pp:
        return 0.0
    vv = v if L.pp_schedule == "interleaved_1f1b" else 1
    return (pp - 1) / (m * vv + pp - 1)


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
