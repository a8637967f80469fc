"""Forward and backward of one optimizer step's micro-batches, with the MiMo loss.

loss = LM + w_mtp * mean over MTP depths + alpha * sequence-balance loss, where every term is normalised by a
count over the whole global batch (`GlobalCounts`), so micro-batch and data-parallel splits do not change it.
The pipeline-parallel schedule provides the same function over its stages (see parallel/pipeline.py).

Precision comes from the weights, not from autocast: under `train.precision=bf16` the model's parameters are
bf16, so activations are bf16, and the model itself computes its fp32 islands (router, sink softmax, RMSNorm
statistics, cross-entropy, balance loss). The loss parts stay on the device; the trainer reads them once per step.
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


def forward_backward(model, micro_batches: list[dict], spec: LossSpec, sequence_layout=None) -> StepResult:
    """`sequence_layout`: the positions this rank computes (context parallelism's chunks; default all)."""
    parts = empty_parts(spec, spec.lm_tokens.device)
    expert_counts = None
    for mb in micro_batches:
        out = model(mb["input_ids"], position_ids=mb["position_ids"], labels=mb["labels"], return_logits=False,
                    sequence_layout=sequence_layout, max_documents=mb.get("max_documents"))
        loss, mb_parts = micro_batch_loss(out, spec)
        loss.backward()
        parts += mb_parts
        if out.expert_counts is not None:
            expert_counts = out.expert_counts if expert_counts is None else expert_counts + out.expert_counts
    return StepResult(parts, expert_counts)
