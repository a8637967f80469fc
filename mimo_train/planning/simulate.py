"""`mimo-train simulate`: build the shards of a parallel layout with the real code, rank by rank, on one CPU, and
report what each rank holds and sends.

    mimo-train simulate --config configs/model/mimo_v2_flash.yaml --gpus 512 \
        [--layout tp=2,pp=16,cp=4,dp=4,ep=8,pp_schedule=dualpipev,pp_virtual=2] [--seq 32768] [--json]

Each simulated rank joins torch's fake process group as rank r of the job (`parallel/fake_group.py`) and builds its
engine with the trainer's own builder (`mimo_train/training/engine.py`): the model on the meta device, sharded by
`build_topology` and `build_parallel_model`, the optimizer and the gradient buffers. Nothing is allocated.

- **Memory**: parameters, gradient buffers and optimizer state are the bytes of the tensors the engine created,
  found generically: every tensor reachable from the parameters (`.grad`, `.main_grad`) and from the optimizer
  object (after one optimizer step, so torch's lazily created Adam moments exist), each storage counted once.
- **Communication of one training step**: every collective is recorded with its process group and wire bytes
  (`CollectiveCounter`): the optimizer step's (gradient reduction, norm, parameter updates) by running it; each
  decoder layer's forward and backward by running one layer of each type (attention kind x MoE/dense) at full
  width and the stage's sequence length on the meta device, multiplied by the layers of that type on the rank and
  by the micro-batches of a step. Routing is taken as perfectly balanced (`BalancedRouting`). Pipeline sends are
  the measured stage-boundary tensor times the sends of the schedule (one per micro-batch and stage boundary,
  activations forward and gradients back).
- **Activations**: for each layer type and each recompute mode the code implements, the bytes the layer still
  holds after its forward (saved tensors, minus its output) and the peak during its forward and backward,
  measured by torch's `MemTracker` on meta tensors.

Rank classes: ranks differ by pipeline stage (what they hold) and by their position in the gradient groups (their
optimizer shard); the first and the last rank of every pipeline stage are built (`--ranks all` builds every rank).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from typing import Any

import torch

from mimo_train.config import ConfigError, ModelConfig, ParallelConfig
from mimo_train.hardware import GPUS
from mimo_train.planning.communication import pipeline_sends
from mimo_train.planning.estimator import top_pick
from mimo_train.planning.geometry import Assumptions, Layout, geometry, kernel_of, model_config, pipeline_split
from mimo_train.planning.memory import ActShape, in_flight, rank_memory
from mimo_train.precision import PRECISIONS
from mimo_train.training.engine import AdamSettings, Engine, build_engine
from parallel.fake_group import BalancedRouting, CollectiveCounter, fake_world

GB = 1e9
KIND_OF_GROUP = {"tp": "tp", "tp_cp": "tp", "cp": "cp", "ep": "ep", "pp": "pp"}  # every other group: "dp"


# --------------------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------------------


def parse_layout(text: str) -> dict[str, Any]:
    """"tp=2,pp=16,pp_schedule=dualpipev" -> {"tp": 2, "pp": 16, "pp_schedule": "dualpipev"}: keys of parallel.*"""
    fields = {f.name: f for f in dataclasses.fields(ParallelConfig)}
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"--layout: {item!r} must be key=value with key one of {', '.join(fields)}")
        default = fields[key].default
        if key == "dp" and value == "auto":
            out[key] = value
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int) or key == "dp":
            try:
                out[key] = int(value)
            except ValueError:
                raise ConfigError(f"--layout: {key}={value!r} must be an integer") from None
        elif key == "pp_layout":
            out[key] = [int(v) for v in value.split("/") if v]
        else:
            out[key] = value
    return out


def parallel_config(layout: dict[str, Any], gpus: int | None) -> ParallelConfig:
    p = ParallelConfig(**layout)
    p.validate()
    p = p.resolve_dp(gpus)
    if gpus is not None and p.world_size != gpus:
        raise ConfigError(f"--layout: tp x pp x dp x cp = {p.world_size} must equal --gpus {gpus}")
    return p


def layout_of(p: ParallelConfig) -> str:
    keys = ["tp", "pp", "dp", "cp", "ep", "etp", "pp_schedule", "pp_virtual", "recompute"]
    return ",".join(f"{k}={getattr(p, k)}" for k in keys)


def recompute_modes() -> tuple[str, ...]:
    """The recompute modes the engine implements (`parallel.recompute`)."""
    return ParallelConfig.RECOMPUTE


# --------------------------------------------------------------------------------------------------------------
# One rank, built as the trainer builds it
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RankShards(Engine):
    fake_mode: Any = None  # set once the model has moved onto fake CPU tensors (`fake_mode_of`)


def build_rank(cfg: ModelConfig, p: ParallelConfig, seq: int, precision: str) -> RankShards:
    """The trainer's engine (`build_engine`) on the meta device, without materialising weights or opening data:
    topology, model, shards, optimizer, fp32 main gradients under bf16. Call inside `fake_world`."""
    engine = build_engine(cfg, p, seq, precision=precision, adam=AdamSettings())
    return RankShards(**vars(engine))


def optimizer_step(shards: RankShards) -> None:
    """What the trainer does after the last micro-batch's backward (`Trainer.train_step`): reduce-scatter the
    gradients, take the global norm, update, all-gather the rows."""
    shards.reduce_gradients()
    shards.update(max_norm=0.0, grad_norm=0.0)
    shards.optimizer.zero_grad()  # as before the next step: what stays is the optimizer's persistent state


def group_names(shards: RankShards) -> dict[str, str]:
    """{c10d group_name: our name} for every group this rank belongs to; a group that serves several roles (the
    same ranks: torch builds it once) gets them all, joined by "+" (`CollectiveCounter` picks the caller's)."""
    roles: dict[str, list[str]] = defaultdict(list)
    for name, g in shards.topo.groups.items():
        if g is not None and name not in roles[g.group_name]:
            roles[g.group_name].append(name)
    names = {k: "+".join(v) for k, v in roles.items()}
    for layout in shards.layouts.values():
        if layout.grad_group is not None:
            names.setdefault(layout.grad_group.group_name, layout.grad_kind)
        if layout.tied_group is not None:
            names.setdefault(layout.tied_group.group_name, "tied_embedding")
    return names


def _storages(tensors, device_only: bool = True) -> dict[int, int]:
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and (t.device.type != "cpu" or not device_only):
            s = t.untyped_storage()
            out[s._cdata] = s.nbytes()
    return out


def _tensors_in(obj, seen: set[int], depth: int = 0):
    """Every tensor reachable from `obj` through attributes, dicts, lists and tuples."""
    if id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if isinstance(obj, dict):
        items = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif isinstance(obj, torch.nn.Module):
        return  # the model is accounted for separately
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return
    for item in items:
        yield from _tensors_in(item, seen, depth + 1)


def memory_of(shards: RankShards) -> dict[str, Any]:
    """Bytes of parameters, gradient buffers and optimizer state as allocated by the engine (device tensors)."""
    params = list(shards.model.parameters())
    buffers = list(shards.model.buffers())
    p_st = _storages(params)
    b_st = _storages(buffers)
    grads = [g for p in params for g in (getattr(p, "main_grad", None), p.grad) if g is not None]
    g_st = {k: v for k, v in _storages(grads).items() if k not in p_st}
    o_st = {k: v for k, v in _storages(_tensors_in(shards.optimizer, set())).items()
            if k not in p_st and k not in g_st and k not in b_st}
    return {"params": sum(p.numel() for p in params), "param_bytes": sum(p_st.values()),
            "buffer_bytes": sum(b_st.values()), "grad_bytes": sum(g_st.values()),
            "optimizer_bytes": sum(o_st.values())}


def full_parameter_counts(shards: RankShards) -> dict[str, int]:
    """{parameter name: elements of the whole tensor} of this rank's parameters (local size x slices)."""
    return {n: p.numel() * shards.layouts[n].num_slices for n, p in shards.model.named_parameters()}


# --------------------------------------------------------------------------------------------------------------
# Layers: activations and per-layer communication
# --------------------------------------------------------------------------------------------------------------


def layer_kind(layer) -> str:
    return ("swa" if layer.sliding else "ga") + ("_moe" if layer.is_moe else "_dense")


def local_layers(shards: RankShards) -> dict[str, list[int]]:
    kinds: dict[str, list[int]] = defaultdict(list)
    for name, layer in shards.model.model.layers.named_children():
        kinds[layer_kind(layer)].append(int(name))
    return dict(kinds)


def fake_mode_of(shards: RankShards):
    """The FakeTensorMode this rank's model lives in, moving it there from the meta device on first use: the model's
    own code asks for its device type (`torch.autocast(x.device.type)`), which the meta device does not support.
    Parameters are new objects, so the fp32 main gradients are re-created on them as the trainer creates them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from parallel.mixed_precision import MainGradients

    if shards.fake_mode is not None:
        return shards.fake_mode
    shards.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with shards.fake_mode:
        for module in shards.model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="cpu"), p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = torch.empty_like(b, device="cpu")
        shards.model.reset_buffers()
        if shards.main_grads is not None:
            shards.main_grads = MainGradients(shards.model)
    return shards.fake_mode


def kernel_path(shards: RankShards):
    """The kernels a GPU would run: the `fused` backend's GPU path (flash varlen) on these fake host tensors,
    whose meta kernels give the shapes autograd saves; the `torch` backend runs the same everywhere."""
    import contextlib

    from parallel.kernels.choice import simulated_gpu

    return simulated_gpu() if shards.model.spec.name == "fused" else contextlib.nullcontext()


def run_layer(shards: RankShards, index: int, seq: int, mbs: int = 1) -> dict[str, Any]:
    """One micro-batch forward and backward of decoder layer `index` on the meta device: held activation bytes
    after the forward (without its output), the peak of its forward + backward above the parameters and
    gradients, and its collectives."""
    from torch.distributed._tools.mem_tracker import MemTracker

    model, topo = shards.model, shards.topo
    layer = model.model.layers[str(index)]
    dtype = next(model.parameters()).dtype
    counter = CollectiveCounter(group_names(shards))
    with fake_mode_of(shards), BalancedRouting(), kernel_path(shards):
        input_ids = torch.zeros(mbs, seq, dtype=torch.long)
        batch = model.prepare(input_ids, sequence_layout=shards.sequence_layout)
        x = torch.empty(mbs, seq // topo.cp // topo.tp, model.cfg.hidden_size, dtype=dtype, requires_grad=True)
        tables_before = _storages(_tensors_in(batch.attn_meta, set()), device_only=False)
        tracker = MemTracker()
        tracker.track_external(layer)
        with tracker, counter:
            out, aux, _ = layer(x, *batch.rope[layer.layer_type], batch.attn_meta)
            after_forward = tracker.get_tracker_snapshot("current")[torch.device("cpu")]
            loss = out.float().sum() + (aux.float().sum() if aux is not None else 0.0)
            loss.backward()
            peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    out_bytes = out.untyped_storage().nbytes() + (aux.untyped_storage().nbytes() if aux is not None else 0)
    # Tables a kernel builds once per micro-batch and caches on the metadata (document offsets), shared by every
    # layer: not this layer's.
    cached = _storages(_tensors_in(batch.attn_meta, set()), device_only=False)
    out_bytes += sum(v for k, v in cached.items() if k not in tables_before)
    held = sum(v for k, v in after_forward.items() if str(k) in ("_MemRefType.ACT", "_MemRefType.TEMP"))
    kinds = {k: str(k) for k in peak}
    working = sum(v for k, v in peak.items() if kinds[k] in ("_MemRefType.ACT", "_MemRefType.TEMP"))
    comm: dict[str, float] = defaultdict(float)
    for r in counter.records:
        comm[KIND_OF_GROUP.get(r.group, "dp")] += r.wire_bytes
    return {"saved_bytes": held - out_bytes, "peak_bytes": working, "output_bytes": out.untyped_storage().nbytes(),
            "comm": dict(comm)}


def run_ends(shards: RankShards, seq: int, mbs: int = 1) -> dict[str, float]:
    """Communication of one micro-batch forward and backward through what a stage holds besides decoder layers:
    the embedding (first stage), the final norm and LM head, and the MTP blocks with their embedding lookups and
    head (last stage). The losses are left out: the vocab-parallel cross-entropy sends only a few fp32 scalars per
    token."""
    model, topo = shards.model, shards.topo
    m = model.model
    counter = CollectiveCounter(group_names(shards))
    dtype = next(model.parameters()).dtype
    with fake_mode_of(shards), BalancedRouting():
        ids = torch.zeros(mbs, seq, dtype=torch.long)
        batch = model.prepare(ids, sequence_layout=shards.sequence_layout)
        hidden = torch.empty(mbs, seq // topo.cp // topo.tp, model.cfg.hidden_size, dtype=dtype, requires_grad=True)
        with counter:
            outputs = []
            if m.embed_tokens is not None:
                outputs.append(model.embed(batch))
            if model.lm_head is not None:
                h = m.norm(hidden)
                outputs.append(model.lm_head(h))
                for block in (m.mtp.layers if m.mtp is not None else []):
                    h, normed = block(h, model.embed(batch), *batch.rope["sliding_attention"], batch.attn_meta)
                    outputs.append(model.lm_head(normed))
            if outputs:
                sum(o.float().sum() for o in outputs).backward()
    comm: dict[str, float] = defaultdict(float)
    for r in counter.records:
        comm[KIND_OF_GROUP.get(r.group, "dp")] += r.wire_bytes
    return dict(comm)


# --------------------------------------------------------------------------------------------------------------
# A layout
# --------------------------------------------------------------------------------------------------------------


def rank_classes(p: ParallelConfig) -> list[int]:
    """The first and the last rank of every pipeline stage (ranks are ordered pp, dp, cp, tp), and, when the
    context-parallel group has middle ranks (which send two SWA halos where the ends send one), the first rank of
    the second context-parallel position."""
    per_stage = p.dp * p.cp * p.tp
    ranks = []
    for r in range(p.pp):
        first = r * per_stage
        middle = {first + p.tp} if p.cp > 2 else set()
        ranks += sorted({first, (r + 1) * per_stage - 1} | middle)
    return ranks


def cp_position(cp_rank: int, cp: int) -> str:
    """A context-parallel rank's position class: what its SWA halo exchange sends (`communication.halo_sends`)."""
    return "first_cp_rank" if cp_rank == 0 else "last_cp_rank" if cp_rank == cp - 1 else "middle_cp_rank"


def simulate_rank(cfg: ModelConfig, p: ParallelConfig, rank: int, seq: int, micro_batches: int, precision: str,
                  layer_runs: dict[str, dict] | None = None) -> dict[str, Any]:
    """Build `rank` and account for it. `layer_runs` ({kind: run_layer result}) supplies each layer type's
    communication (measured once per layout); kinds it lacks are run here and added to it."""
    t0 = time.time()
    with fake_world(rank, p.world_size):
        shards = build_rank(cfg, p, seq, precision)
        names = group_names(shards)
        report = {"rank": rank, "pp_rank": shards.topo.rank_in("pp"), "cp_rank": shards.topo.rank_in("cp"),
                  "groups": sorted({n for v in names.values() for n in v.split("+")})}
        counter = CollectiveCounter(names)
        with counter:
            optimizer_step(shards)
        report.update(memory_of(shards))
        report["full_params"] = full_parameter_counts(shards)
        comm: dict[str, float] = defaultdict(float)
        for r in counter.records:
            comm["dp"] += r.wire_bytes
        kinds = local_layers(shards)
        report["layers"] = {k: len(v) for k, v in kinds.items()}
        if layer_runs is not None:
            # A layer's traffic depends on the rank's place only through the SWA halo (`cp_position`).
            place = cp_position(shards.topo.rank_in("cp"), p.cp)
            for kind, indices in kinds.items():
                key = f"{kind}/{place}"
                if key not in layer_runs:
                    layer_runs[key] = run_layer(shards, indices[0], seq)
                for k, v in layer_runs[key]["comm"].items():
                    comm[k] += v * len(indices) * micro_batches
            if p.pp > 1 and kinds:
                boundary = layer_runs[f"{next(iter(kinds))}/{place}"]["output_bytes"]
                comm["pp"] += boundary * pipeline_sends(Layout.of(p), report["pp_rank"], micro_batches)
            if shards.model.model.embed_tokens is not None or shards.model.lm_head is not None:
                for k, v in run_ends(shards, seq).items():
                    comm[k] += v * micro_batches
        report["comm"] = dict(comm)
    report["seconds"] = time.time() - t0
    return report


def layer_activations(cfg: ModelConfig, p: ParallelConfig, seq: int, precision: str,
                      modes: tuple[str, ...] | None = None) -> dict[str, dict]:
    """{recompute mode: {layer kind: run_layer result}} over the ranks that hold each kind first (`modes`: those
    recompute modes; default every one the engine implements)."""
    from parallel.pipeline import stage_layers, stage_ranks

    out: dict[str, dict] = {}
    per_stage = p.dp * p.cp * p.tp
    if p.pp > 1:
        layers, ranks = stage_layers(p, cfg), stage_ranks(p)
        owner = {i: ranks[s] for s, ls in enumerate(layers) for i in ls}
    else:
        owner = {i: 0 for i in range(cfg.num_layers)}
    for mode in modes or recompute_modes():
        q = dataclasses.replace(p, recompute=mode)
        runs: dict[str, dict] = {}
        for pp_rank in sorted(set(owner.values())):
            with fake_world(pp_rank * per_stage, p.world_size):
                shards = build_rank(cfg, q, seq, precision)
                for kind, indices in local_layers(shards).items():
                    if kind not in runs:
                        runs[kind] = run_layer(shards, indices[0], seq)
            if len(runs) == len({layer_kind_of(cfg, i) for i in owner}):
                break
        out[mode] = runs
    return out


def layer_kind_of(cfg: ModelConfig, i: int) -> str:
    return ("ga" if cfg.is_global_layer(i) else "swa") + ("_moe" if cfg.is_moe_layer(i) else "_dense")


def simulate(cfg: ModelConfig, p: ParallelConfig, seq: int, global_batch: int | None = None,
             precision: str = "bf16", ranks: str = "classes", comm: bool = True, activations: bool = True,
             progress=None) -> dict[str, Any]:
    """Simulate every rank class of layout `p` (see the module docstring)."""
    from parallel.topology import validate_layout

    validate_layout(p, cfg, p.world_size, seq)
    if global_batch is None:
        global_batch = max(1, 2**26 // seq)
    micro_batches = global_batch // p.dp
    todo = list(range(p.world_size)) if ranks == "all" else rank_classes(p)
    layer_runs: dict[str, dict] | None = {} if comm else None
    reports = []
    for i, r in enumerate(todo):
        reports.append(simulate_rank(cfg, p, r, seq, micro_batches, precision, layer_runs))
        if progress:
            progress(f"rank {r} ({i + 1}/{len(todo)}): {reports[-1]['seconds']:.1f} s")
    result = {"layout": layout_of(p), "gpus": p.world_size, "seq": seq, "global_batch": global_batch,
              "micro_batches": micro_batches, "precision": precision, "ranks": reports}
    result["total_params"] = shard_parameter_total(reports)
    # The optimizer's sharding balance: within each pipeline stage (stages hold different layers by design).
    stages = defaultdict(list)
    for r in reports:
        stages[r["pp_rank"]].append(r["optimizer_bytes"])
    result["optimizer_balance"] = max(balance(v) for v in stages.values())
    if activations:
        result["activations"] = layer_activations(cfg, p, seq, precision)
    return result


def shard_parameter_total(reports: list[dict]) -> int:
    """Parameters of the whole model from the shards: every parameter name once, at its full size."""
    whole: dict[str, int] = {}
    for r in reports:
        whole.update(r["full_params"])
    return sum(whole.values())


def balance(values: list[float]) -> float:
    """(largest - smallest) / largest; of optimizer state: over the ranks of one pipeline stage."""
    return (max(values) - min(values)) / max(values) if values and max(values) > 0 else 0.0


def memory_total(report: dict) -> float:
    return report["param_bytes"] + report["buffer_bytes"] + report["grad_bytes"] + report["optimizer_bytes"]


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def fit_verdict(s: dict[str, Any], cfg: ModelConfig, p: ParallelConfig, gpu: str, reserve_gb: float = 8.0
                ) -> dict[str, Any]:
    """Does the layout fit GPUs of type `gpu`? Per rank: its simulated state, plus (when measured) the simulated
    activations of its layers times the micro-batches its schedule holds in flight, plus the planner's head, MTP
    and backward working memory of its pipeline rank (not simulated). The worst rank against the GPU's memory less
    the reserve."""
    L = Layout.of(p)
    A = Assumptions(kernel=kernel_of(p.backend), reserve_gb=reserve_gb)
    prec = PRECISIONS[s["precision"]]
    geo = geometry(cfg)
    seq, m = s["seq"], s["micro_batches"]
    shape = ActShape(tokens=seq / p.cp, sp_tokens=seq / p.cp / p.tp, seq=seq, cp=p.cp, tp=p.tp, mbs=1)
    stages, stage_owner = pipeline_split(geo, L)
    runs = s.get("activations", {}).get(p.recompute, {})
    worst = None
    for r in s["ranks"]:
        planned = rank_memory(geo, L, r["pp_rank"], shape, m, prec, A, stages, stage_owner)
        acts = (sum(runs[k]["saved_bytes"] * n for k, n in r["layers"].items()) * in_flight(L, r["pp_rank"], m)
                if runs else 0.0)
        need = memory_total(r) + acts + planned["head_and_mtp"] + planned["transient"]
        if worst is None or need > worst["need_bytes"]:
            worst = {"rank": r["rank"], "pp_rank": r["pp_rank"], "need_bytes": need, "activation_bytes": acts}
    usable = (GPUS[gpu].memory_gb - reserve_gb) * GB
    return {**worst, "gpu": gpu, "usable_bytes": usable, "fits": worst["need_bytes"] <= usable,
            "activations_simulated": bool(runs)}


def format_verdict(v: dict[str, Any]) -> str:
    acts = "simulated activations" if v["activations_simulated"] else "no activations (--no-activations)"
    word = "fits in" if v["fits"] else "does NOT fit in"
    return (f"fit on {v['gpu'].upper()}: the worst rank, {v['rank']} (pipeline rank {v['pp_rank']}), needs "
            f"{v['need_bytes'] / GB:.1f} GB (state as built, {acts}, the planned head and backward working memory), "
            f"{word} the {v['usable_bytes'] / GB:.1f} GB usable")


def format_simulation(s: dict[str, Any]) -> str:
    lines = [f"simulated {s['layout']} on {s['gpus']} ranks, seq {s['seq']:,}, {s['micro_batches']} micro-batches "
             f"per step, {s['precision']}: {len(s['ranks'])} ranks built",
             f"parameters over one copy of each shard: {s['total_params']:,}; optimizer state balance within a "
             f"pipeline stage (max - min) / max = {s['optimizer_balance']:.2%}", "",
             f"{'rank':>5} {'pp':>3} {'params':>14} {'par GB':>7} {'grad GB':>7} {'opt GB':>7} {'state GB':>8} "
             + " ".join(f"{k + ' GB':>8}" for k in ("tp", "ep", "cp", "pp", "dp")) + "  groups"]
    for r in s["ranks"]:
        c = r.get("comm", {})
        lines.append(f"{r['rank']:>5} {r['pp_rank']:>3} {r['params']:>14,} {r['param_bytes'] / GB:>7.2f} "
                     f"{r['grad_bytes'] / GB:>7.2f} {r['optimizer_bytes'] / GB:>7.2f} {memory_total(r) / GB:>8.2f} "
                     + " ".join(f"{c.get(k, 0.0) / GB:>8.2f}" for k in ("tp", "ep", "cp", "pp", "dp"))
                     + "  " + ",".join(r["groups"]))
    for mode, runs in s.get("activations", {}).items():
        lines.append("")
        lines.append(f"activations per layer, one micro-batch, recompute={mode}:")
        for kind, run in runs.items():
            lines.append(f"  {kind:<10} held after forward {run['saved_bytes'] / GB:7.3f} GB, peak of forward + "
                         f"backward {run['peak_bytes'] / GB:7.3f} GB")
    lines.append("comm: bytes one rank sends per step (ring conventions), routing balanced")
    return "\n".join(lines)


def run_simulate(args: argparse.Namespace) -> int:
    try:
        cfg = model_config(args.config, args.overrides, args.mtp_blocks)
        if args.layout:
            p = parallel_config(parse_layout(args.layout), args.gpus)
        else:
            p = top_pick(cfg, args.gpus, args.gpu, args.seq, args.global_batch)
        if args.gpus is None:
            args.gpus = p.world_size
        progress = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
        s = simulate(cfg, p, args.seq, args.global_batch, args.precision, args.ranks,
                     activations=not args.no_activations, progress=progress)
        s["fit"] = fit_verdict(s, cfg, p, args.gpu)
    except (ConfigError, ValueError) as e:
        print(f"mimo-train simulate: {e}", file=sys.stderr)
        return 2
    if args.json:
        for r in s["ranks"]:
            r.pop("full_params")
        print(json.dumps(s, indent=2))
    else:
        print(format_simulation(s))
        print(format_verdict(s["fit"]))
    return 0 if s["fit"]["fits"] else 1


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate", help="build every rank class of a parallel layout on a fake process group: memory and traffic",
        description="Build the real shards of each distinct rank of a layout on torch's fake process group and the "
                    "meta device, and report per rank the parameters, gradient and optimizer bytes, process groups "
                    "and the collectives of one training step, and per layer type the activation bytes "
                    "(see mimo_train/planning/simulate.py).")
    p.add_argument("--config", required=True, help="a model YAML (configs/model/*.yaml) or a training YAML")
    p.add_argument("--gpus", type=int, default=None, help="world size (default: the layout's)")
    p.add_argument("--layout", default="", help="keys of parallel.*, e.g. tp=2,pp=16,cp=4,dp=4,ep=8,"
                                                "pp_schedule=dualpipev,pp_virtual=2 (default: plan's top pick)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100",
                   help="the GPU type of the fit verdict (exit 1 when the worst rank does not fit), and of plan's "
                        "top pick without --layout (default h100)")
    p.add_argument("--seq", type=int, default=32768, help="sequence length (default 32768)")
    p.add_argument("--global-batch", type=int, default=None, help="sequences per step (default 2^26 tokens / seq)")
    p.add_argument("--mtp-blocks", type=int, default=1, help="MTP blocks (default 1, as plan; -1: the config's)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16",
                   help="weights/gradients/optimizer precision to account for (default bf16, as train.precision)")
    p.add_argument("--ranks", choices=("classes", "all"), default="classes",
                   help="classes: first and last rank of each pipeline stage; all: every rank")
    p.add_argument("--no-activations", action="store_true", help="skip the per-layer activation measurement")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="model overrides, e.g. model.num_layers=24")
    p.set_defaults(func=run_simulate)
    return p
