"""Run under torchrun (2 gloo ranks): our VocabParallelCrossEntropySum on vocab-sharded logits against the
unsharded cross-entropy and against megatron-core's vocab-parallel kernel (its parallel state initialised to the
same group): loss sums and logits gradients. Prints OK on success."""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.tensor_parallel import VocabParallelCrossEntropySum


def main() -> int:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same full logits and labels on every rank
    B, S, V = 2, 7, 24
    logits = torch.randn(B, S, V, dtype=torch.float64).float() * 4
    labels = torch.randint(0, V, (B, S))
    labels[0, :2] = -100  # ignored positions
    dy = 0.5 + torch.rand(())  # a gradient of the sum other than 1
    shard = V // world
    mine = logits[..., rank * shard:(rank + 1) * shard].clone().requires_grad_()
    loss, count = VocabParallelCrossEntropySum(dist.group.WORLD)(mine, labels)
    (loss * dy).backward()

    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full.view(-1, V), labels.view(-1), ignore_index=-100, reduction="sum")
    (ref * dy).backward()
    assert int(count) == int((labels != -100).sum()), count
    assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-5), (loss.item(), ref.item())
    assert torch.allclose(mine.grad, full.grad[..., rank * shard:(rank + 1) * shard], atol=1e-6)

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    theirs = mine.detach().clone().requires_grad_()
    valid = labels != -100
    per_token = vocab_parallel_cross_entropy(theirs.transpose(0, 1).contiguous(),
                                             labels.masked_fill(~valid, 0).transpose(0, 1).contiguous())
    meg = (per_token.transpose(0, 1) * valid).sum()
    (meg * dy).backward()
    assert torch.allclose(loss, meg, rtol=1e-6, atol=1e-5), (loss.item(), meg.item())
    assert torch.allclose(mine.grad, theirs.grad, atol=1e-6)
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    print(f"OK rank {rank}: loss {loss.item():.6f} (unsharded {ref.item():.6f}, megatron {meg.item():.6f})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
