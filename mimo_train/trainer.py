"""The training loop: micro-batch accumulation, the MiMo loss, sharded AdamW with clipping, the expert-bias
update, metrics and checkpoints, under any parallel layout.

Every loss term is normalised by counts over the whole global batch (tokens for the LM and MTP losses, sequences
for the balance loss), counted (and summed over data-parallel ranks) before the first micro-batch runs. The
gradient of a step is therefore the same whatever the micro-batch size or the number of data-parallel ranks,
which is what makes accumulation and data parallelism exact.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mimo_train import checkpoint as ckpt
from mimo_train.config import Config, ConfigError, save_config
from mimo_train.forward_backward import LossSpec, forward_backward
from mimo_train.metrics import MetricsLogger, expert_load_summary
from mimo_train.model import MiMoForCausalLM
from mimo_train.schedule import learning_rate
from parallel import comm
from parallel.data_parallel import ShardedAdamW, sync_gradients
from parallel.parallelize import parallelize
from parallel.state_dict import copy_loaded_model_state, model_state, optimizer_state
from parallel.topology import build_topology, init_distributed


def update_expert_bias(model: MiMoForCausalLM, counts: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's aux-loss-free balancing: move each expert's selection bias by `rate` towards the mean load.
    `counts` must already be summed over every rank that routed distinct tokens."""
    if rate == 0:
        return
    moe_layers = [layer.mlp for layer in model.model.layers if layer.is_moe]
    with torch.no_grad():
        for moe, c in zip(moe_layers, counts.float()):
            moe.gate.e_score_correction_bias += rate * torch.sign(c.mean() - c)


def _sum_over(x: torch.Tensor, group) -> torch.Tensor:
    if comm.group_size(group) > 1:
        x = x.clone()
        dist.all_reduce(x, group=group)
    return x


