"""The MiMo training objective of one micro-batch: LM + w_mtp * mean over MTP depths + alpha * sequence-balance
loss, every term normalised by a count over the whole global batch, so micro-batch, data-parallel and pipeline
splits do not change it. Both step loops (`mimo_train.training.forward_backward` and the pipeline schedule in
`parallel.pipeline`) read it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The parts vector (float64 [2 + depths] on the device) holds one rank's share of each normalised loss term, so
# the step sums all of them over ranks with one collective and reads them with its one host sync. Its layout:
LM_PART = 0  # the LM loss
AUX_PART = 1  # the sequence-balance loss (already weighted by its coefficient)
MTP_PARTS_START = 2  # the MTP loss of depth 1..K, in order


@dataclass
class LossSpec:
    mtp_weight: float
    aux_coeff: float
    global_batch_size: int  # sequences: the balance loss is a mean over sequences
    lm_tokens: torch.Tensor  # tokens with an LM target in the global batch
    mtp_tokens: torch.Tensor  # [depths] tokens with a target at each MTP depth


@dataclass
class StepResult:
    parts: torch.Tensor  # this rank's share of each loss term (the layout above)
    expert_counts: torch.Tensor | None  # [moe layers, E] tokens this rank routed to each expert


def micro_batch_loss(out, spec: LossSpec):
    """The scalar to backpropagate for one micro-batch, and its parts for logging."""
    lm = out.lm_loss_sum / spec.lm_tokens
    mtp_terms = [s / n for s, n in zip(out.mtp_loss_sums, spec.mtp_tokens)]
    mtp = torch.stack(mtp_terms).mean() if mtp_terms else lm.new_zeros(())
    aux = spec.aux_coeff * out.aux_loss_sum / spec.global_batch_size
    parts = torch.stack([lm, aux, *mtp_terms]).detach().double()  # in the layout above; no host sync
    return lm + spec.mtp_weight * mtp + aux, parts


def empty_parts(spec: LossSpec, device) -> torch.Tensor:
    return torch.zeros(MTP_PARTS_START + len(spec.mtp_tokens), dtype=torch.float64, device=device)


@dataclass(frozen=True)
class LossValues:
    """A step's loss terms on the host, read from a parts vector summed over ranks."""

    lm: float
    aux: float
    mtp_depths: list[float]

    @classmethod
    def of(cls, parts: list[float]) -> LossValues:
        return cls(parts[LM_PART], parts[AUX_PART], parts[MTP_PARTS_START:])

    @property
    def mtp_mean(self) -> float:
        return sum(self.mtp_depths) / len(self.mtp_depths) if self.mtp_depths else 0.0

    def total(self, mtp_weight: float) -> float:
        """The objective: LM + w_mtp * mean over MTP depths + balance loss."""
        return self.lm + mtp_weight * self.mtp_mean + self.aux
