"""The MiMo training objective of one micro-batch: LM + w_mtp * mean over MTP depths + alpha * sequence-balance
loss, every term normalised by a count over the whole global batch, so micro-batch, data-parallel and pipeline
splits do not change it. Both step loops (`mimo_train.training.forward_backward` and the pipeline schedule in
`parallel.pipeline`) read it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossSpec:
    mtp_weight: float
    aux_coeff: float
    global_batch_size: int  # sequences: the balance loss is a mean over sequences
    lm_tokens: torch.Tensor  # tokens with an LM target in the global batch
    mtp_tokens: torch.Tensor  # [depths] tokens with a target at each MTP depth


@dataclass
class StepResult:
    parts: torch.Tensor  # float64 [2 + depths] on the device: this rank's share of (lm, aux, mtp depth 1..K)
    expert_counts: torch.Tensor | None  # [moe layers, E] tokens this rank routed to each expert


def micro_batch_loss(out, spec: LossSpec):
    """The scalar to backpropagate for one micro-batch, and its parts for logging."""
    lm = out.lm_loss_sum / spec.lm_tokens
    mtp_terms = [s / n for s, n in zip(out.mtp_loss_sums, spec.mtp_tokens)]
    mtp = torch.stack(mtp_terms).mean() if mtp_terms else lm.new_zeros(())
    aux = spec.aux_coeff * out.aux_loss_sum / spec.global_batch_size
    parts = torch.stack([lm, aux, *mtp_terms]).detach().double()  # no host sync: read once per step
    return lm + spec.mtp_weight * mtp + aux, parts


def empty_parts(spec: LossSpec, device) -> torch.Tensor:
    return torch.zeros(2 + len(spec.mtp_tokens), dtype=torch.float64, device=device)
