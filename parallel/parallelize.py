"""Turn a plain model (built identically on every rank) into this rank's shard of a parallel layout.

Besides swapping in the tensor-, sequence- and expert-parallel wrappers, this records for every parameter its
`ParamLayout`: over which group its gradient is summed (the ranks holding a replica that saw other tokens) and how
it is sliced from the full tensor. Gradient synchronisation, the sharded optimizer, the global gradient norm and
checkpoints all read these records; the model code itself stays plain.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch.nn as nn

from mimo_train.model import MiMoForCausalLM
from mimo_train.model.transformer import WholeSequence
from mimo_train.model.layers import Attention, DenseMLP, MoE
from parallel.compile import compile_layers
from parallel.context_parallel import ChunkLayout, ContextParallelAttention
from parallel.expert_parallel import ExpertParallelMoE
from parallel.kernels.choice import swap_modules
from parallel.pipeline import PipelineRunner, prune_to_local_stages
from parallel.recompute import apply_recompute
from parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelCrossEntropySum,
    VocabParallelEmbedding,
)
from parallel.topology import Topology


@dataclass
class ParamLayout:
    # Gradient reduction: the kind of group (a fixed order of kinds keeps collectives in lockstep) and the group.
    grad_kind: str
    grad_group: object
    # Slicing: None for a full replica; else this rank holds slice `index` of `num_slices` along `dim`, and the
    # ranks of `gather_group` hold the slices in order, each slice on `replicas` consecutive ranks.
    dim: int | None = None
    index: int = 0
    num_slices: int = 1
    gather_group: object = None
    gather_kind: str | None = None
    replicas: int = 1
    # Pipeline: the embedding's copies on the first and last stage are one parameter; their gradients are summed
    # over `tied_group` first, and only the first stage's copy counts in the gradient norm.
    tied_group: object = None
    count_in_norm: bool = True


# Gradient groups by kind; "kv<n>" is the group of a KV head replicated over tp / n ranks. Every rank walks the
# kinds in this order, so the collectives of different groups never interleave differently on different ranks.
GRAD_KINDS = ("tp_dp_cp", "dp_cp", "kv1", "kv2", "kv4", "kv8", "kv16", "kv32", "kv64", "edp")


def parallelize(model: MiMoForCausalLM, topo: Topology) -> dict[str, ParamLayout]:
    """Shard `model` in place for `topo`; return {parameter name: layout}."""
    tp, tp_group, tp_rank = topo.tp, topo.group("tp"), topo.rank_in("tp")
    sp = tp > 1
    special: dict[int, ParamLayout] = {}  # id(param) -> layout, for everything that is not a full replica

    def sharded(param, dim, index, num, gather_kind, gather_group, grad_kind, grad_group, replicas=1):
        special[id(param)] = ParamLayout(grad_kind, grad_group, dim, index, num, gather_group, gather_kind, replicas)

    if tp > 1:  # (a pipeline stage may hold neither the embedding nor the head)
        m = model.model
        if m.embed_tokens is not None:
            m.embed_tokens = VocabParallelEmbedding(m.embed_tokens, tp_rank, tp, tp_group, sp)
            sharded(m.embed_tokens.weight, 0, tp_rank, tp, "tp", tp_group, "dp_cp", topo.group("dp_cp"))
        if model.lm_head is not None:
            vocab = model.lm_head.weight.shape[0] // tp
            model.lm_head = ColumnParallelLinear(model.lm_head, slice(tp_rank * vocab, (tp_rank + 1) * vocab),
                                                 tp_group, sp)
            sharded(model.lm_head.weight, 0, tp_rank, tp, "tp", tp_group, "dp_cp", topo.group("dp_cp"))
        model.cross_entropy = VocabParallelCrossEntropySum(tp_group)

    for module in list(model.modules()):
        if isinstance(module, Attention) and tp > 1:
            _shard_attention(module, topo, sharded)
        elif isinstance(module, DenseMLP) and tp > 1:
            _shard_mlp(module, topo, sharded)
    if topo.cp > 1:
        layout = sequence_layout(topo)
        for module in model.modules():
            if isinstance(module, Attention) and hasattr(module.core, "use_context_parallel"):  # TE's own CP
                group = topo.group("cp")
                module.core.use_context_parallel(group, dist.get_process_group_ranks(group), None)
            elif isinstance(module, Attention):
                module.core = ContextParallelAttention(module.core, layout, topo.group("cp"),
                                                       sliding=module.sliding, window_keys=module.window_keys)
    sequence_group = topo.group("tp_cp") if (sp or topo.cp > 1) else None
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoE) and not isinstance(child, ExpertParallelMoE):
                ep_moe = ExpertParallelMoE(child, topo.rank_in("ep"), topo.ep, topo.group("ep"), sequence_group)
                setattr(parent, name, ep_moe)
                for p in (ep_moe.experts.gate_up_proj, ep_moe.experts.down_proj):
                    sharded(p, 0, topo.rank_in("ep"), topo.ep, "ep", topo.group("ep"), "edp", topo.group("edp"))

    replicated = ParamLayout("tp_dp_cp", topo.group("tp_dp_cp"))
    return {name: special.get(id(p), replicated) for name, p in model.named_parameters()}


def sequence_layout(topo: Topology):
    """Which positions of each sequence this rank computes: its context-parallel chunks, or all of them. The
    trainer, the pipeline stages and the evaluator pass it to the model's forward."""
    return ChunkLayout(topo.cp, topo.rank_in("cp")) if topo.cp > 1 else WholeSequence()


