"""Routed experts through one grouped GEMM per projection (`torch._grouped_mm`), with no host-side list.

Rows arrive sorted by expert; the group offsets are the cumulative row counts, computed on the device (int32).
The weights stay stored as the reference stores them ([E, 2I, H] and [E, H, I]); the GEMM sees them through
transposed views. `grouped_mm(x, w, offs)` is the one place the GEMM is called, so a quantised grouped GEMM with
the same signature (blockwise FP8) can replace it.

Rows past the last offset (none on the single-process path; possible when a caller pads) and experts that received
no row are handled explicitly: their outputs and gradients are exactly zero (rows past the last
offset hold garbage on the CPU, and empty experts have given NaN or non-zero gradients on some GPUs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mimo_train.model.layers import Experts


def _rows_in_groups(n: int, offs: torch.Tensor) -> torch.Tensor:
    """[n, 1] bool: the row lies before the last offset (belongs to some group)."""
    return (torch.arange(n, device=offs.device) < offs[-1]).unsqueeze(-1)


def _non_empty(offs: torch.Tensor) -> torch.Tensor:
    """[E, 1, 1] bool: the group has at least one row."""
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    return (counts > 0).view(-1, 1, 1)


def _mm(a, b, offs):
    return torch._grouped_mm(a, b, offs=offs)


class _GroupedMM(torch.autograd.Function):
    """y[rows of group e] = x[rows of group e] @ w[e].T; explicit backward, so empty groups and rows past the last
    offset get exact zeros whatever the kernel leaves there."""

    @staticmethod
    def forward(ctx, x, w, offs):
        y = _mm(x, w.transpose(-2, -1), offs)
        y = torch.where(_rows_in_groups(x.shape[0], offs), y, 0)
        ctx.save_for_backward(x, w, offs)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        inside = _rows_in_groups(x.shape[0], offs)
        dy = torch.where(inside, dy, 0).contiguous()
        dx = torch.where(inside, _mm(dy, w, offs), 0) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            # [N_out, N] x [N, K] with groups along N -> [E, N_out, K]
            dw = torch.where(_non_empty(offs), _mm(dy.t(), x, offs), 0)
        return dx, dw, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [N, K] rows sorted by group, w [E, N_out, K] (the stored layout), offs int32 [E] cumulative ends ->
    [N, N_out]. On CPU the grouped GEMM runs in fp32 eager (and bf16); compiled it needs bf16."""
    return _GroupedMM.apply(x, w, offs)


def group_offsets(tokens_per_expert: torch.Tensor | list[int], device) -> torch.Tensor:
    """int32 cumulative row counts on the device (a host list, under expert parallelism, is copied up)."""
    if not isinstance(tokens_per_expert, torch.Tensor):
        tokens_per_expert = torch.tensor(tokens_per_expert, dtype=torch.int64)
    return torch.cumsum(tokens_per_expert.to(device), 0, dtype=torch.int32)


class GroupedExperts(Experts):
    """SwiGLU experts as two grouped GEMMs; the same parameters (names, layout) as the reference. `gemm` is the
    grouped GEMM (`grouped_mm`'s signature); a quantised one is set on an instance from outside (FP8)."""

    gemm = staticmethod(grouped_mm)

    def forward(self, x_sorted, tokens_per_expert):
        if x_sorted.shape[0] == 0:  # no row for any local expert (expert parallelism): stay in the autograd graph,
            # so the backward of the return all-to-all runs on this rank too
            return x_sorted.new_zeros(0, self.down_proj.shape[1]) + 0 * x_sorted.sum()
        offs = group_offsets(tokens_per_expert, x_sorted.device)
        gate, up = self.gemm(x_sorted, self.gate_up_proj, offs).chunk(2, dim=-1)
        return self.gemm(F.silu(gate) * up, self.down_proj, offs)
