"""Megatron-style tensor- and sequence-parallel layers.

Activations are [batch, seq, hidden]. Under sequence parallelism (SP) the norm/residual regions hold a slice of the
sequence (dim 1): a column-parallel layer all-gathers it on entry, a row-parallel layer reduce-scatters on exit,
and the embedding reduce-scatters its vocab-parallel partial sums straight into sequence slices.

Each wrapper takes the full module it replaces and keeps only this rank's shard of the weight, so a model built
identically on every rank (same seed) and then sharded computes exactly what the single-process model computes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data_pipeline.labels import IGNORE_INDEX
from parallel import comm

SEQ_DIM = 1


def _rows(weight: torch.Tensor, rows: slice) -> nn.Parameter:
    return nn.Parameter(weight.detach()[rows].clone())


def _linear_function(linear: nn.Module):
    """The matmul of the wrapped linear: its own (an FP8 linear's, parallel/kernels/fp8.py) or F.linear."""
    return getattr(linear, "linear_function", F.linear)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows. Input: sequence slice (SP) or replicated; output: this rank's columns
    over the full sequence. `rows` selects the output rows this rank keeps (a plain 1/tp split, or the rows of the
    KV heads it needs when KV heads are replicated)."""

    def __init__(self, linear: nn.Linear, rows: slice, group, sequence_parallel: bool):
        super().__init__()
        self.weight = _rows(linear.weight, rows)
        self.linear_function = _linear_function(linear)
        self.group = group
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = comm.gather_from_sequence(x, SEQ_DIM, self.group)
        else:
            x = comm.copy_to_region(x, self.group)
        return self.linear_function(x, self.weight)


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns: input is this rank's columns, partial outputs are summed
    (reduce-scattered into sequence slices under SP)."""

    def __init__(self, linear: nn.Linear, cols: slice, group, sequence_parallel: bool):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach()[:, cols].clone())
        self.linear_function = _linear_function(linear)
        self.group = group
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_function(x, self.weight)
        if self.sequence_parallel:
            return comm.reduce_scatter_to_sequence(y, SEQ_DIM, self.group)
        return comm.reduce_from_region(y, self.group)


class VocabParallelEmbedding(nn.Module):
    """Rows of the embedding table split by vocabulary: each rank looks up the ids in its range, zeros elsewhere,
    and the partial embeddings are summed (into sequence slices under SP)."""

    def __init__(self, embedding: nn.Embedding, rank: int, size: int, group, sequence_parallel: bool):
        super().__init__()
        vocab = embedding.weight.shape[0]
        if vocab % size:
            raise ValueError(f"model.vocab_size={vocab}: must be divisible by parallel.tp={size}")
        per_rank = vocab // size
        self.start, self.end = rank * per_rank, (rank + 1) * per_rank
        self.weight = _rows(embedding.weight, slice(self.start, self.end))
        self.group = group
        self.sequence_parallel = sequence_parallel

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return comm.reduce_scatter_to_sequence(out, SEQ_DIM, self.group)
        return comm.reduce_from_region(out, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of logits split by vocabulary over `group` (Megatron's algorithm, with the group
    passed in rather than read from a global state): the global max and the softmax denominator are reduced over
    the group, and the target's logit comes from the one rank that holds it. Two all-reduces of one fp32 value per
    token (the max; then the target logit and the denominator together), never the [tokens, vocab] logits."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start: int, group):
        logits_max = logits.detach().amax(dim=-1)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        local = target - vocab_start
        elsewhere = (local < 0) | (local >= logits.shape[-1])  # another rank holds this target's logit
        local = local.masked_fill(elsewhere, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(elsewhere, 0.0)
        exp = shifted.exp_()  # shifted is a new tensor: exponentiate in place (the [tokens, V/tp] buffer is large)
        reduced = torch.stack([target_logit, exp.sum(dim=-1)])
        dist.all_reduce(reduced, group=group)
        target_logit, sum_exp = reduced
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, elsewhere)  # this rank's softmax columns
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, local, elsewhere = ctx.saved_tensors
        # d loss / d logits = softmax - one_hot(target), the one-hot on the rank that holds the target (in place:
        # the saved softmax is used once)
        softmax.scatter_add_(-1, local.unsqueeze(-1), (elsewhere.to(softmax.dtype) - 1.0).unsqueeze(-1))
        return softmax.mul_(grad.unsqueeze(-1)), None, None, None


class VocabParallelCrossEntropySum(nn.Module):
    """The model's `CrossEntropySum` over vocab-sharded logits [B, S, V/tp] of the tensor-parallel `group` (this
    rank holds vocabulary rows [rank * V/tp, (rank + 1) * V/tp)). Returns (summed loss, number of labelled tokens).
    It needs nothing but the group: no global parallel state, so it runs on any process group (the fake one of
    `mimo-train simulate` included) and wherever megatron-core is not installed."""

    def __init__(self, group, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.group = group
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, labels: torch.Tensor):
        valid = labels != self.ignore_index
        target = labels.masked_fill(~valid, 0)
        vocab_start = dist.get_rank(self.group) * logits.shape[-1]
        loss = _VocabParallelCrossEntropy.apply(logits.float(), target, vocab_start, self.group) * valid
        return loss.sum(), valid.sum()
