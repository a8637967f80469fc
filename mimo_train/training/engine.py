"""One training rank's engine, built in one place for the trainer and for `mimo-train simulate`, so the two cannot
drift: topology, this rank's shard of the model, the sharded optimizer, the fp32 main gradients and the overlapped
gradient reduction, in the only order that works; and what a step does between the last backward and the update.

The order matters: the optimizer takes its fp32 masters from the fp32 initial values before the model is cast to
bf16, and the gradient-reduction hooks come after the main-gradient hooks (which fold each bf16 gradient first).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from mimo_train.config import ModelConfig, ParallelConfig
from mimo_train.model import MiMoForCausalLM
from mimo_train.precision import precision as precision_named
from parallel.data_parallel import ShardedAdamW, fill_missing_gradients
from parallel.initialize import materialize
from parallel.mixed_precision import MainGradients, cast_parameters
from parallel.parallelize import build_parallel_model, sequence_layout
from parallel.kernels import get_spec
from parallel.topology import build_topology


@dataclass(frozen=True)
class AdamSettings:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1


@dataclass
class Engine:
    topo: Any
    model: MiMoForCausalLM
    layouts: dict
    pipeline: Any  # parallel.pipeline.PipelineRunner, or None
    optimizer: ShardedAdamW
    main_grads: MainGradients | None
    sequence_layout: Any  # the positions of each sequence this rank computes (parallelize.sequence_layout)

    def expect_gradients(self, micro_batches: int) -> None:
        """Before a step's first backward: how many gradients each parameter will receive (for the overlap)."""
        uses = self.pipeline.gradient_uses() if self.pipeline is not None else None
        self.optimizer.expect_gradients(micro_batches, uses)

    def reduce_gradients(self) -> torch.Tensor:
        """After the last backward of a step: every gradient reduced to this rank's rows; the squared global
        gradient norm (float64, on the device)."""
        if self.main_grads is not None:
            self.main_grads.fold_remaining()
        fill_missing_gradients(self.model)
        self.optimizer.reduce_gradients()
        return self.optimizer.grad_norm_squared()

    def update(self, max_norm: float, grad_norm: float) -> None:
        self.optimizer.clip(max_norm, grad_norm)
        self.optimizer.step()


def _after_weight_pass(main_grads: MainGradients, optimizer: ShardedAdamW, stage: torch.nn.Module) -> None:
    """A zero-bubble schedule's weight pass added this micro-batch's weight gradients into `.grad` by hand, running
    no hooks: fold them into the fp32 main gradients now and count them, as the hooks do for every other gradient."""
    for p in main_grads.fold(stage):
        optimizer.gradient_arrived(p)


def build_engine(model_cfg: ModelConfig, p: ParallelConfig, seq_len: int, *, precision: str, adam: AdamSettings,
                 seed: int = 0, device: torch.device | str | None = None, compile: bool = False) -> Engine:
    """Build this rank's engine (collective: every rank calls it). The model is built on the meta device and
    sharded; with a `device`, this rank's slices then get their initial values there, which depend on (seed,
    parameter name) alone, so every layout starts from exactly the single-process weights. Without one (the
    simulator) nothing is allocated. (The model gets its own config: stages change its RoPE base.) `compile`:
    regional torch.compile of each decoder layer (`train.compile`)."""
    prec = precision_named(precision)
    topo = build_topology(p, model_cfg, seq_len)
    torch.manual_seed(seed)
    with torch.device("meta"):  # no rank ever holds the whole model
        model = MiMoForCausalLM(copy.deepcopy(model_cfg), spec=get_spec(p.backend))
    layouts, pipeline = build_parallel_model(model, topo, p, fp8=prec.fp8_gemms, compile=compile)
    if device is not None:
        materialize(model, layouts, seed=seed, device=device)
    optimizer = ShardedAdamW(model, layouts, lr=adam.lr, betas=adam.betas, eps=adam.eps,
                             weight_decay=adam.weight_decay, master_weights=prec.has_masters, bucket_mb=p.grad_bucket_mb)
    main_grads = None
    if prec.has_masters:  # low-precision parameters: fp32 gradients accumulate beside them
        cast_parameters(model, prec.param_dtype)
        main_grads = MainGradients(model)
    if p.overlap_grad_reduce:
        optimizer.overlap_with_backward()
    if pipeline is not None and main_grads is not None:
        pipeline.after_weight_pass = partial(_after_weight_pass, main_grads, optimizer)
    return Engine(topo, model, layouts, pipeline, optimizer, main_grads, sequence_layout(topo))