class Trainer:
    def __init__(self, cfg: Config, resume: str = "auto") -> None:
        self.cfg = cfg
        t, p = cfg.train, cfg.parallel
        init_distributed()
        self.topo = build_topology(p, cfg.model, t.seq_len)
        if t.global_batch_size % (t.micro_batch_size * p.dp):
            raise ConfigError(f"train.global_batch_size={t.global_batch_size}: must be a multiple of "
                              f"micro_batch_size x parallel.dp = {t.micro_batch_size * p.dp}")
        self.is_logger = self.topo.rank == 0
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.is_logger:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

        # Every rank builds the same full model from the seed, then keeps its shard: the parallel run starts
        # from exactly the single-process weights.
        torch.manual_seed(t.seed)
        self.model = MiMoForCausalLM(cfg.model, backend=p.backend)
        self.model.init_weights(seed=t.seed)
        self.layouts = parallelize(self.model, self.topo)
        self.optimizer = ShardedAdamW(self.model, self.layouts, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                      eps=t.adam_eps, weight_decay=t.weight_decay)

        from data_pipeline import GlobalSampleStream

        self.data = GlobalSampleStream(cfg.data, dp_rank=self.topo.rank_in("dp"), dp_size=p.dp)
        self.data.set_stage(t.seq_len)
        if cfg.data.tokenizer == "builtin" and cfg.model.vocab_size < cfg.data.vocab_size:
            raise ConfigError(f"model.vocab_size: must be >= the builtin tokenizer's data.vocab_size "
                              f"({cfg.data.vocab_size}), got {cfg.model.vocab_size}")

        self.step = 0
        self.tokens = 0
        self.skipped_steps = 0
        self.last_save_seconds = 0.0
        self._stop_requested = False
        path = ckpt.resolve_resume(resume, self.ckpt_dir)
        if path is not None:
            self.load(path)

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _tensor_state(self, for_load: bool = False) -> dict[str, Any]:
        return {"model": model_state(self.model, self.layouts, self.topo),
                "optimizer": optimizer_state(self.optimizer, self.layouts, self.topo, create=for_load)}

    def save(self) -> Path:
        meta = {
            "trainer": {"step": self.step, "tokens": self.tokens, "skipped_steps": self.skipped_steps},
            "data": self.data.state_dict(),
            "rng": ckpt.rng_state(),
            "parallel": {k: getattr(self.cfg.parallel, k) for k in ("tp", "pp", "dp", "cp", "ep", "etp")},
        }
        t0 = time.time()
        path = ckpt.save_checkpoint(self.ckpt_dir, self.step, self._tensor_state(), meta, rank=self.topo.rank)
        self.last_save_seconds = time.time() - t0
        return path

    def load(self, path: Path) -> None:
        state = self._tensor_state(for_load=True)
        meta = ckpt.load_checkpoint(path, state)
        copy_loaded_model_state(self.model, state["model"])
        self.step = meta["trainer"]["step"]
        self.tokens = meta["trainer"]["tokens"]
        self.skipped_steps = meta["trainer"]["skipped_steps"]
        self.data.load_state_dict(meta["data"])
        ckpt.set_rng_state(meta["rng"])
        if self.is_logger:
            print(f"resumed from {path} at step {self.step}", flush=True)

    # ---- one optimizer step -----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        t, topo = self.cfg.train, self.topo
        step_start = time.time()
        micro_batches = self.data.micro_batches(self.step, t.global_batch_size, t.micro_batch_size)
        digest = self.data.global_batch_digest(self.step, t.global_batch_size)
        local_targets = sum(self.model.count_targets(mb["labels"], mb["position_ids"]) for mb in micro_batches)
        targets = _sum_over(local_targets, topo.group("dp_cp")).clamp(min=1)
        lm_tokens, mtp_tokens = targets[0], targets[1:]
        lr = learning_rate(self.step, t)
        self.optimizer.set_lr(lr)

        self.model.train()
        n_mtp = len(mtp_tokens)
        spec = LossSpec(t.mtp_loss_weight, t.aux_loss_coeff, t.global_batch_size, lm_tokens, mtp_tokens)
        result = forward_backward(self.model, micro_batches, spec, bf16=t.bf16)
        parts, expert_counts = result.parts, result.expert_counts

        # Experts that received no token have no gradient; give them zeros so every rank and step treats them alike.
        for p in self.model.parameters():
            if p.grad is None and p.requires_grad:
                p.grad = torch.zeros_like(p)
        sync_gradients(self.model, self.layouts)
        grad_norm = self.optimizer.grad_norm()
        if math.isfinite(grad_norm):
            self.optimizer.clip(t.clip_grad, grad_norm)
            self.optimizer.step()
            if expert_counts is not None:
                expert_counts = _sum_over(expert_counts, topo.group("tp_dp_cp"))
                update_expert_bias(self.model, expert_counts, t.expert_bias_update_rate)
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad()

        # Losses: data-parallel ranks hold disjoint shares of each normalised term; tensor-parallel ranks agree.
        parts = _sum_over(parts, topo.group("dp_cp"))
        step_tokens = t.global_batch_size * t.seq_len
        self.tokens += step_tokens
        self.step += 1
        lm_loss, aux_loss = parts[0].item(), parts[1].item()
        mtp_depths = parts[2:].tolist()
        mtp_mean = sum(mtp_depths) / n_mtp if n_mtp else 0.0
        record = {
            "step": self.step,
            "loss": lm_loss + t.mtp_loss_weight * mtp_mean + aux_loss,
            "lm_loss": lm_loss,
            "mtp_loss": mtp_mean,
            **{f"mtp_loss_depth{d + 1}": v for d, v in enumerate(mtp_depths)},
            "aux_loss": aux_loss,
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

    def _agreed_stop(self) -> bool:
        """Stop when any rank was signalled (ranks must leave the loop at the same step)."""
        flag = torch.tensor([1.0 if self._stop_requested else 0.0])
        if self.topo.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def fit(self, log: bool = True) -> list[dict[str, Any]]:
        t = self.cfg.train
        if self.step >= t.steps:
            if self.is_logger:
                print(f"run {self.run_dir} is complete: step {self.step} of {t.steps}", flush=True)
            return []
        logger = MetricsLogger(
            self.run_dir, t.steps, self.step,
            {"mode": self.cfg.run.wandb_mode, "project": self.cfg.run.wandb_project, "name": self.cfg.run.name,
             "config": self.cfg.to_dict()},
            enabled=log and self.is_logger,
        )
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
        records = []
        try:
            while self.step < t.steps and not self._agreed_stop():
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
