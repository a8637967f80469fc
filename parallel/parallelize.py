"""Turn a plain model (built identically on every rank) into this rank's shard of a parallel layout.

Besides swapping in the tensor-, sequence- and expert-parallel wrappers, this records for every parameter its
`ParamLayout`: over which group its gradient is summed (the ranks holding a replica that saw other tokens) and how
it is sliced from the full tensor. Both come from the sharding plan (`parallel/sharding.py`), asked once per
parameter name: the wrappers cut the slice it names and the record keeps it. Gradient synchronisation, the sharded
optimizer, the global gradient norm and checkpoints all read these records; the model code itself stays plain.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch.distributed as dist
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
from parallel.sharding import Placement, kv_split, place, rule_of
from parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelCrossEntropySum,
    VocabParallelEmbedding,
)
from parallel.topology import Topology


@dataclass
class ParamLayout:
    """A parameter on this rank: its placement by the sharding plan (`parallel/sharding.py`) and the process
    groups that placement names."""

    placement: Placement
    grad_group: object = None  # the ranks summing its gradient (kind `grad_kind`)
    gather_group: object = None  # the ranks holding its slices in order (kind `gather_kind`), if sliced
    # Pipeline: the embedding's copies on the first and last stage are one parameter; their gradients are summed
    # over `tied_group` first, and only the first stage's copy counts in the gradient norm.
    tied_group: object = None
    count_in_norm: bool = True

    def __getattr__(self, name: str):
        """The placement's fields (grad_kind, dim, index, num_slices, gather_kind, replicas) read through: the
        optimizer, the checkpoint views and the initialiser read them here."""
        if name in _PLACEMENT_FIELDS:
            return getattr(self.placement, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


_PLACEMENT_FIELDS = frozenset(f.name for f in fields(Placement))


def parallelize(model: MiMoForCausalLM, topo: Topology) -> dict[str, ParamLayout]:
    """Shard `model` in place for `topo`; return {parameter name: layout}. Every slice a wrapper cuts and every
    layout recorded comes from the one placement the sharding plan gives the parameter's name."""
    kv_heads = {name: m.num_kv_heads for name, m in model.named_modules() if isinstance(m, Attention)}

    def where(name: str) -> Placement:
        return place(rule_of(name), tp=topo.tp, tp_rank=topo.rank_in("tp"), ep=topo.ep, ep_rank=topo.rank_in("ep"),
                     kv_heads=kv_heads.get(name.rsplit(".", 2)[0]))

    if topo.tp > 1:
        _shard_tensor_parallel(model, topo, where)
    if topo.cp > 1:
        layout = sequence_layout(topo)
        for module in model.modules():
            if isinstance(module, Attention) and hasattr(module.core, "use_context_parallel"):  # TE's own CP
                group = topo.group("cp")
                module.core.use_context_parallel(group, dist.get_process_group_ranks(group), None)
            elif isinstance(module, Attention):
                module.core = ContextParallelAttention(module.core, layout, topo.group("cp"),
                                                       sliding=module.sliding, window_keys=module.window_keys)
    sequence_group = topo.group("tp_cp") if (topo.tp > 1 or topo.cp > 1) else None
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoE) and not isinstance(child, ExpertParallelMoE):
                setattr(parent, name, ExpertParallelMoE(child, topo.rank_in("ep"), topo.ep, topo.group("ep"),
                                                        sequence_group))

    def layout(name: str) -> ParamLayout:
        p = where(name)
        return ParamLayout(p, topo.group(p.grad_kind), topo.group(p.gather_kind) if p.gather_kind else None)

    return {name: layout(name) for name, _ in model.named_parameters()}


def _shard_tensor_parallel(model: MiMoForCausalLM, topo: Topology, where) -> None:
    """Swap in the tensor- and sequence-parallel wrappers, each cutting the slice `where(parameter name)` gives."""
    tp_group = topo.group("tp")
    m = model.model
    if m.embed_tokens is not None:  # (a pipeline stage may hold neither the embedding nor the head)
        p = where("model.embed_tokens.weight")
        m.embed_tokens = VocabParallelEmbedding(m.embed_tokens, p.index, p.num_slices, tp_group, True)
    if model.lm_head is not None:
        _split_linear(model, "lm_head", where("lm_head.weight"), tp_group)
    model.cross_entropy = VocabParallelCrossEntropySum(tp_group)
    for prefix, module in list(model.named_modules()):
        if isinstance(module, Attention):
            _shard_attention(module, prefix, topo, where)
        elif isinstance(module, DenseMLP):
            for name in ("gate_proj", "up_proj", "down_proj"):
                _split_linear(module, name, where(f"{prefix}.{name}.weight"), tp_group)


def _split_linear(parent: nn.Module, name: str, p: Placement, tp_group) -> None:
    """Replace `parent.<name>` by its tensor-parallel slice `p`: output rows (dim 0, column-parallel) or input
    columns (dim 1, row-parallel)."""
    linear = getattr(parent, name)
    wrapper = ColumnParallelLinear if p.dim == 0 else RowParallelLinear
    setattr(parent, name, wrapper(linear, p.local(linear.weight.shape[p.dim]), tp_group, True))


def sequence_layout(topo: Topology):
    """Which positions of each sequence this rank computes: its context-parallel chunks, or all of them. The
    trainer, the pipeline stages and the evaluator pass it to the model's forward."""
    return ChunkLayout(topo.cp, topo.rank_in("cp")) if topo.cp > 1 else WholeSequence()


def _shard_attention(attn: Attention, prefix: str, topo: Topology, where) -> None:
    """Split the heads: query heads (and their sinks) over tp; KV heads over tp, or replicated when fewer."""
    tp_group = topo.group("tp")
    for name in ("q_proj", "o_proj", "k_proj", "v_proj"):
        _split_linear(attn, name, where(f"{prefix}.{name}.weight"), tp_group)
    if attn.sinks is not None:
        rows = where(f"{prefix}.sinks").local(attn.sinks.shape[0])
        attn.sinks = nn.Parameter(attn.sinks.detach()[rows].clone())
    attn.num_heads, attn.num_kv_heads = attn.num_heads // topo.tp, kv_split(attn.num_kv_heads, topo.tp)[0]


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
