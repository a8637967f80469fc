"""Process topology: which ranks form each parallel group.

Two named device meshes cover the same ranks, as in Megatron-Core's parallel folding:

- attention layers: ("pp", "dp", "cp", "tp"), tp varying fastest;
- MoE layers:       ("pp", "edp", "ep", "etp"), etp varying fastest, with edp = dp * cp * tp / (ep * etp).

So within one pipeline stage, the ep ranks of an expert group are consecutive ranks, just like the tp ranks.
A layout is validated against the world size and the model before any process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from mimo_train.config import ConfigError, Layout, ModelConfig, ParallelConfig
from parallel.device import backend_for, resolve_device, use_device
from parallel.pipeline import stage_ranks
from parallel.sharding import kv_grad_kind, kv_split, kv_splits, replicated_kv_heads


def validate_layout(p: ParallelConfig, model: ModelConfig, world_size: int, seq_len: int | None = None) -> None:
    """Every rule a layout must satisfy, each error naming the field and the rule."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    product = p.world_size
    need(product == world_size,
         f"parallel: tp x pp x dp x cp = {p.tp}x{p.pp}x{p.dp}x{p.cp} = {product} must equal the world size {world_size}")
    need(model.num_attention_heads % p.tp == 0,
         f"parallel.tp={p.tp}: must divide model.num_attention_heads ({model.num_attention_heads})")
    for name, kv in (("GA", model.num_key_value_heads), ("SWA", model.swa_num_key_value_heads)):
        need(kv_splits(kv, p.tp),
             f"parallel.tp={p.tp}: must divide the {name} KV heads ({kv}) or be a multiple of them (KV replication)")
    need(model.num_experts % p.ep == 0, f"parallel.ep={p.ep}: must divide model.num_experts ({model.num_experts})")
    need(p.etp == 1, f"parallel.etp={p.etp}: expert-tensor parallelism is not implemented yet (use 1)")
    need((p.dp * p.cp * p.tp) % (p.ep * p.etp) == 0,
         f"parallel.ep x etp = {p.ep * p.etp} must divide dp x cp x tp = {p.dp * p.cp * p.tp} (MoE folding)")
    if p.pp > 1:
        n_stages = p.pp * p.pp_virtual
        need(n_stages <= model.num_layers, f"parallel.pp x pp_virtual = {n_stages} stages: more than the "
             f"{model.num_layers} decoder layers")
        need(not p.pp_layout or sum(p.pp_layout) == model.num_layers,
             f"parallel.pp_layout: the stages hold {sum(p.pp_layout)} layers, the model has {model.num_layers}")
    if seq_len is not None:
        check_sequence_split(p, model, seq_len)


