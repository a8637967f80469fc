"""Validation: LM and MTP losses on held-out sources (`data.eval_sources`), and the MTP blocks' acceptance.

Every `train.eval_interval` steps the model runs forward only over the first `train.eval_samples` sequences of each
eval source, read by the data pipeline's own `GlobalSampleStream` (a fresh stream each time, at the current
stage's sequence length: the same sequences every time). Losses are sums over tokens divided by token counts over
the whole eval batch, reduced like the training losses, so they are the same under any layout.

MTP acceptance (teacher-forced, as in DeepSeek-V3 and the MiMo-V2-Flash report): at position i, MTP depth d
predicts token i + d + 1; the main model's greedy prediction of that token is its argmax at position i + d. Depth
d is accepted at i when the two greedy tokens agree (within one document). For speculative decoding with K draft
tokens, the expected accepted length is 1 + E[sum over k <= K of prod over d <= k of accepted_d]: the token the main
model always produces plus the run of leading drafts it accepts. Computed where each rank holds whole sequences
and the whole vocabulary (tp = cp = 1); under tensor or context parallelism only the losses are reported.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from mimo_train.config import ConfigError
from mimo_train.model.transformer import IGNORE_INDEX, document_ids, shift_within_documents
from parallel import comm
from parallel.parallelize import sequence_layout


def _sum_over(x: torch.Tensor, group) -> torch.Tensor:
    if comm.group_size(group) > 1:
        x = x.clone()
        dist.all_reduce(x, group=group)
    return x


def check_eval_config(cfg, stage) -> None:
    """The eval batch must split into micro-batches over the data-parallel ranks; no pipeline schedule for it."""
    t = cfg.train
    if t.eval_interval and not cfg.data.eval_sources:
        raise ConfigError(f"train.eval_interval: {t.eval_interval} asks for validation, but data.eval_sources is "
                          f"empty; add held-out sources (data.eval_sources=[{{name: held, path: DIR}}]) or set "
                          f"train.eval_interval=0")
    if not t.eval_interval:
        return
    p, mbs = stage.parallel, stage.micro_batch_size
    if p.pp > 1:
        raise ConfigError(f"train.eval_interval: validation under pipeline parallelism (parallel.pp={p.pp}) is not "
                          f"implemented; set train.eval_interval=0 for this layout")
    if t.eval_samples % (mbs * p.dp):
        raise ConfigError(f"train.eval_samples: must be a multiple of micro_batch_size x parallel.dp = {mbs} x {p.dp} "
                          f"(got {t.eval_samples})")


class Evaluator:
    def __init__(self, cfg, model, topo):
        self.cfg, self.model, self.topo = cfg, model, topo

    def due(self, step: int) -> bool:
        t = self.cfg.train
        return bool(t.eval_interval and self.cfg.data.eval_sources and step % t.eval_interval == 0)

    def evaluate(self, stage) -> dict[str, Any]:
        """{"eval/<source>/lm_loss": ..., ".../mtp_loss_depth<d>", ".../mtp_acceptance_depth<d>",
        ".../accepted_length_k<K>"} for every eval source (collective: every rank calls it)."""
        check_eval_config(self.cfg, stage)
        was_training = self.model.training
        self.model.eval()
        record: dict[str, Any] = {}
        try:
            with torch.no_grad():
                for source in self.cfg.data.eval_sources:
                    for key, value in self._evaluate_source(source, stage).items():
                        record[f"eval/{source.name}/{key}"] = value
        finally:
            for moe in self.model.moe_layers():  # eval routing is not the training step's router margin
                moe.gate.min_margin = None
            self.model.train(was_training)
        return record

    def _stream(self, source, stage):
        from data_pipeline import GlobalSampleStream
        from data_pipeline.config import DataConfig

        data = self.cfg.data
        eval_data = DataConfig(sources=[source], tokenizer=data.tokenizer, vocab_size=data.vocab_size,
                               cache_dir=data.cache_dir, seed=data.seed, num_workers=0)
        # The run directory as for training: a relative or unset cache_dir lives under it.
        stream = GlobalSampleStream(eval_data, dp_rank=self.topo.rank_in("dp"), dp_size=stage.parallel.dp,
                                    run_dir=self.cfg.run.dir)
        stream.set_stage(stage.seq_len)
        return stream

    def _evaluate_source(self, source, stage) -> dict[str, float]:
        stream = self._stream(source, stage)
        try:
            micro_batches = stream.micro_batches(0, self.cfg.train.eval_samples, stage.micro_batch_size)
        finally:
            stream.close()
        depths = self.cfg.model.mtp.num_blocks
        with_acceptance = depths > 0 and self.topo.tp == 1 and self.topo.cp == 1
        loss_sums = torch.zeros(1 + depths, dtype=torch.float64)
        counts = torch.zeros(1 + depths, dtype=torch.float64)
        acceptance = torch.zeros(2 * depths + 1, dtype=torch.float64)  # accepted per depth, chains per K, positions
        for mb in micro_batches:
            out = self.model(mb["input_ids"], position_ids=mb["position_ids"], labels=mb["labels"],
                             return_logits=with_acceptance, sequence_layout=sequence_layout(self.topo))
            loss_sums += torch.stack([out.lm_loss_sum, *out.mtp_loss_sums]).double()
            counts += self.model.count_targets(mb["labels"], mb["position_ids"]).double()
            if with_acceptance:
                acceptance += acceptance_counts(out.logits, out.mtp_logits, mb["labels"], mb["position_ids"])
        loss_sums = _sum_over(loss_sums, self.topo.group("dp_cp"))
        counts = _sum_over(counts, self.topo.group("dp")).clamp(min=1)
        losses = (loss_sums / counts).tolist()
        result = {"lm_loss": losses[0], **{f"mtp_loss_depth{d}": losses[d] for d in range(1, depths + 1)}}
        if with_acceptance:
            acceptance = _sum_over(acceptance, self.topo.group("dp"))
            positions = max(acceptance[-1].item(), 1.0)
            for d in range(1, depths + 1):
                result[f"mtp_acceptance_depth{d}"] = acceptance[d - 1].item() / positions
                result[f"accepted_length_k{d}"] = 1.0 + acceptance[depths + d - 1].item() / positions
        return result


def acceptance_counts(logits: torch.Tensor, mtp_logits: list[torch.Tensor], labels: torch.Tensor,
                      position_ids: torch.Tensor) -> torch.Tensor:
    """float64 [2K + 1]: positions where depth d's greedy token equals the main model's (d = 1..K); the sum over
    positions of the accepted run length capped at k (k = 1..K); the positions counted (those with a depth-1
    target). A depth whose target lies beyond the document counts as rejected."""
    docs = document_ids(position_ids)
    main = logits.argmax(dim=-1)  # main[i]: the main model's greedy token i + 1
    valid = shift_within_documents(labels, docs, 1, fill=IGNORE_INDEX) != IGNORE_INDEX
    run = torch.ones_like(valid)
    accepted, chains = [], []
    for d, depth_logits in enumerate(mtp_logits, start=1):
        target = shift_within_documents(main, docs, d, fill=-1)  # the main model's greedy token i + d + 1
        has_target = shift_within_documents(labels, docs, d, fill=IGNORE_INDEX) != IGNORE_INDEX
        ok = (depth_logits.argmax(dim=-1) == target) & has_target & valid
        run = run & ok
        accepted.append(ok.sum())
        chains.append(run.sum())
    cumulative = torch.cumsum(torch.stack(chains).double(), dim=0)
    return torch.cat([torch.stack(accepted).double(), cumulative, valid.sum().double().reshape(1)])

