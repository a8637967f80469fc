"""Section 7: a reduced-depth, full-width model (configs/model/mimo_v2_flash.yaml with 4 layers: GA+dense, SWA+MoE x3,
32 experts top-8, one MTP block, the full vocabulary) trained for 20 steps on one GPU, bf16 and FP8.

The step is the trainer's own pieces without its data pipeline and checkpointing (which import webdataset and the
distributed optimizer): `build_parallel_model` (FP8 and recompute applied as the trainer applies them), bf16
parameters with fp32 main gradients (`parallel.mixed_precision.MainGradients`), `mimo_train.training.forward_backward` with
the MiMo loss, gradient clipping and AdamW on fp32 master weights. The batch is one fixed sequence of random tokens,
so the loss must fall fast (the model memorises it): a check that the whole step learns. Reported: the losses, the
median step time after the first two steps, tokens/s and MFU (the model's training FLOPs from `model_report`,
against the H200's bf16 peak).
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.gpu.harness import Harness
from bench.gpu.layer import KERNEL_BACKEND

STEPS = 20
ONE_DOCUMENT_BOUND = 2


def reduced_config(smoke: bool):
    from mimo_train.config import CONFIG_ROOT, load_model_config

    if smoke:
        return load_model_config(CONFIG_ROOT / "model/mimo_tiny.yaml", ["model.num_layers=4"])
    return load_model_config(CONFIG_ROOT / "model/mimo_v2_flash.yaml", ["model.num_layers=4", "model.num_experts=32",
                                                                    "model.mtp.num_blocks=1"])


def synthetic_batch(vocab_size: int, rows: int, seq: int, device, seed: int) -> dict:
    """Random tokens, one document per row, as a micro-batch of the data stream (no data pipeline: it needs
    packages a bare GPU machine lacks). Like the stream's batches it carries its document bound: ids lie in [0, 2)
    (positions 0..S-1 are document 1, id 0 stays empty); without it the varlen tables and kernel grids would be
    sized for S + 1 documents per row."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, vocab_size, (rows, seq + 1), device=device, generator=gen)
    positions = torch.arange(seq, device=device).expand(rows, seq).contiguous()
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": positions,
            "max_documents": ONE_DOCUMENT_BOUND}


def build_model(cfg, precision: str, recompute: str, device):
    from mimo_train.config import ParallelConfig
    from mimo_train.precision import PRECISIONS
    from mimo_train.model import MiMoForCausalLM
    from parallel.kernels import get_spec
    from parallel.parallelize import build_parallel_model
    from parallel.topology import Topology

    with torch.device("meta"):
        model = MiMoForCausalLM(cfg, spec=get_spec(KERNEL_BACKEND))
    build_parallel_model(model, Topology(), ParallelConfig(backend=KERNEL_BACKEND, recompute=recompute),
                         fp8=PRECISIONS[precision].fp8_gemms)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # initialised on the device (the trainer's CPU streams per name would take minutes)
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, cfg.init_std, generator=gen)
    model.reset_buffers()
    return model


class MixedPrecisionAdamW:
    """AdamW on fp32 masters of bf16 parameters whose fp32 gradients are `main_grad` (the trainer's bf16 recipe,
    single process)."""

    def __init__(self, model, lr: float, clip: float = 1.0):
        from parallel.mixed_precision import MainGradients, cast_parameters

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p.detach().float().clone() for p in self.params]
        cast_parameters(model, torch.bfloat16)
        self.main_grads = MainGradients(model)
        self.inner = torch.optim.AdamW(self.masters, lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                                       fused=self.masters[0].is_cuda)
        self.clip = clip

    def step(self) -> float:
        for master, p in zip(self.masters, self.params):
            master.grad = p.main_grad
        norm = torch.nn.utils.clip_grad_norm_(self.masters, self.clip)
        self.inner.step()
        with torch.no_grad():
            for master, p in zip(self.masters, self.params):
                p.copy_(master)
        self.main_grads.zero()
        return float(norm)


def run(h: Harness) -> None:
    from mimo_train.model.info import model_report
    from mimo_train.hardware import GPUS

    cfg = reduced_config(h.smoke)
    seq = h.pick(4096, 64)
    flops_per_step = model_report(cfg, seq)["flops_per_token"]["total"] * seq
    peak = GPUS["h200"].peak_tflops * 1e12
    for precision in ("bf16", "fp8"):
        losses, times = _train(h, cfg, precision, seq)
        step = statistics.median(times[2:])
        falls = losses[-1] < losses[0] - 1.0
        h.result("train", precision=precision, backend=KERNEL_BACKEND, layers=cfg.num_layers, experts=cfg.num_experts,
                 seq=seq, steps=STEPS, first_loss=losses[0], last_loss=losses[-1], loss_falls=falls,
                 step_ms=step * 1e3, tokens_per_s=seq / step, mfu=flops_per_step / step / peak)
        if h.smoke and not falls:
            raise AssertionError(f"train {precision}: the loss did not fall by 1 nat in {STEPS} steps: {losses}")


def _train(h: Harness, cfg, precision: str, seq: int):
    from mimo_train.model.loss import LM_PART, LossSpec
    from mimo_train.training.forward_backward import forward_backward

    model = build_model(cfg, precision, "none", h.device)
    optimizer = MixedPrecisionAdamW(model, lr=h.pick(1e-3, 3e-3))
    batch = synthetic_batch(cfg.vocab_size, 1, seq, h.device, seed=1)
    counts = model.count_targets(batch["labels"], batch["position_ids"])
    spec = LossSpec(mtp_weight=0.3, aux_coeff=1e-5, global_batch_size=1, lm_tokens=counts[0], mtp_tokens=counts[1:])
    losses, times = [], []
    for _ in range(STEPS):
        start = time.perf_counter()
        result = forward_backward(model, [batch], spec)
        optimizer.step()
        h.sync()
        times.append(time.perf_counter() - start)
        losses.append(float(result.parts[LM_PART]))
    del model, optimizer
    if h.cuda:
        torch.cuda.empty_cache()
    return losses, times