def _shard_attention(attn: Attention, topo: Topology, sharded) -> None:
    tp, tp_rank, tp_group = topo.tp, topo.rank_in("tp"), topo.group("tp")
    dp_cp = topo.group("dp_cp")
    heads = attn.num_heads // tp
    hd, vd = attn.head_dim, attn.v_head_dim
    attn.q_proj = ColumnParallelLinear(attn.q_proj, slice(tp_rank * heads * hd, (tp_rank + 1) * heads * hd), tp_group, True)
    sharded(attn.q_proj.weight, 0, tp_rank, tp, "tp", tp_group, "dp_cp", dp_cp)
    attn.o_proj = RowParallelLinear(attn.o_proj, slice(tp_rank * heads * vd, (tp_rank + 1) * heads * vd), tp_group, True)
    sharded(attn.o_proj.weight, 1, tp_rank, tp, "tp", tp_group, "dp_cp", dp_cp)
    if attn.sinks is not None:
        attn.sinks = nn.Parameter(attn.sinks.detach()[tp_rank * heads:(tp_rank + 1) * heads].clone())
        sharded(attn.sinks, 0, tp_rank, tp, "tp", tp_group, "dp_cp", dp_cp)

    kv = attn.num_kv_heads
    if kv >= tp:  # plain split of the KV heads
        per, first, num, replicas = kv // tp, tp_rank * (kv // tp), tp, 1
        grad_kind, grad_group = "dp_cp", dp_cp
    else:  # fewer KV heads than ranks: each head is replicated on tp / kv consecutive ranks (Megatron-Bridge refuses)
        replicas = tp // kv
        per, first, num = 1, tp_rank // replicas, kv
        grad_kind, grad_group = f"kv{kv}", topo.group(f"kv{kv}")
    for name, dim in (("k_proj", hd), ("v_proj", vd)):
        layer = ColumnParallelLinear(getattr(attn, name), slice(first * dim, (first + per) * dim), tp_group, True)
        setattr(attn, name, layer)
        sharded(layer.weight, 0, first // per if kv >= tp else first, num, "tp", tp_group, grad_kind, grad_group, replicas)
    attn.num_heads, attn.num_kv_heads = heads, per


def _shard_mlp(mlp: DenseMLP, topo: Topology, sharded) -> None:
    tp, tp_rank, tp_group, dp_cp = topo.tp, topo.rank_in("tp"), topo.group("tp"), topo.group("dp_cp")
    inter = mlp.gate_proj.weight.shape[0] // tp
    cols = slice(tp_rank * inter, (tp_rank + 1) * inter)
    for name in ("gate_proj", "up_proj"):
        layer = ColumnParallelLinear(getattr(mlp, name), cols, tp_group, True)
        setattr(mlp, name, layer)
        sharded(layer.weight, 0, tp_rank, tp, "tp", tp_group, "dp_cp", dp_cp)
    mlp.down_proj = RowParallelLinear(mlp.down_proj, cols, tp_group, True)
    sharded(mlp.down_proj.weight, 1, tp_rank, tp, "tp", tp_group, "dp_cp", dp_cp)


def build_parallel_model(model: MiMoForCausalLM, topo: Topology, p, *, fp8: bool = False, compile: bool = False):
    """Everything a training rank needs: keep this rank's pipeline stages, (FP8 GEMMs), shard them, (recompute,
    compile), tie the embedding copies. Returns (layouts, pipeline runner or None)."""
    local = prune_to_local_stages(model, p, topo.rank_in("pp")) if topo.pp > 1 else None
    swap_modules(model, p.backend, fp8)
    layouts = parallelize(model, topo)
    apply_recompute(model, p.recompute)
    if compile:
        compile_layers(model)
    if local is None:
        return layouts, None
    tied = topo.group("tied_embedding")
    name = "model.embed_tokens.weight"
    if tied is not None and name in layouts:
        holds_first = any(stage == 0 for stage, _ in local)
        layouts[name] = replace(layouts[name], tied_group=tied, count_in_norm=holds_first)
    return layouts, PipelineRunner(model, topo, p, local, sequence_layout(topo))
