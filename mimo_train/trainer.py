"""The training loop: micro-batch accumulation, the MiMo loss, AdamW with clipping, the expert-bias update,
metrics and checkpoints.

Every loss term is normalised by counts over the whole global batch (tokens for the LM and MTP losses, sequences
for the balance loss), counted before the first micro-batch runs. The gradient of a step is therefore the same
whatever the micro-batch size, which is what makes accumulation (and later data parallelism) exact.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from mimo_train import checkpoint as ckpt
from mimo_train.config import Config, ConfigError, save_config
from mimo_train.metrics import MetricsLogger, expert_load_summary
from mimo_train.model import MiMoForCausalLM
from mimo_train.schedule import learning_rate


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW; no weight decay on vectors (norm weights, sinks), as in Megatron-LM."""
    t = cfg.train
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
        foreach=False,  # the per-tensor loop gives bitwise-identical updates however parameters are grouped
    )


def update_expert_bias(model: MiMoForCausalLM, counts: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's aux-loss-free balancing: move each expert's selection bias by `rate` towards the mean load."""
    if rate == 0:
        return
    moe_layers = [layer.mlp for layer in model.model.layers if layer.is_moe]
    with torch.no_grad():
        for moe, c in zip(moe_layers, counts.float()):
            moe.gate.e_score_correction_bias += rate * torch.sign(c.mean() - c)


class Trainer:
    def __init__(self, cfg: Config, resume: str = "auto") -> None:
        if cfg.parallel.world_size > 1 or cfg.parallel.ep > 1 or cfg.parallel.etp > 1:
            raise ConfigError(
                "parallel: only the single-process layout (all degrees 1) is implemented in this version; "
                f"got tp={cfg.parallel.tp} pp={cfg.parallel.pp} dp={cfg.parallel.dp} cp={cfg.parallel.cp} "
                f"ep={cfg.parallel.ep} etp={cfg.parallel.etp}"
            )
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")

        torch.manual_seed(cfg.train.seed)
        self.model = MiMoForCausalLM(cfg.model, backend=cfg.parallel.backend)
        self.model.init_weights(seed=cfg.train.seed)
        self.optimizer = build_optimizer(self.model, cfg)

        from data_pipeline import GlobalSampleStream

        self.data = GlobalSampleStream(cfg.data, dp_rank=0, dp_size=1)
        self.data.set_stage(cfg.train.seq_len)
        if cfg.data.tokenizer == "builtin" and cfg.model.vocab_size < cfg.data.vocab_size:
            raise ConfigError(
                f"model.vocab_size: must be >= the builtin tokenizer's data.vocab_size ({cfg.data.vocab_size}), "
                f"got {cfg.model.vocab_size}"
            )

        self.step = 0
        self.tokens = 0
        self.skipped_steps = 0
        self._stop_requested = False
        path = ckpt.resolve_resume(resume, self.ckpt_dir)
        if path is not None:
            self.load(path)

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _tensor_state(self) -> dict[str, Any]:
        # get_state_dict keys the optimizer state by parameter names (not positions) and creates it when empty,
        # so a fresh optimizer can be loaded into, and a checkpoint maps onto any later layout by name.
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optim_state}

    def save(self) -> Path:
        meta = {
            "trainer": {"step": self.step, "tokens": self.tokens, "skipped_steps": self.skipped_steps},
            "data": self.data.state_dict(),
            "rng": ckpt.rng_state(),
        }
        t0 = time.time()
        path = ckpt.save_checkpoint(self.ckpt_dir, self.step, self._tensor_state(), meta)
        self.last_save_seconds = time.time() - t0
        return path

    def load(self, path: Path) -> None:
        state = self._tensor_state()
        meta = ckpt.load_checkpoint(path, state)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        self.step = meta["trainer"]["step"]
        self.tokens = meta["trainer"]["tokens"]
        self.skipped_steps = meta["trainer"]["skipped_steps"]
        self.data.load_state_dict(meta["data"])
        ckpt.set_rng_state(meta["rng"])
        print(f"resumed from {path} at step {self.step}", flush=True)

    # ---- one optimizer step -----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        t = self.cfg.train
        step_start = time.time()
        micro_batches = self.data.micro_batches(self.step, t.global_batch_size, t.micro_batch_size)
        digest = self.data.global_batch_digest(self.step, t.global_batch_size)
        targets = sum(self.model.count_targets(mb["labels"], mb["position_ids"]) for mb in micro_batches)
        lm_tokens, mtp_tokens = targets[0].clamp(min=1), targets[1:].clamp(min=1)
        num_sequences = t.global_batch_size
        lr = learning_rate(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        self.model.train()
        totals = {"lm": 0.0, "mtp": torch.zeros(len(mtp_tokens), dtype=torch.float64), "aux": 0.0}
        expert_counts = None
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.bf16)
        for mb in micro_batches:
            with autocast:
                out = self.model(mb["input_ids"], position_ids=mb["position_ids"], labels=mb["labels"],
                                 return_logits=False)
            lm = out.lm_loss_sum / lm_tokens
            mtp_terms = [s / n for s, n in zip(out.mtp_loss_sums, mtp_tokens)]
            mtp = torch.stack(mtp_terms).mean() if mtp_terms else lm.new_zeros(())
            aux = t.aux_loss_coeff * out.aux_loss_sum / num_sequences
            (lm + t.mtp_loss_weight * mtp + aux).backward()
            totals["lm"] += lm.item()
            totals["mtp"] += torch.tensor([m.item() for m in mtp_terms], dtype=torch.float64)
            totals["aux"] += aux.item()
            if out.expert_counts is not None:
                expert_counts = out.expert_counts if expert_counts is None else expert_counts + out.expert_counts

        # Experts that received no token have no gradient; give them zeros so AdamW treats every step alike.
        for p in self.model.parameters():
            if p.grad is None and p.requires_grad:
                p.grad = torch.zeros_like(p)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), t.clip_grad if t.clip_grad > 0 else float("inf")
        ).item()
        if math.isfinite(grad_norm):
            self.optimizer.step()
            if expert_counts is not None:
                update_expert_bias(self.model, expert_counts, t.expert_bias_update_rate)
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)

        step_tokens = sum(mb["input_ids"].numel() for mb in micro_batches)
        self.tokens += step_tokens
        self.step += 1
        mtp_mean = totals["mtp"].mean().item() if len(totals["mtp"]) else 0.0
        record = {
            "step": self.step,
            "loss": totals["lm"] + t.mtp_loss_weight * mtp_mean + totals["aux"],
            "lm_loss": totals["lm"],
            "mtp_loss": mtp_mean,
            **{f"mtp_loss_depth{d + 1}": v for d, v in enumerate(totals["mtp"].tolist())},
            "aux_loss": totals["aux"],
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": self.tokens,
            "tokens_per_s": step_tokens / max(time.time() - step_start, 1e-9),
            "skipped_steps": self.skipped_steps,
            "batch_digest": digest,
        }
        if expert_counts is not None:
            record.update(expert_load_summary(expert_counts))
            record["expert_bias_norm"] = torch.stack(
                [l.mlp.gate.e_score_correction_bias.norm() for l in self.model.model.layers if l.is_moe]
            ).max().item()
        return record

    # ---- the run ----------------------------------------------------------------------------------------------
    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True

    def fit(self, log: bool = True) -> list[dict[str, Any]]:
        t = self.cfg.train
        if self.step >= t.steps:
            print(f"run {self.run_dir} is complete: step {self.step} of {t.steps}", flush=True)
            return []
        logger = MetricsLogger(
            self.run_dir, t.steps, self.step,
            {"mode": self.cfg.run.wandb_mode, "project": self.cfg.run.wandb_project, "name": self.cfg.run.name,
             "config": self.cfg.to_dict()},
            enabled=log,
        )
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
        records = []
        try:
            while self.step < t.steps and not self._stop_requested:
                record = self.train_step()
                records.append(record)
                logger.log(record, console=(self.step % t.log_interval == 0 or self.step == t.steps))
                if t.save_interval and self.step % t.save_interval == 0 and self.step < t.steps:
                    self.save()
            self.save()  # a run always checkpoints when it ends, at the last step or on a signal
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            logger.finish()
        return records
