"""Activation recompute (`parallel.recompute`): the same losses and gradients as without it, bitwise in fp32
(the recomputed forward repeats the same operations on the same inputs). Memory: tests/test_planner.py measures
the peak of each mode and checks the planner's estimate of it."""

from __future__ import annotations

import pytest
import torch

from mimo_train.model.transformer import IGNORE_INDEX
from parallel.recompute import apply_recompute
from tests.helpers import randomised_model, tiny_model_config


def _losses_and_grads(model, ids, positions, labels, saved: list | None = None):
    def pack(t):  # bytes autograd keeps for backward, outside recomputed regions
        if saved is not None:
            saved.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, position_ids=positions, labels=labels, return_logits=False)
    loss = out.lm_loss_sum + sum(out.mtp_loss_sums) + out.aux_loss_sum
    loss.backward()
    return [out.lm_loss_sum, *out.mtp_loss_sums, out.aux_loss_sum], {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_bitwise_equal_losses_and_gradients(mode):
    reference = randomised_model(tiny_model_config())
    model = randomised_model(tiny_model_config())  # the same weights (same seed)
    apply_recompute(model, mode)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, reference.cfg.vocab_size, (2, 96), generator=gen)
    # Two packed documents per row: document masks in both attention types.
    positions = torch.cat([torch.arange(40), torch.arange(56)]).expand(2, 96)
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    ref_saved, saved = [], []
    ref_losses, ref_grads = _losses_and_grads(reference, ids, positions, labels, ref_saved)
    losses, grads = _losses_and_grads(model, ids, positions, labels, saved)
    assert sum(saved) < 0.8 * sum(ref_saved)  # recompute really dropped saved activations
    for a, b in zip(losses, ref_losses):
        assert torch.equal(a, b)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name


def test_unknown_mode_is_rejected():
    from mimo_train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="parallel.recompute: must be one of none, selective, full"):
        load_config("configs/train/tiny_cpu.yaml", ["parallel.recompute=some"])
