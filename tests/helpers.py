"""Shared test fixtures: tiny models with every parameter and buffer randomised (so parity checks can fail)."""

from __future__ import annotations

import torch

from mimo_train.config import load_model_config
from mimo_train.model import MiMoForCausalLM


def tiny_model_config(**overrides):
    return load_model_config("configs/model/mimo_tiny.yaml", [f"model.{k}={v}" for k, v in overrides.items()])


def randomised_model(cfg, seed: int = 0) -> MiMoForCausalLM:
    """A model whose weights, norms, sinks and expert correction biases are all random and nonzero."""
    model = MiMoForCausalLM(cfg)
    model.init_weights(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # larger weights than the init make the logits (and any mismatch) large
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))
    return model
