"""Differentiable collectives, Megatron style: each forward collective has the matching backward collective.

They run on any backend (gloo on CPU, NCCL on GPU): only `all_reduce`, the flat-tensor all-gather and
reduce-scatter, and `all_to_all_single` with split sizes are used, the forms that gloo runs (and that the fake
backend of `mimo-train simulate` records). A group of size 1 makes every op the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


# torch 2.13 renamed the flat-tensor collectives (`all_gather_into_tensor` -> `all_gather_single`, `reduce_scatter_tensor`
# -> `reduce_scatter_single`) and warns on every call of the old names; torch 2.11 has only the old ones. Looked up
# at each call, so that a test can wrap `torch.distributed.<name>`.
ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"


def all_gather_flat(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """`out` = the concatenation of every rank's `x` along dim 0 (torch's all_gather_into_tensor)."""
    return getattr(dist, ALL_GATHER)(out, x, group=group, async_op=async_op)


def reduce_scatter_flat(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """`out` = this rank's dim-0 slice of the sum of every rank's `x` (torch's reduce_scatter_tensor)."""
    return getattr(dist, REDUCE_SCATTER)(out, x, group=group, async_op=async_op)


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))
    all_gather_flat(out, x, group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    x = x.movedim(dim, 0).contiguous()
    if x.shape[0] % n:
        raise ValueError(f"reduce-scatter: size {x.shape[0]} along dim {dim} is not divisible by the group size {n}")
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    reduce_scatter_flat(out, x, group)
    return out.movedim(0, dim)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"split: size {x.shape[dim]} along dim {dim} is not divisible by the group size {n}")
    return x.chunk(n, dim=dim)[dist.get_rank(group)].contiguous()


class _CopyToRegion(torch.autograd.Function):
    """Identity forward, all-reduce backward: the input of column-parallel layers without sequence parallelism."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce forward, identity backward: partial sums whose consumer is replicated on every rank."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromSequence(torch.autograd.Function):
    """All-gather along `dim` forward, reduce-scatter backward (entering a tensor-parallel region under SP)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.dim, ctx.group), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Reduce-scatter along `dim` forward, all-gather backward (leaving a row-parallel layer under SP)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.dim, ctx.group), None, None


class _ScatterToSequence(torch.autograd.Function):
    """Keep this rank's chunk along `dim` forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.dim, ctx.group), None, None


class _AllGatherNoReduce(torch.autograd.Function):
    """All-gather along `dim` forward; backward keeps this rank's chunk (the consumer is replicated per rank)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.dim, ctx.group), None, None


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows; the backward sends the gradients back along the reversed splits."""

    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, g):
        return _all_to_all(g, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def _all_to_all(x, output_splits, input_splits, group):
    if group_size(group) == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


def copy_to_region(x, group):
    return _CopyToRegion.apply(x, group) if group_size(group) > 1 else x


def reduce_from_region(x, group):
    return _ReduceFromRegion.apply(x, group) if group_size(group) > 1 else x


def gather_from_sequence(x, dim, group):
    return _GatherFromSequence.apply(x, dim, group) if group_size(group) > 1 else x


def reduce_scatter_to_sequence(x, dim, group):
    return _ReduceScatterToSequence.apply(x, dim, group) if group_size(group) > 1 else x


def scatter_to_sequence(x, dim, group):
    return _ScatterToSequence.apply(x, dim, group) if group_size(group) > 1 else x


def all_gather_replicated(x, dim, group):
    return _AllGatherNoReduce.apply(x, dim, group) if group_size(group) > 1 else x


def all_to_all(x, output_splits, input_splits, group):
    return _AllToAll.apply(x, output_splits, input_splits, group) if group_size(group) > 1 else x


def all_to_all_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """Exchange equal-size blocks of integers (no gradient): block i goes to rank i."""
    if group_size(group) == 1:
        return counts
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out
