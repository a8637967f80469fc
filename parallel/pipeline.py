"""Pipeline parallelism through torch.distributed.pipelining.

The decoder layers are split into stages (`parallel.pp_layout`, or an even split), placed on the pp ranks either
in a loop (1F1B: one stage per rank; interleaved 1F1B: `pp_virtual` stages per rank, stage s on rank s mod pp)
or in a V (ZBV zero-bubble and DualPipeV: rank r holds stages r and 2pp - 1 - r). The first stage embeds the
tokens; the last applies the final norm, the LM head, the losses and the MTP blocks. MTP reads token embeddings,
so the last stage keeps a copy of the embedding whose gradients are summed with the first stage's (and which
is the same parameter when both stages sit on one rank, as in a V).

Every stage receives the micro-batch's token ids, positions and labels as keyword arguments (all ranks read the
same micro-batches), so only hidden states travel between stages. The balance loss of each stage's MoE layers
is attached to the stage's output hidden state and enters the backward when that state's gradient arrives (the
trick Megatron-Core uses), so every stage's aux loss is in the total. Losses are normalised by global counts, so
the schedules run with scale_grads=False.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from mimo_train.config import ConfigError, ModelConfig, ParallelConfig
from mimo_train.model.loss import AUX_PART, LossSpec, StepResult, empty_parts, micro_batch_loss

SCHEDULES = {
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zbv": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}


def stage_layers(p: ParallelConfig, model: ModelConfig) -> list[list[int]]:
    """The decoder-layer indices of each stage."""
    n_stages = p.pp * p.pp_virtual
    counts = list(p.pp_layout)
    if not counts:
        base, extra = divmod(model.num_layers, n_stages)
        counts = [base + (1 if s < extra else 0) for s in range(n_stages)]
    if sum(counts) != model.num_layers:
        raise ConfigError(f"parallel.pp_layout: the stages hold {sum(counts)} layers, the model has {model.num_layers}")
    stages, first = [], 0
    for n in counts:
        stages.append(list(range(first, first + n)))
        first += n
    return stages


def stage_ranks(p: ParallelConfig) -> list[int]:
    """The pp rank of each stage."""
    n_stages = p.pp * p.pp_virtual
    if p.pp_schedule in ("zbv", "dualpipev"):
        return [s if s < p.pp else 2 * p.pp - 1 - s for s in range(n_stages)]
    return [s % p.pp for s in range(n_stages)]


class _AttachLoss(torch.autograd.Function):
    """Identity on the hidden state; its backward also starts the backward of `loss` (gradient 1)."""

    @staticmethod
    def forward(ctx, hidden, loss):
        ctx.loss_dtype = loss.dtype
        # A copy, not the input itself: a returned input becomes a view, and the zero-bubble schedules detach
        # stage outputs in place, which views do not allow.
        return hidden.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), dtype=ctx.loss_dtype, device=grad.device)


class StageModule(nn.Module):
    """One pipeline stage of the model: its decoder layers, plus the embedding (first) or the head (last)."""

    def __init__(self, model, layers: list[int], is_first: bool, is_last: bool, sequence_layout):
        super().__init__()
        self.model = [model]  # a plain list: the stage must not re-register the whole model's parameters
        self.sequence_layout = sequence_layout
        self.layers = nn.ModuleList([model.model.layers[str(i)] for i in layers])
        self.is_first, self.is_last = is_first, is_last
        if is_first:
            self.embed_tokens = model.model.embed_tokens
        if is_last:
            self.head_modules = nn.ModuleList([model.model.norm, model.lm_head]
                                              + ([model.model.mtp] if model.model.mtp is not None else []))
            if model.model.mtp is not None:
                # MTP reads token embeddings: the stage must own that weight, or the zero-bubble schedules, which
                # compute weight gradients per stage, would miss its MTP share.
                self.mtp_embedding = model.model.embed_tokens
        self.spec: LossSpec | None = None
        self.max_documents: int | None = None  # host-known bound on a row's documents, set per step by the runner
        self.reset()

    def reset(self):
        # Bookkeeping per micro-batch, keyed by the storage of its token ids. The schedule's first step runs each
        # stage once more on the first micro-batch's ids with placeholder activations (to infer shapes); keying
        # by micro-batch lets the real run overwrite that record instead of adding to it.
        self.records: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def parts(self):
        return _total([p for p, _ in self.records.values()])

    @property
    def expert_counts(self):
        return _total([c for _, c in self.records.values() if c is not None])

    def forward(self, hidden=None, *, input_ids, position_ids, labels):
        model = self.model[0]
        batch = model.prepare(input_ids, position_ids, labels, self.sequence_layout, self.max_documents)
        x = model.embed(batch) if self.is_first else hidden
        x, aux_terms, counts = model.run_layers(x, self.layers, batch)
        if self.is_last:
            out = model.head(x, batch, aux_terms, ())
            loss, parts = micro_batch_loss(out, self.spec)
        else:
            aux = torch.stack(aux_terms).sum() if aux_terms else x.new_zeros(())
            aux = self.spec.aux_coeff * aux / self.spec.global_batch_size
            parts = empty_parts(self.spec, x.device)
            parts[AUX_PART] = aux.detach()  # a stage before the last has only balance-loss terms
            loss = _AttachLoss.apply(x, aux) if aux_terms else x  # the stage output, carrying its aux loss
        self.records[input_ids.data_ptr()] = (parts, torch.stack(counts) if counts else None)
        return loss


def _total(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The sum of the micro-batches' tensors, added in micro-batch order (None when there are none)."""
    return sum(tensors[1:], tensors[0]) if tensors else None


