"""Data parallelism: gradient synchronisation, a ZeRO-1 sharded AdamW, and the true global gradient norm.

Why ZeRO-1 (optimizer-state sharding) and not FSDP/ZeRO-3: in the 309B layouts experts are already split over EP
(EP 64 x PP 16 leaves ~0.3B expert and ~0.4B dense parameters per GPU, under 2 GB in bf16), so parameters and
gradients are small next to activations, while the fp32 master weights and Adam moments (12 bytes per parameter)
are what a replica cannot afford. Sharding only those costs no extra communication per micro-batch; FSDP would
all-gather every layer's weights on every micro-batch for little memory gained. DeepSeek-V3 and Kimi K2 made the
same choice.

ZeRO-1 here shards by parameter: within each gradient group every parameter has one owner rank (greedy balance by
size), which keeps its Adam state and updates it; the owners then broadcast the new values. Gradients are summed
over each parameter's group (the loss is already normalised by global token counts, so a sum, not a mean).
"""

from __future__ import annotations


import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from parallel import comm
from parallel.mixed_precision import gradient
from parallel.parallelize import GRAD_KINDS, ParamLayout


def _by_kind(params: dict[str, torch.nn.Parameter], layouts: dict[str, ParamLayout]):
    """Parameters grouped by gradient kind, in a fixed order of kinds and names (the same on every rank)."""
    unknown = {l.grad_kind for l in layouts.values()} - set(GRAD_KINDS)
    if unknown:
        raise ValueError(f"gradient kinds {unknown} are not in GRAD_KINDS")
    for kind in GRAD_KINDS:
        names = [n for n in params if layouts[n].grad_kind == kind]
        if names:
            yield kind, layouts[names[0]].grad_group, names


def sync_gradients(model: torch.nn.Module, layouts: dict[str, ParamLayout]) -> None:
    """Sum every gradient over the ranks that hold replicas of its parameter (one flat all-reduce per kind)."""
    params = dict(model.named_parameters())
    for name, layout in layouts.items():  # pipeline: the first and last stage's embedding copies are one weight
        if layout.tied_group is not None:
            dist.all_reduce(gradient(params[name]), group=layout.tied_group)
    for _, group, names in _by_kind(params, layouts):
        if comm.group_size(group) == 1:
            continue
        grads = [gradient(params[n]) for n in names]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


def fill_missing_gradients(model: torch.nn.Module) -> None:
    """Experts that received no token have no gradient; give them zeros so every rank and step treats them alike.
    (fp32 main gradients always exist.)"""
    for p in model.parameters():
        if p.requires_grad and gradient(p) is None:
            p.grad = torch.zeros_like(p)


class ShardedAdamW:
    """AdamW (decoupled weight decay; none on vectors) whose state lives on one owner rank per parameter.

    With `master_weights` (bf16 training) the owner keeps an fp32 master copy of each of its parameters, taken
    when the optimizer is built (so build it before casting the model to bf16); Adam updates the masters from
    the fp32 main gradients, and the parameters are re-cast from them after each step."""

    def __init__(self, model: torch.nn.Module, layouts: dict[str, ParamLayout], *, lr: float, betas, eps: float,
                 weight_decay: float, master_weights: bool = False):
        self.params = dict(model.named_parameters())
        self.layouts = layouts
        self.owner: dict[str, int] = {}  # name -> owner's rank within the parameter's gradient group
        for _, group, names in _by_kind(self.params, layouts):
            size = comm.group_size(group)
            load = [0] * size
            for n in sorted(names, key=lambda n: (-self.params[n].numel(), n)):
                j = min(range(size), key=lambda r: (load[r], r))
                self.owner[n] = j
                load[j] += self.params[n].numel()
        self.owned = [n for n in self.params if self._owns(n)]
        self.masters = ({n: self.params[n].detach().float().clone() for n in self.owned} if master_weights
                        else None)
        decay = [self.shard_param(n) for n in self.owned if self.params[n].ndim >= 2]
        no_decay = [self.shard_param(n) for n in self.owned if self.params[n].ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # foreach=False: the per-tensor update is elementwise identical however parameters are distributed.
        self.inner = torch.optim.AdamW([g for g in groups if g["params"]] or [{"params": []}], lr=lr, betas=betas,
                                       eps=eps, foreach=False)

    def shard_param(self, name: str) -> torch.Tensor:
        """The tensor Adam updates for an owned parameter: its fp32 master, or the parameter itself."""
        return self.masters[name] if self.masters is not None else self.params[name]

    def _owns(self, name: str) -> bool:
        group = self.layouts[name].grad_group
        return self.owner[name] == (0 if comm.group_size(group) == 1 else dist.get_rank(group))

    def set_lr(self, lr: float) -> None:
        for g in self.inner.param_groups:
            g["lr"] = lr

    def grad_norm_squared(self) -> torch.Tensor:
        """The squared global L2 norm (float64, on the device: no host sync): each gradient element is counted
        once, on its owner, then summed over all ranks."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for n in self.owned:
            g = gradient(self.params[n])
            if g is not None and self.layouts[n].count_in_norm:
                sq += g.double().pow(2).sum()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sq)
        return sq

    def clip(self, max_norm: float, norm: float) -> None:
        if max_norm > 0 and norm > max_norm:
            coef = max_norm / (norm + 1e-6)
            for n in self.owned:
                gradient(self.params[n]).mul_(coef)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def step(self) -> None:
        if self.masters is None:
            self.inner.step()
        else:
            for n in self.owned:
                self.masters[n].grad = gradient(self.params[n])
            self.inner.step()
            with torch.no_grad():
                for n in self.owned:
                    self.masters[n].grad = None
                    self.params[n].copy_(self.masters[n])
        self._broadcast_updates()

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None
            if hasattr(p, "main_grad"):
                p.main_grad.zero_()

    def _broadcast_updates(self) -> None:
        for _, group, names in _by_kind(self.params, self.layouts):
            size = comm.group_size(group)
            if size == 1:
                continue
            for j in range(size):
                mine = [self.params[n] for n in names if self.owner[n] == j]
                if not mine:
                    continue
                flat = _flatten_dense_tensors([p.detach() for p in mine])
                dist.broadcast(flat, src=dist.get_global_rank(group, j), group=group)
                with torch.no_grad():
                    for p, new in zip(mine, _unflatten_dense_tensors(flat, mine)):
                        p.copy_(new)
