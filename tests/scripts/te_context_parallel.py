"""TE's own context parallelism through the `te` cores on two GPUs (torchrun --nproc_per_node 2), against the
whole sequence on one GPU: an SWA + sink layer (cp_comm_type a2a) and a global layer (p2p), forward and backward,
rows of one document each (the only layout TE's thd partition and ours share). Each rank checks its chunks' outputs
and q/k/v gradients, and the sink gradient summed over the ranks; prints "context parallel ok" when all hold."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel.context_parallel import ChunkLayout
from parallel.kernels import get_spec
from mimo_train.model.kernels.metadata import AttentionMetadata
from parallel.kernels.te import TEAttentionCore
from parallel.kernels.te_rules import CP_COMM_TYPE, GLOBAL, SLIDING

BF16_REL = 2e-2


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _check(layer_type, rank, layout, group):
    B, S, Hq, Hkv, W = 2, 512, 8, 4 if layer_type == SLIDING else 2, 128
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(B, S, h, 192, generator=g) for h in (Hq, Hkv))
    v, sink = torch.randn(B, S, Hkv, 128, generator=g), torch.randn(Hq, generator=g)
    q, k, v, sink = (t.cuda() for t in (q, k, v, sink))
    dout = torch.randn(B, S, Hq, 128, generator=g).cuda()
    use_sink = layer_type == SLIDING

    def run(core, tensors, meta, d):
        leaves = [t.clone().bfloat16().requires_grad_() for t in tensors]
        s = sink.clone().requires_grad_() if use_sink else None
        out = core(*leaves, meta, sink=s)
        (out.float() * d).sum().backward()
        return out, [t.grad for t in leaves], s.grad if use_sink else None

    ref_core = get_spec("fused").attention_core(layer_type, window_keys=W, scale=192 ** -0.5)
    ref_out, ref_grads, ref_dsink = run(ref_core, (q, k, v), AttentionMetadata(None, B, S, "cuda"), dout)
    core = TEAttentionCore(layer_type, W, 192 ** -0.5)
    core.use_context_parallel(group, dist.get_process_group_ranks(group), None)
    local = [layout.local(t) for t in (q, k, v)]
    out, grads, dsink = run(core, local, AttentionMetadata(None, B, S // 2, "cuda"), layout.local(dout))
    errors = [_rel(out, layout.local(ref_out))] + [_rel(a, layout.local(b)) for a, b in zip(grads, ref_grads)]
    if use_sink:
        dist.all_reduce(dsink, group=group)
        errors.append(_rel(dsink, ref_dsink))
    print(f"rank {rank} {layer_type} (cp_comm_type {CP_COMM_TYPE[layer_type]}): "
          f"relative errors {['%.1e' % e for e in errors]}", flush=True)
    assert max(errors) <= BF16_REL, (layer_type, errors)


def main() -> None:
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", timeout=timedelta(seconds=120))
    try:
        group = dist.new_group(list(range(dist.get_world_size())))
        layout = ChunkLayout(dist.get_world_size(), rank)
        for layer_type in (SLIDING, GLOBAL):
            _check(layer_type, rank, layout, group)
        dist.barrier()
        print(f"rank {rank}: context parallel ok", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