def prune_to_local_stages(model, p: ParallelConfig, pp_rank: int) -> list[tuple[int, list[int]]]:
    """Drop the layers (and embedding, head, MTP) that no local stage needs; return [(stage, layers)] local."""
    layers, ranks = stage_layers(p, model.cfg), stage_ranks(p)
    local = [(s, layers[s]) for s in range(len(layers)) if ranks[s] == pp_rank]
    keep = {i for _, ls in local for i in ls}
    for key in [k for k in model.model.layers if int(k) not in keep]:  # the rest keep their names (model.layers.17.…)
        del model.model.layers[key]
    last = len(layers) - 1
    has_first = any(s == 0 for s, _ in local)
    has_last = any(s == last for s, _ in local)
    if not has_last:
        model.model.norm = None
        model.lm_head = None
        model.model.mtp = None
    if not has_first and not (has_last and model.cfg.mtp.num_blocks > 0):
        model.model.embed_tokens = None
    return local


def _stage_class():
    """torch's PipelineStage, telling `after_weight_pass` when a separate weight pass has run. The zero-bubble
    schedules (ZBV, DualPipeV) compute weight gradients apart from input gradients, with `torch.autograd.grad`,
    and add them into `.grad` by hand: autograd's post-accumulate-grad hooks (the fp32 main-gradient fold, the
    overlapped reduction's count) do not run for them, so the engine runs their work there."""
    from torch.distributed import pipelining

    class Stage(pipelining.PipelineStage):
        def __init__(self, submodule, after_weight_pass, *args, **kwargs):
            super().__init__(submodule, *args, **kwargs)
            self.after_weight_pass = after_weight_pass

        def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward=False):
            super().backward_weight_one_chunk(bwd_chunk_id, last_backward=last_backward)
            if self.after_weight_pass is not None:
                self.after_weight_pass(self.submod)

    return Stage


