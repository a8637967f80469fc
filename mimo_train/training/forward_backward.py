"""Forward and backward of one optimizer step's micro-batches, with the MiMo loss (`mimo_train.model.loss`:
every term normalised by a count over the whole global batch, `GlobalCounts`). The pipeline-parallel schedule
provides the same function over its stages (see parallel/pipeline.py).

Precision comes from the weights, not from autocast: under `train.precision=bf16` the model's parameters are
bf16, so activations are bf16, and the model itself computes its fp32 islands (router, sink softmax, RMSNorm
statistics, cross-entropy, balance loss). The loss parts stay on the device; the trainer reads them once per step.
"""

from __future__ import annotations

from mimo_train.model.loss import LossSpec, StepResult, empty_parts, micro_batch_loss


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