def check_sequence_split(p: ParallelConfig, model: ModelConfig, seq_len: int) -> None:
    """The sequence must split evenly into context-parallel chunks (each at least a window long, so a halo comes
    from one neighbour) and then into sequence-parallel slices."""
    if p.cp > 1:
        if seq_len % (2 * p.cp):
            raise ConfigError(f"train.seq_len={seq_len}: must be divisible by 2 x parallel.cp = {2 * p.cp} "
                              "(context parallelism splits it into head/tail chunk pairs)")
        chunk = seq_len // (2 * p.cp)
        if chunk < model.window_keys - 1:
            raise ConfigError(f"train.seq_len={seq_len}: with parallel.cp={p.cp} a chunk has {chunk} tokens, fewer "
                              f"than the sliding window ({model.window_keys - 1}); use a smaller cp")
    if (seq_len // p.cp) % p.tp:
        raise ConfigError(f"train.seq_len={seq_len}: seq_len / cp must be divisible by parallel.tp={p.tp} "
                          "(sequence parallelism)")


@dataclass
class Topology:
    """The groups of one rank and the layout they form. With a single process every group is None and every degree
    1."""

    rank: int = 0
    layout: Layout = Layout()
    attn_mesh: object = None
    moe_mesh: object = None
    groups: dict = field(default_factory=dict)
    group_ranks: dict = field(default_factory=dict)
    optimizer_meshes: dict = field(default_factory=dict)  # gradient kind -> mesh (see _optimizer_meshes)
    kv_meshes: dict = field(default_factory=dict)  # KV heads -> mesh (see kv_mesh)

    # The degrees are the layout's (`topo.tp` is `topo.layout.tp`).
    tp = property(lambda self: self.layout.tp)
    pp = property(lambda self: self.layout.pp)
    dp = property(lambda self: self.layout.dp)
    cp = property(lambda self: self.layout.cp)
    ep = property(lambda self: self.layout.ep)
    etp = property(lambda self: self.layout.etp)
    edp = property(lambda self: self.layout.edp)
    world_size = property(lambda self: self.layout.world)

    def group(self, name: str):
        """tp, dp, cp, pp, ep, edp, dp_cp (the gradient group of tensor-sharded weights), tp_dp_cp (all ranks of a
        pipeline stage: distinct tokens), tp_cp (the ranks that hold parts of the same sequences)."""
        return self.groups.get(name)

    def rank_in(self, name: str) -> int:
        g = self.groups.get(name)
        return 0 if g is None else dist.get_rank(g)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def kv_mesh(self, num_kv_heads: int):
        """A world mesh whose tp dimension is split into (kv, rep): the ranks holding the distinct KV heads when
        each head is replicated on tp / num_kv_heads ranks (for checkpointing those replicated heads)."""
        return self.kv_meshes[num_kv_heads]


def init_distributed(timeout_s: int = 120, device: str = "auto") -> tuple[int, int]:
    """Join the process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) or Slurm's
    (SLURM_PROCID, SLURM_NTASKS, with MASTER_ADDR/PORT exported by the batch script), on the backend of this
    rank's device (`train.device`: NCCL for CUDA, gloo for the CPU). Returns (rank, world)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    world = int(env.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    rank_device = resolve_device(device)
    use_device(rank_device)
    dist.init_process_group(backend=backend_for(rank_device), timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def checkpoint_group():
    """The process group of background checkpoint writes: a gloo group of every rank, made when the first
    asynchronous save needs it (so a run that never saves asynchronously makes none), or None (the default group)
    on the fake backend, which hosts no gloo group and whose collectives do nothing. Collective."""
    return None if dist.get_backend() == "fake" else dist.new_group(backend="gloo")


def communication_device_type() -> str:
    """The device type the default process group's backend serves: "cuda" under NCCL, "cpu" under gloo (and, for
    other backends such as the fake one of tests, the training device's type)."""
    backend = dist.get_backend() if dist.is_initialized() else "gloo"
    if backend in ("nccl", "gloo"):
        return "cuda" if backend == "nccl" else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _mesh(shape: tuple[int, ...], names: tuple[str, ...]):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(communication_device_type(), shape, mesh_dim_names=names)


def build_topology(p: ParallelConfig, model: ModelConfig, seq_len: int | None = None) -> Topology:
    """Validate the layout against the running world and create its groups (collective: every rank calls it)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    validate_layout(p, model, world, seq_len)
    topo = Topology(rank=dist.get_rank() if world > 1 else 0, layout=p.layout())
    if world == 1:
        return topo
    topo.attn_mesh = _mesh((p.pp, p.dp, p.cp, p.tp), ("pp", "dp", "cp", "tp"))
    topo.moe_mesh = _mesh((p.pp, topo.edp, p.ep, p.etp), ("pp", "edp", "ep", "etp"))
    for name in ("pp", "dp", "cp", "tp"):
        topo.groups[name] = topo.attn_mesh.get_group(name)
    for name in ("edp", "ep"):
        topo.groups[name] = topo.moe_mesh.get_group(name)
    # Flattened groups are built by hand from rank arithmetic (every rank creates every group, same order).
    grid = torch.arange(world).view(p.pp, p.dp, p.cp, p.tp)
    topo.groups["dp_cp"] = _subgroups(grid.permute(0, 3, 1, 2).reshape(-1, p.dp * p.cp), topo.rank, topo.group_ranks, "dp_cp")
    topo.groups["tp_dp_cp"] = _subgroups(grid.reshape(p.pp, -1), topo.rank, topo.group_ranks, "tp_dp_cp")
    # The ranks holding parts of the same sequences: sequence-parallel slices and context-parallel chunks.
    topo.groups["tp_cp"] = _subgroups(grid.permute(0, 1, 2, 3).reshape(-1, p.cp * p.tp), topo.rank, topo.group_ranks, "tp_cp")
    for kv in replicated_kv_heads(_kv_head_counts(model), p.tp):
        topo.groups[kv_grad_kind(kv, p.tp)] = _kv_replica_group(grid, kv, topo)
        topo.kv_meshes[kv] = _mesh((p.pp, p.dp, p.cp, kv, kv_split(kv, p.tp)[1]), ("pp", "dp", "cp", "kv", "rep"))
    topo.groups["tied_embedding"] = _tied_embedding_group(p, model, grid, topo)
    topo.optimizer_meshes = _optimizer_meshes(p, model, topo.edp, grid)
    return topo


def _kv_head_counts(model: ModelConfig) -> tuple[int, int]:
    """The KV heads of the model's layer types (GA, SWA)."""
    return model.num_key_value_heads, model.swa_num_key_value_heads


def _optimizer_meshes(p: ParallelConfig, model: ModelConfig, edp: int, grid: torch.Tensor) -> dict:
    """For each gradient kind, a mesh (pp, slicing dim, gradient-group dim) over which a parameter's optimizer row
    blocks are a DTensor (for checkpoints): the slicing dim splits the parameter as its wrapper does, the gradient
    dim into the row blocks of the sharded optimizer. Rank order along each dim is the order of the process groups
    (ascending), so a rank's coordinate is its rank in the group."""
    from torch.distributed.device_mesh import DeviceMesh

    def mesh(ranks: torch.Tensor, names: tuple[str, ...]):
        return DeviceMesh(communication_device_type(), ranks.contiguous(), mesh_dim_names=names)

    world = grid.numel()
    meshes = {
        "tp_dp_cp": mesh(grid.reshape(p.pp, -1), ("pp", "grad")),
        "dp_cp": mesh(grid.permute(0, 3, 1, 2).reshape(p.pp, p.tp, p.dp * p.cp), ("pp", "slice", "grad")),
        "edp": mesh(torch.arange(world).view(p.pp, edp, p.ep).permute(0, 2, 1), ("pp", "slice", "grad")),
    }
    for kv in replicated_kv_heads(_kv_head_counts(model), p.tp):  # see _kv_replica_group
        rows = grid.view(p.pp, p.dp, p.cp, kv, kv_split(kv, p.tp)[1]).permute(0, 3, 1, 2, 4).reshape(p.pp, kv, -1)
        meshes[kv_grad_kind(kv, p.tp)] = mesh(rows, ("pp", "slice", "grad"))
    return meshes


def _subgroups(rows: torch.Tensor, rank: int, record: dict, name: str):
    mine = None
    for row in rows.tolist():
        g = dist.new_group(row)
        if rank in row:
            mine = g
            record[name] = row
    return mine


def _kv_replica_group(grid: torch.Tensor, num_kv_heads: int, topo: Topology):
    """When tp > KV heads, each KV head lives on tp / KV consecutive tp ranks: the group those ranks form together
    with their dp x cp peers, over which that head's gradients are summed."""
    pp, dp, cp, tp = grid.shape
    rep = kv_split(num_kv_heads, tp)[1]
    rows = grid.view(pp, dp, cp, num_kv_heads, rep).permute(0, 3, 1, 2, 4).reshape(-1, dp * cp * rep)
    return _subgroups(rows, topo.rank, topo.group_ranks, kv_grad_kind(num_kv_heads, tp))


def _tied_embedding_group(p: ParallelConfig, model: ModelConfig, grid: torch.Tensor, topo: Topology):
    """The pair of ranks holding the first stage's and the last stage's copy of the embedding (same dp/cp/tp place),
    or None when there is no second copy: without MTP the last stage does not keep the embedding, and when both
    stages sit on one rank (a V) they share one parameter."""
    if p.pp == 1 or model.mtp.num_blocks == 0 or stage_ranks(p)[-1] == 0:
        return None
    pairs = torch.stack([grid[0].reshape(-1), grid[stage_ranks(p)[-1]].reshape(-1)], dim=1)
    return _subgroups(pairs, topo.rank, topo.group_ranks, "tied_embedding")