class PipelineRunner:
    """Runs one optimizer step's micro-batches through the schedule; the pipeline analogue of forward_backward."""

    def __init__(self, model, topo, p: ParallelConfig, local_stages: list[tuple[int, list[int]]], sequence_layout):
        self.n_stages = p.pp * p.pp_virtual
        self.local_stages = local_stages
        self.modules = [StageModule(model, ls, s == 0, s == self.n_stages - 1, sequence_layout)
                        for s, ls in local_stages]
        self.topo, self.p = topo, p
        self.hidden_size = model.cfg.hidden_size
        self.model = [model]  # not a submodule
        self.key = None
        self.schedule = None
        # Called with each stage module after the zero-bubble schedules' separate weight pass (see _stage_class).
        self.after_weight_pass: Callable[[nn.Module], None] | None = None

    def gradient_uses(self) -> dict[str, int]:
        """{parameter name: the local stages that use it}: each gives it one gradient per micro-batch (the V's first
        and last stage share the embedding on one rank)."""
        names = {id(p): n for n, p in self.model[0].named_parameters()}
        uses = dict.fromkeys(names.values(), 0)
        for m in self.modules:
            for p in m.parameters():
                uses[names[id(p)]] += 1
        return uses

    def _schedule(self, n_micro: int, micro_batch: int, seq_len: int):
        """Stages and schedule for this shape. The shapes are given, not inferred: shape inference would run the
        stages once on placeholder data, and their loss and expert-count bookkeeping with it."""
        from torch.distributed import pipelining

        key = (n_micro, micro_batch, seq_len)
        if self.key == key:
            return self.schedule
        if self.p.pp_schedule == "dualpipev" and n_micro < self.n_stages:
            raise ConfigError(f"parallel.pp_schedule=dualpipev needs at least {self.n_stages} micro-batches per step "
                              f"(one per stage), got {n_micro}: raise train.global_batch_size or lower micro_batch_size")
        weight = next(self.model[0].parameters())  # read now: the model is materialised after the runner is built
        self.device, activation_dtype = weight.device, weight.dtype
        local_len = seq_len // self.topo.cp // self.topo.tp  # context-parallel chunks, then sequence-parallel slices
        # Hidden states travel in the activation dtype (the weights' dtype: bf16 under train.precision=bf16).
        hidden = torch.empty(micro_batch, local_len, self.hidden_size, device="meta", dtype=activation_dtype)
        loss = torch.empty((), device="meta")
        stages = []
        for m, (s, _) in zip(self.modules, self.local_stages):
            stages.append(_stage_class()(
                m, self.after_weight_pass, s, self.n_stages, self.device, group=self.topo.group("pp"),
                input_args=None if s == 0 else (hidden,), output_args=loss if s == self.n_stages - 1 else hidden))
        schedule_cls = getattr(pipelining, SCHEDULES[self.p.pp_schedule])
        self.schedule = schedule_cls(stages[0] if self.p.pp_schedule == "1f1b" else stages, n_microbatches=n_micro,
                                     loss_fn=lambda out, target: out, scale_grads=False)
        self.key = key
        return self.schedule

    def forward_backward(self, micro_batches: list[dict], spec: LossSpec) -> StepResult:
        for m in self.modules:
            m.spec = spec
            m.reset()
        batch = {k: torch.cat([mb[k] for mb in micro_batches]) for k in ("input_ids", "position_ids", "labels")}
        bounds = [mb.get("max_documents") for mb in micro_batches]
        for m in self.modules:  # the stages see one micro-batch at a time: a bound that holds for all of them
            m.max_documents = None if None in bounds else max(bounds)
        mb, seq_len = micro_batches[0]["input_ids"].shape
        schedule = self._schedule(len(micro_batches), mb, seq_len)
        # The last stage needs a target to run its loss function; the loss is already the stage's output.
        schedule.step(**batch, target=batch["labels"], return_outputs=False)
        parts = sum((m.parts for m in self.modules if m.parts is not None), empty_parts(spec, self.device))
        counts = [m.expert_counts for m in self.modules if m.expert_counts is not None]
        return StepResult(parts, torch.cat(counts) if counts else None)
