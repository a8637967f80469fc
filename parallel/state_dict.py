"""Checkpoint state in global terms: every sharded parameter (and its Adam state) is exposed as a DTensor with its
full shape, every replicated one as a plain tensor, all under the names of the single-process model.

torch.distributed.checkpoint therefore stores one layout-free checkpoint, and loading it under another layout
(or in a single process) reads each rank's slices by offset: resharding comes from DCP, not from a converter.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Shard

from parallel.parallelize import ParamLayout
from parallel.topology import Topology

OPTIM_PREFIX = "optim."
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
MASTER_KEY = "master"  # the fp32 master weight of a bf16 run's parameter


def _mesh_for(layout: ParamLayout, topo: Topology):
    """The ranks holding a sliced parameter's slices in order, as a 1-D mesh, from its placement in the sharding
    plan: the ep ranks (experts), the kv dimension of a replicated KV head's mesh (each slice on `replicas` ranks,
    one of `num_slices` = kv heads), or the tp ranks."""
    placement = layout.placement
    if placement.gather_kind == "ep":
        return topo.moe_mesh["ep"]
    if placement.replicas > 1:
        return topo.kv_mesh(placement.num_slices)["kv"]
    return topo.attn_mesh["tp"]


def globalise(t: torch.Tensor, layout: ParamLayout, topo: Topology) -> torch.Tensor:
    """This rank's slice as a DTensor over the ranks that hold the slices (or the tensor itself if unsliced)."""
    if layout.dim is None or layout.num_slices == 1:
        return t
    return DTensor.from_local(t, _mesh_for(layout, topo), [Shard(layout.dim)], run_check=False)


def globalise_rows(t: torch.Tensor, name: str, opt, layouts: dict[str, ParamLayout], topo: Topology) -> torch.Tensor:
    """This rank's optimizer row block of parameter `name` (see parallel/data_parallel.py) as a DTensor of the
    parameter's global shape: split like the parameter over the slicing ranks, then into row blocks over its
    gradient group."""
    layout, shard = layouts[name], opt.shards[name]
    sliced = layout.dim is not None and layout.num_slices > 1
    if not sliced and shard.size == 1:
        return t
    global_shape = list(opt.params[name].shape)
    dims, placements = [], []
    if sliced:
        global_shape[layout.dim] *= layout.num_slices
        dims.append("slice")
        placements.append(Shard(layout.dim))
    if shard.size > 1:
        dims.append("grad")
        placements.append(Shard(shard.dim))
    mesh = topo.optimizer_meshes[layout.grad_kind][tuple(dims)]
    stride = torch.empty(global_shape, device="meta").stride()
    return DTensor.from_local(t, mesh, placements, run_check=False, shape=torch.Size(global_shape), stride=stride)


def model_state(model: torch.nn.Module, layouts: dict[str, ParamLayout], topo: Topology) -> dict:
    state = {}
    for name, t in model.state_dict(keep_vars=True).items():
        t = t.detach()
        state[name] = globalise(t, layouts[name], topo) if name in layouts else t
    return state


def optimizer_state(opt, layouts: dict[str, ParamLayout], topo: Topology, create: bool = False) -> dict:
    """The Adam state (and, in bf16 runs, the fp32 master weights) of this rank's optimizer rows of every parameter.
    With `create`, empty state is made first (to load into)."""
    state = {}
    for name in opt.owned:
        p = opt.shard_param(name)
        s = opt.inner.state[p]
        if create or not s:
            s.setdefault("step", torch.zeros((), dtype=torch.float32))
            for k in ADAM_KEYS:
                s.setdefault(k, torch.zeros_like(p, memory_format=torch.preserve_format))
        for k in ADAM_KEYS:
            state[f"{OPTIM_PREFIX}{name}.{k}"] = globalise_rows(s[k], name, opt, layouts, topo)
        state[f"{OPTIM_PREFIX}{name}.step"] = s["step"]
        if opt.masters is not None:
            state[f"{OPTIM_PREFIX}{name}.{MASTER_KEY}"] = globalise_rows(p, name, opt, layouts, topo)
    return state


def read_fp32_values_from_saved_place(state: dict, opt, saved_masters: bool) -> None:
    """Point a load (`model_state` and `optimizer_state` of this run) at where the checkpoint keeps each
    parameter's fp32 value when its precision differs from this run's: an fp32 checkpoint's parameters are the
    masters of a bf16/fp8 run (then call `opt.params_from_masters()`), and a bf16/fp8 checkpoint's masters are an
    fp32 run's parameters (not its rounded bf16 parameters). Both entries are DTensors of the global shape, so DCP
    reads each rank's slice or rows under any layout. Adam moments and buffers load as usual."""
    run_masters = opt.masters is not None
    if saved_masters == run_masters:
        return
    for name in opt.owned:
        master = f"{OPTIM_PREFIX}{name}.{MASTER_KEY}"
        if run_masters:
            state["model"][name] = state["optimizer"].pop(master)
        else:
            state["optimizer"][master] = state["model"].pop(name)


def copy_loaded_model_state(model: torch.nn.Module, state: dict) -> None:
    """DCP loads in place into the tensors it was given; parameters were given as themselves (or DTensor views of
    themselves, or their masters' rows), so only buffers that DCP replaced need copying back."""
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, t in state.items():
            local = t.to_local() if isinstance(t, DTensor) else t
            if name in buffers and local.data_ptr() != buffers[name].data_ptr():
                buffers[name].copy_(local)
