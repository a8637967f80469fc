"""bf16 mixed precision in the design of Megatron-Core's bf16 training with a distributed optimizer.

- The model's parameters are bf16: every matmul and every activation is bf16, with no autocast and no
  per-micro-batch weight casts (nothing but the bf16 weights themselves is saved for backward).
- Each parameter's gradient is accumulated in fp32 (`p.main_grad`) across micro-batches: a hook folds the bf16
  gradient of each backward into it and frees it.
- The fp32 master weights and the Adam moments exist only for the parameters of this rank's optimizer shard
  (`ShardedAdamW(master_weights=True)`); after each step the owner re-casts its masters into the bf16
  parameters and data parallelism broadcasts them.

fp32 stays where the model computes it explicitly: router logits and sigmoid, the expert correction bias (a
buffer), the sink softmax, RMSNorm statistics, the cross-entropy and the balance loss.
"""

from __future__ import annotations

import torch

def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters (not buffers: RoPE frequencies and expert biases stay fp32) to `dtype`, in place."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype != dtype:
                p.data = p.data.to(dtype)


def gradient(p: torch.nn.Parameter) -> torch.Tensor | None:
    """The gradient the optimizer uses: the fp32 main gradient under mixed precision, else `p.grad`."""
    return getattr(p, "main_grad", p.grad)


class MainGradients:
    """fp32 gradient accumulators for low-precision parameters."""

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        for p in self.params:
            p.main_grad = torch.zeros_like(p, dtype=torch.float32)
            p.register_post_accumulate_grad_hook(_fold)

    def fold(self, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Fold the gradients accumulated into `.grad` without the hook (the zero-bubble pipeline schedules add
        weight gradients by hand; the engine calls this after each of their weight passes, so those too are summed
        in fp32 across micro-batches). Returns the parameters folded."""
        folded = [p for p in module.parameters() if hasattr(p, "main_grad") and p.grad is not None]
        for p in folded:
            _fold(p)
        return folded

    def fold_remaining(self) -> None:
        """Fold whatever is left in `.grad` at the end of the backward (nothing, when every path folds)."""
        for p in self.params:
            if p.grad is not None:
                _fold(p)

    def zero(self) -> None:
        for p in self.params:
            p.main_grad.zero_()
            p.grad = None


def _fold(p: torch.nn.Parameter) -> None:
    p.main_grad.add_(p.grad)
    p.grad = None
