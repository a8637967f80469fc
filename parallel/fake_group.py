"""Tools for running the real parallel code without the machines: a fake process group, a counter of the collectives
it is asked to run, and balanced answers to the few data-dependent reads a training step makes.

- `fake_world(rank, world)`: torch's own fake backend (`torch.testing._internal.distributed.fake_pg`): every
  collective completes at once and moves nothing, so one process can build the shards of rank r of a 2048-GPU job.
- `CollectiveCounter`: a dispatch mode that records each c10d collective with its process group and the bytes one
  rank puts on the wire (the conventions of ring algorithms, see `wire_bytes`).
- `BalancedRouting`: fake (and meta) tensors hold no values, but a step reads a few small integer tensors to the
  host (the tokens per expert, the expert-parallel split sizes). This mode keeps a real shadow of every small
  integer tensor derived from `bincount`, seeded as perfectly balanced routing, so those reads return the split
  sizes of a balanced step on every rank (the same assumption the planner makes).
"""

from __future__ import annotations

import os
import sys
import weakref
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

C10D = torch.ops.c10d


@contextmanager
def fake_world(rank: int, world_size: int):
    """This process as rank `rank` of `world_size` on the fake backend, for the duration of the block."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("fake_world: a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _group(obj):
    return dist.ProcessGroup.unbox(obj) if isinstance(obj, torch.ScriptObject) else obj


def wire_bytes(op: str, buffer_bytes: int, n: int, own_fraction: float | None = None) -> float:
    """Bytes one rank sends for a collective over n ranks on `buffer_bytes` (the whole buffer of the operation: the
    gathered output, the reduced input, the all-reduced tensor, the broadcast tensor, this rank's all-to-all input):
    ring all-gather and reduce-scatter (n - 1) / n of it, ring all-reduce 2 (n - 1) / n, broadcast (n - 1) / n,
    all-to-all all but the rows that stay on this rank, send the tensor."""
    if n <= 1:
        return 0.0
    if op == "all_reduce":
        return 2.0 * buffer_bytes * (n - 1) / n
    if op == "all_to_all":
        return buffer_bytes * (1 - own_fraction if own_fraction is not None else (n - 1) / n)
    if op == "send":
        return float(buffer_bytes)
    return buffer_bytes * (n - 1) / n  # all_gather, reduce_scatter, broadcast


# One process group can serve several roles (torch may reuse a group whose ranks are the same: the EP group is the
# TP group when ep == tp, the CP group when tp == 1 and ep == cp): such a group's name lists its roles joined by
# "+". A forward collective gets the role of the module that issued it (the roles each module's collectives may
# have); a backward one runs from the autograd engine, with no module on the stack, and mirrors the forward in
# reverse order, so it gets the role of the last forward collective on that group whose backward is this op
# (all-gather <-> reduce-scatter, all-to-all <-> all-to-all) not yet mirrored. Any other
# (the optimizer's) gets the first role that is none of the activation roles.
ROLES_OF_MODULE = {"expert_parallel.py": ("ep",), "context_parallel.py": ("cp", "tp_cp"),
                   "tensor_parallel.py": ("tp", "tp_cp"), "pipeline.py": ("pp",)}
_ACTIVATION_ROLES = {r for roles in ROLES_OF_MODULE.values() for r in roles}
MIRROR = {"all_gather": "reduce_scatter", "reduce_scatter": "all_gather"}  # an op -> the op of its backward


def _role_on_stack(roles: list[str]) -> str | None:
    frame = sys._getframe(3)
    while frame is not None:
        allowed = ROLES_OF_MODULE.get(os.path.basename(frame.f_code.co_filename), ())
        match = [r for r in roles if r in allowed]
        if match:
            return match[0]
        frame = frame.f_back
    return None


@dataclass
class Collective:
    op: str
    group: str
    size: int  # ranks in the group
    buffer_bytes: int
    wire_bytes: float


class CollectiveCounter(TorchDispatchMode):
    """Records every c10d collective dispatched while active. `names` maps process groups' `group_name` to a
    readable name (the topology's); others are recorded as "world" (the default group) or "other"."""

    def __init__(self, names: dict[str, str] | None = None):
        super().__init__()
        self.names = dict(names or {})
        self.records: list[Collective] = []
        self._forward_roles: dict[tuple, list[str]] = {}  # (shared group, op): forward roles not yet mirrored

    def _name(self, pg, op: str = "") -> str:
        if pg is None:
            return "world"
        name = _group(pg).group_name
        if name in self.names:
            return self._role(name, op, self.names[name].split("+"))
        return "world" if name == dist.group.WORLD.group_name else "other"

    def _role(self, group: str, op: str, roles: list[str]) -> str:
        if len(roles) == 1:
            return roles[0]
        role = _role_on_stack(roles)
        if role is not None:  # its backward (the mirrored op) will run on this group with the same role
            self._forward_roles.setdefault((group, MIRROR.get(op, op)), []).append(role)
            return role
        pending = self._forward_roles.get((group, op))
        if torch._C._current_autograd_node() is not None and pending:
            return pending.pop()
        return next((r for r in roles if r not in _ACTIVATION_ROLES), roles[0])

    def _record(self, op, pg, buffer_bytes, own_fraction=None):
        g = _group(pg)
        n = g.size()
        self.records.append(Collective(op, self._name(g, op), n, buffer_bytes, wire_bytes(op, buffer_bytes, n,
                                                                                        own_fraction)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d":
            self._observe(func, args)
        return func(*args, **kwargs)

    def _observe(self, func, args) -> None:
        name = func._opname
        if name == "allreduce_":
            self._record("all_reduce", args[1], sum(_nbytes(t) for t in args[0]))
        elif name == "_allgather_base_":
            self._record("all_gather", args[2], _nbytes(args[0]))
        elif name == "_reduce_scatter_base_":
            self._record("reduce_scatter", args[2], _nbytes(args[1]))
        elif name == "alltoall_base_":
            out, inp, pg, _, in_splits = args[:5]
            own = None
            if in_splits:
                me = _group(pg).rank()
                own = in_splits[me] / max(1, sum(in_splits))
            self._record("all_to_all", pg, _nbytes(inp), own)
        elif name == "broadcast_":
            self._record("broadcast", args[1], sum(_nbytes(t) for t in args[0]))
        elif name == "send":
            self._record("send", args[1], sum(_nbytes(t) for t in args[0]))
        elif name in ("recv_", "recv_any_source_", "barrier", "monitored_barrier_"):
            pass  # a receive is the peer's send; barriers move nothing
        else:
            self.records.append(Collective(name, "other", 0, 0, 0.0))

    def by(self, key: str) -> dict[str, float]:
        """Wire bytes summed by `key` ("group" or "op")."""
        out: dict[str, float] = defaultdict(float)
        for r in self.records:
            out[getattr(r, key)] += r.wire_bytes
        return dict(out)


# Integer tensors up to this many elements get a shadow (the expert counts and split sizes are a few hundred).
_SHADOW_LIMIT = 1 << 16


class BalancedRouting(TorchDispatchMode):
    """Answers host reads of fake tensors derived from expert counts as a perfectly balanced routing would.

    `bincount(x, minlength=E)` is seeded with x.numel() rows spread evenly over the E experts; integer ops on
    shadowed inputs are computed on the shadows; an all-to-all of shadowed counts returns, from every source, this
    rank's block (all ranks route alike under balance); `.item()` / `.tolist()` read the shadows."""

    def __init__(self):
        super().__init__()
        self._shadows: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def _get(self, t):
        if not isinstance(t, torch.Tensor):
            return None
        entry = self._shadows.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1]

    def _set(self, t: torch.Tensor, value: torch.Tensor) -> None:
        self._shadows[id(t)] = (weakref.ref(t), value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            shadow = self._get(args[0])
            if shadow is None:
                raise RuntimeError("simulation: a value of a meta tensor was read that balanced routing cannot "
                                   "answer (only expert counts and their split sizes can be)")
            with unset_fake_temporarily():
                return shadow.item()
        if func is C10D.alltoall_base_.default and self._get(args[1]) is not None:
            out = func(*args, **kwargs)
            inp, pg = self._shadows[id(args[1])][1], _group(args[2])
            n, me = pg.size(), pg.rank()
            with unset_fake_temporarily():
                self._set(args[0], inp.view(n, -1)[me].repeat(n).view_as(inp))
            return out
        if func is torch.ops.aten.bincount.default:  # (its output size depends on values: not even fake runs it)
            x = args[0]
            length = max(kwargs.get("minlength", args[2] if len(args) > 2 else 0), 1)
            out = torch.empty(length, dtype=torch.long, device=x.device)
            base, extra = divmod(x.numel(), length)
            with unset_fake_temporarily():
                self._set(out, torch.tensor([base + (1 if e < extra else 0) for e in range(length)]))
            return out
        out = func(*args, **kwargs)
        flat_in, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat_in if isinstance(t, torch.Tensor)]
        if tensors and all(self._get(t) is not None for t in tensors):
            with unset_fake_temporarily():
                real = func(*tree_map(lambda t: self._get(t) if isinstance(t, torch.Tensor) else t, args),
                            **tree_map(lambda t: self._get(t) if isinstance(t, torch.Tensor) else t, kwargs))
            outs, _ = tree_flatten(out)
            reals, _ = tree_flatten(real)
            for o, r in zip(outs, reals):
                if isinstance(o, torch.Tensor) and isinstance(r, torch.Tensor) and o.numel() <= _SHADOW_LIMIT:
                    self._set(o, r)
        return out
