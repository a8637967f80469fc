"""Training steps of the tiny model on synthetic batches: the trainer's own engine (`mimo_train.training.engine`: topology,
model shard, sharded optimizer, fp32 main gradients, gradient reduction) and step (`forward_backward`, the
global gradient norm, clipping, the update), without its data pipeline, checkpoints or metrics writers, which need
packages a bare GPU machine lacks (numpy, webdataset, tokenizers, wandb). Used by the GPU training tests and, on a
CPU, by the device-environment test (tests/test_device_env.py).
"""

from __future__ import annotations

import math
from datetime import timedelta

import torch
import torch.distributed as dist

from bench.gpu.train import synthetic_batch
from mimo_train.config import CONFIG_ROOT, load_config
from mimo_train.training.engine import AdamSettings, build_engine
from mimo_train.model.loss import LossSpec, LossValues
from mimo_train.training.forward_backward import forward_backward
from parallel import comm

TINY = CONFIG_ROOT / "train" / "tiny_cpu.yaml"
SHAPE = ["train.seq_len=128", "train.global_batch_size=4", "train.micro_batch_size=2"]
COLLECTIVES = ("all_reduce", "broadcast", comm.ALL_GATHER, comm.REDUCE_SCATTER, "all_to_all_single")


def _sum_over(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        t = t.clone()
        dist.all_reduce(t, group=group)
    return t


def train(overrides: list[str], device: torch.device, steps: int = 2):
    """`steps` steps of the tiny model (configs/train/tiny_cpu.yaml with SHAPE and `overrides`) on this rank;
    returns (this rank's model, one record per step: loss, lm_loss, mtp_loss, grad_norm, the GPU memory peak)."""
    cfg = load_config(TINY, [*SHAPE, *overrides])
    t, world = cfg.train, dist.get_world_size() if dist.is_initialized() else 1
    p = cfg.parallel.resolve_dp(world)
    adam = AdamSettings(lr=t.lr, weight_decay=t.weight_decay)
    engine = build_engine(cfg.model, p, t.seq_len, precision=t.precision, adam=adam, seed=t.seed, device=device)
    topo, model = engine.topo, engine.model
    micro = t.global_batch_size // (t.micro_batch_size * p.dp)
    rank = topo.rank_in("dp")
    records = []
    for step in range(steps):
        batches = [synthetic_batch(cfg.model.vocab_size, t.micro_batch_size, t.seq_len, device,
                                   seed=1000 * step + micro * rank + m) for m in range(micro)]
        targets = _sum_over(sum(model.count_targets(b["labels"], b["position_ids"]) for b in batches),
                            topo.group("dp"))
        spec = LossSpec(t.mtp_loss_weight, t.aux_loss_coeff, t.global_batch_size, targets[0], targets[1:])
        engine.expect_gradients(len(batches))
        result = forward_backward(model, batches, spec, sequence_layout=engine.sequence_layout)
        grad_norm = math.sqrt(float(engine.reduce_gradients()))
        parts = _sum_over(result.parts, topo.group("dp_cp")).tolist()
        engine.update(t.clip_grad, grad_norm)
        engine.optimizer.zero_grad()
        losses = LossValues.of(parts)
        records.append({"loss": losses.total(t.mtp_loss_weight), "lm_loss": losses.lm,
                        "mtp_loss": losses.mtp_mean, "grad_norm": grad_norm,
                        "gpu_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                        else None})
    return model, records


def collective_devices(layout: list[str], device: torch.device, monkeypatch) -> list[tuple[str, str]]:
    """(collective, device type) of every tensor handed to a collective during two bf16 steps of a 2-rank
    `layout`, run as rank 0 of the fake process group (its collectives do nothing: the numbers mean nothing)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    seen = []

    def checked(name, real):
        def call(*args, **kwargs):
            seen.extend((name, a.device.type) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
            return real(*args, **kwargs)
        return call

    for name in COLLECTIVES:
        monkeypatch.setattr(dist, name, checked(name, getattr(dist, name)))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2, timeout=timedelta(seconds=60))
    try:
        train([*layout, "train.precision=bf16"], device)
    finally:
        dist.destroy_process_group()
    return seen
