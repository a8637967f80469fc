"""The training loop: micro-batch accumulation, the MiMo loss, sharded AdamW with clipping, the expert-bias
update, the staged schedule, metrics, faults and checkpoints, under any parallel layout.

Every loss term is normalised by counts over the whole global batch (tokens for the LM and MTP losses, sequences
for the balance loss), counted (and summed over data-parallel ranks) before the first micro-batch runs. The
gradient of a step is therefore the same whatever the micro-batch size or the number of data-parallel ranks,
which is what makes accumulation and data parallelism exact.

Stages (`train.stages`, see `mimo_train/training/stages.py`) switch at token counts. At a boundary the trainer moves the
data stream to the new stage (sequence length, mixture), checkpoints, and, when the new stage asks for another
parallel layout, rebuilds topology, model and optimizer under it and reloads that checkpoint (same number of
processes), or exits with EXIT_RELAUNCH and a message naming the process count to relaunch with.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from data_pipeline import GlobalSampleStream, combine_sample_digests
from data_pipeline.checks import DataConfigError, check_data_sources
from mimo_train.training import checkpoint as ckpt
from mimo_train.config import Config, ConfigError, save_config
from mimo_train.training.engine import AdamSettings, build_engine
from mimo_train.training.evaluation import Evaluator
from mimo_train.model.loss import AUX_PART, LossSpec, LossValues
from mimo_train.training.forward_backward import forward_backward
from mimo_train.training.host_sync import HostSync
from mimo_train.model.info import model_report, startup_banner
from mimo_train.training.metrics import MetricsLogger, expert_load_summary, peak_tflops, truncate_after
from mimo_train.model import MiMoForCausalLM
from mimo_train.precision import precision as precision_named
from mimo_train.training.resume_config import check_resume_config
from mimo_train.training.run_lock import RunLock, RunLocked, held_by_parent
from mimo_train.training.schedule import learning_rate
from mimo_train.training.stages import BatchSchedule, Stage, StagePlan, StageStart
from mimo_train.training.stopping import StopRequest
from parallel import comm
from parallel.device import resolve_device, use_device
from parallel.mixed_precision import MainGradients
from parallel.state_dict import (copy_loaded_model_state, model_state, optimizer_state,
                                 read_fp32_values_from_saved_place)
from parallel.topology import init_distributed, validate_layout

# Exit status when the next stage needs another number of processes: the boundary checkpoint is saved; relaunch
# with the process count the message names and `--resume auto` continues in the new stage.
EXIT_RELAUNCH = 3
# Exit status when `train.max_consecutive_skips` non-finite steps in a row stopped the run.
EXIT_DIVERGED = 4


def _bias_step(c: torch.Tensor, rate: float) -> torch.Tensor:
    return rate * torch.sign(c.mean() - c)


def update_expert_bias(model: MiMoForCausalLM, counts: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's aux-loss-free balancing: move each expert's selection bias by `rate` towards the mean load.
    `counts` must already be summed over every rank that routed distinct tokens."""
    if rate == 0:
        return
    moe_layers = model.moe_layers()
    with torch.no_grad():
        for moe, c in zip(moe_layers, counts.float()):
            moe.gate.e_score_correction_bias += _bias_step(c, rate)


def expert_bias_norms(model: MiMoForCausalLM, counts: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """([layers], [layers]) on the device: each MoE layer's correction-bias norm now and after `update_expert_bias`
    (computed before the update, so both are read with the step's other values in one host sync)."""
    with torch.no_grad():
        now, after = [], []
        for moe, c in zip(model.moe_layers(), counts.float()):
            b = moe.gate.e_score_correction_bias
            now.append(b.norm())
            after.append((b + _bias_step(c, rate)).norm() if rate else b.norm())
        return torch.stack(now).double(), torch.stack(after).double()


@dataclasses.dataclass
class StepValues:
    """What one step computed, read from the device with its one host sync (`HostSync`)."""

    skipped: bool  # a non-finite loss or gradient norm on any rank: the update is skipped
    grad_norm: float
    router_margin: float
    losses: LossValues
    expert_counts: torch.Tensor | None  # [moe layers, E] over the whole step, on the device (for the bias update)
    expert_counts_on_host: torch.Tensor | None
    bias_norms: list[float]  # per MoE layer: after this step's bias update (before it when the step is skipped)


def _sum_over(x: torch.Tensor, group) -> torch.Tensor:
    if comm.group_size(group) > 1:
        x = x.clone()
        dist.all_reduce(x, group=group)
    return x


def _rss_gib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return float("nan")


class Trainer:
    def __init__(self, cfg: Config, resume: str = "auto",
                 initial_weights: Callable[[Trainer], None] | None = None) -> None:
        """`initial_weights(trainer)` fills a new run's weights from `train.init_from` (the caller hands in the
        reader, which lives above the training layer: `mimo_train.interop.init_from.load_initial_weights`)."""
        self.cfg = cfg
        self.initial_weights = initial_weights
        t = cfg.train
        init_distributed(timeout_s=cfg.run.process_group_timeout_s, device=t.device)
        self.device = resolve_device(t.device)
        use_device(self.device)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_logger = self.rank == 0
        self.run_lock = self._take_run_lock()
        self.plan = StagePlan(cfg, self.world)
        for s in self.plan.stages:  # every stage's layout is checked before any work (each against its own size)
            validate_layout(s.parallel, cfg.model, s.parallel.world_size, s.seq_len)
        if cfg.data.tokenizer == "builtin" and cfg.model.vocab_size < cfg.data.vocab_size:
            raise ConfigError(f"model.vocab_size: must be >= the builtin tokenizer's data.vocab_size "
                              f"({cfg.data.vocab_size}), got {cfg.model.vocab_size}")
        try:  # sources, manifests, tokenizer and vocabulary: before the model is built
            check_data_sources(cfg.data, cfg.model.vocab_size, cfg.run.dir)
        except DataConfigError as error:
            raise ConfigError(str(error)) from None
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.is_logger:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

        self.step = 0
        self.tokens = 0
        self.samples = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.stage_start = StageStart()
        self.last_saved_step: int | None = None
        self.last_save_seconds = 0.0
        self._signals = StopRequest(announce=False)
        self._flops_per_token: dict[int, float] = {}
        self.data = None
        self.main_grads: MainGradients | None = None
        self.ckpt = ckpt.CheckpointManager(self.ckpt_dir, self.rank, async_save=t.async_save, keep_last=t.keep_last,
                                           keep_every=t.keep_every, distributed=self.world > 1)

        try:
            self._start(resume)
        except BaseException:
            self.close()  # stop the data workers now: a failed start must exit, not wait for them at exit
            raise

    def _start(self, resume: str) -> None:
        """Pick the checkpoint, build everything under its stage's layout and load it."""
        path = self._resume_path(resume)
        meta = ckpt.read_meta(path) if path is not None else None
        if meta is not None and "trainer" in meta:
            check_resume_config(meta.get("config"), self.cfg, meta["trainer"].get("stage", 0), path)
        stage_index = min(meta["trainer"].get("stage", 0), len(self.plan.stages) - 1) if meta else 0
        self.stage = self.plan.stages[stage_index]
        if meta is not None and self.stage.parallel.world_size != self.world:
            self._relaunch_exit(self.stage, f"checkpoint {path} is in stage {self.stage.name!r}")
        self._build(self.stage)
        if path is not None:
            self.load(path)
        else:
            if self.cfg.train.init_from:  # a new run from given weights; its resumes load its own checkpoints
                if self.initial_weights is None:
                    raise ValueError("train.init_from: this Trainer was made without an initial-weights loader "
                                     "(pass initial_weights=mimo_train.interop.init_from.load_initial_weights)")
                self.initial_weights(self)
            self.data.set_stage(self.stage.seq_len, self.stage.data_weights or None)
        self._apply_stage(self.stage)
        if path is not None and self.is_logger:  # the resume is fully validated: now history may be rearranged
            self._branch_history(path, meta)

    def _take_run_lock(self):
        """Rank 0 takes the run directory's lock when no launcher holds it for this job (torchrun, Slurm tasks);
        every rank learns the outcome, so all stop with the same one line when another run holds it."""
        if self.world == 1 or held_by_parent(self.cfg.run.dir):  # the single process's command line holds it
            return None
        lock, problem = None, None
        if self.rank == 0:
            try:
                lock = RunLock(self.cfg.run.dir).acquire()
            except RunLocked as error:
                problem = str(error)
        problem = self._first_problem(problem)
        if problem is not None:
            # Every rank stops here: leave the group first, so no gloo thread outlives the interpreter (which
            # aborts the process, exit status 134, instead of the promised 2).
            dist.destroy_process_group()
            if self.rank == 0:
                raise RunLocked(problem)
            raise SystemExit(2)  # rank 0 says why
        return lock

    def _branch_history(self, path: Path, meta: dict[str, Any]) -> None:
        """Resuming from checkpoint `path` at step s: newer checkpoints (a branch no longer followed) move into
        `checkpoints/abandoned-<time>/` and the metrics of steps after s into an archive beside them (or into
        `metrics.superseded.jsonl`), so the live history is the one this run continues, and nothing is lost."""
        step = meta["trainer"]["step"]
        aside, moved = ckpt.abandon_newer(self.ckpt_dir, step)
        archive = aside / "metrics.jsonl" if aside is not None else None
        lines = truncate_after(self.run_dir / "metrics.jsonl", step, archive)
        if moved:
            print(f"resumed from {path.name}, older than the newest checkpoint: it is now the branch point; "
                  f"{', '.join(moved)} and the metrics of their {lines} steps moved to {aside} (nothing deleted)",
                  flush=True)
        self._note_schedule_change(meta)

    def _note_schedule_change(self, meta: dict[str, Any]) -> None:
        """A resume may change train.steps and the step-based LR schedule; the cosine then spans the new length, so
        the learning rate of the remaining steps changes: said once, with the next step's LR before and after."""
        saved = (meta.get("config") or {}).get("train", {})
        keys = ("steps", "lr", "min_lr", "warmup_steps", "constant_steps", "decay_steps")
        t = self.cfg.train
        changed = {k: saved[k] for k in keys if k in saved and saved[k] != getattr(t, k)}
        if not changed or self.stage.lr is not None:  # a stage's own schedule runs on tokens, not train.steps
            return
        old_lr = learning_rate(self.step, dataclasses.replace(t, **changed))
        new_lr = learning_rate(self.step, t)
        fields = ", ".join(f"train.{k} {v!r} -> {getattr(t, k)!r}" for k, v in changed.items())
        print(f"resume with a changed learning-rate schedule ({fields}): the remaining steps follow the new one "
              f"(step {self.step + 1}: lr {new_lr:.3g}, {old_lr:.3g} under the checkpoint's)", flush=True)

    def close(self) -> None:
        """Stop the data workers and release the run directory (idempotent). Called on every failure, so a crash
        exits promptly."""
        if self.data is not None:
            self.data.close()
        if getattr(self, "run_lock", None) is not None:
            self.run_lock.release()

    # ---- building and stages ----------------------------------------------------------------------------------
    def _resume_path(self, resume: str) -> Path | None:
        """The checkpoint to resume from, verified by all ranks together (each reads a share of its files)."""
        return ckpt.resolve_resume(resume, self.ckpt_dir, share=(self.rank, self.world), agree=self._first_problem)

    def _first_problem(self, problem: str | None) -> str | None:
        """The first problem any rank found (collective)."""
        if self.world == 1:
            return problem
        problems = [None] * self.world
        dist.all_gather_object(problems, problem)
        return next((p for p in problems if p is not None), None)

    def _build(self, stage: Stage) -> None:
        """Topology, model, optimizer and data stream for `stage`'s layout (collective)."""
        cfg, t, p = self.cfg, self.cfg.train, stage.parallel
        adam = AdamSettings(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
        self.engine = build_engine(cfg.model, p, stage.seq_len, precision=t.precision, adam=adam, seed=t.seed,
                                   device=self.device, compile=t.compile)
        e = self.engine
        self.topo, self.model, self.layouts, self.pipeline = e.topo, e.model, e.layouts, e.pipeline
        self.optimizer, self.main_grads = e.optimizer, e.main_grads

        if self.data is not None:
            self.data.close()
        self.data = GlobalSampleStream(cfg.data, dp_rank=self.topo.rank_in("dp"), dp_size=p.dp, run_dir=cfg.run.dir)
        self.data.token_limit = cfg.model.vocab_size  # ids past the embedding fail in one line, not in the model
        self.layout_key = stage.layout_key()

    def _apply_stage(self, stage: Stage) -> None:
        """Sequence length and mixture (data), GA RoPE base (model), batch schedule; loss weights are read from
        `self.stage` at every step."""
        self.stage = stage
        self.data.set_stage(stage.seq_len, stage.data_weights or None)
        self.model.set_global_rope_theta(stage.rope_theta)
        self.batches = BatchSchedule(stage, stage.parallel.dp)

    def _relaunch_exit(self, stage: Stage, why: str) -> None:
        n = stage.parallel.world_size
        if self.is_logger:
            procs = f"{n} process" + ("es" if n != 1 else "")
            print(f"{why}; stage {stage.name!r} runs under the layout {stage.layout_str()}, which needs {procs}, "
                  f"and this run has {self.world}. Relaunch with {procs} (`mimo-train train --nproc {n} ...`, or "
                  f"{n} Slurm tasks); `--resume auto` continues from the newest checkpoint.",
                  file=sys.stderr, flush=True)
        raise SystemExit(EXIT_RELAUNCH)

    def _cross_boundary(self, index: int) -> None:
        old, new = self.stage, self.plan.stages[index]
        if self.is_logger:
            print(f"stage boundary at step {self.step}, {self.tokens:,} tokens: {old.name} -> {new.name} "
                  f"(seq_len {new.seq_len}, batch {new.global_batch_size}, GA rope {new.rope_theta:g}, "
                  f"layout {new.layout_str()})", flush=True)
        self.stage = new
        self.stage_start = StageStart(index, self.step, self.tokens, self.samples)
        # The data stream enters the new stage before the checkpoint, so a resume from it (under any layout)
        # continues exactly as this process does.
        self.data.set_stage(new.seq_len, new.data_weights or None)
        self.save(block=True, boundary=True)
        if new.layout_key() != self.layout_key:
            if new.parallel.world_size != self.world:
                self._relaunch_exit(new, f"stage boundary checkpointed at step {self.step}")
            path = self.ckpt_dir / ckpt.checkpoint_name(self.step)
            self._build(new)
            self.load(path)
        self._apply_stage(new)

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _tensor_state(self, for_load: bool = False) -> dict[str, Any]:
        return {"model": model_state(self.model, self.layouts, self.topo),
                "optimizer": optimizer_state(self.optimizer, self.layouts, self.topo, create=for_load)}

    def _meta(self, boundary: bool) -> dict[str, Any]:
        return {
            "trainer": {"step": self.step, "tokens": self.tokens, "samples": self.samples,
                        "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                        "stage": self.stage.index, "stage_name": self.stage.name,
                        "stage_start": dataclasses.asdict(self.stage_start)},
            "data": self.data.state_dict(),
            "rng": ckpt.rng_state(),
            "parallel": dataclasses.asdict(self.stage.parallel),
            "stage_boundary": boundary,
            "config": self.cfg.to_dict(),
        }

    def save(self, block: bool = False, boundary: bool = False) -> Path:
        """Checkpoint the current step (asynchronously unless `block` or `train.async_save` is off)."""
        self.ckpt.save(self.step, self._tensor_state(), self._meta(boundary), block=block)
        self.last_saved_step = self.step
        self.last_save_seconds = self.ckpt.timings.get("stall_s", 0.0)
        return self.ckpt_dir / ckpt.checkpoint_name(self.step)

    def load(self, path: Path) -> None:
        state = self._tensor_state(for_load=True)
        saved, precision = ckpt.saved_precision(path), self.cfg.train.precision
        saved_masters = precision_named(saved).has_masters
        read_fp32_values_from_saved_place(state, self.optimizer, saved_masters)
        meta = ckpt.load_checkpoint(path, state, verified=True)  # the ranks verified it (or this run just wrote it)
        self.ckpt.resumed_from = meta["trainer"]["step"]
        copy_loaded_model_state(self.model, state["model"])
        if self.optimizer.masters is not None and not saved_masters:
            self.optimizer.params_from_masters()
        if self.is_logger and saved != precision:
            source = "master weights" if saved_masters else "parameters"
            print(f"precision changed on resume: checkpoint {saved}, run {precision} (fp32 weights from the "
                  f"checkpoint's fp32 {source})", flush=True)
        tr = meta["trainer"]
        self.step = tr["step"]
        self.tokens = tr["tokens"]
        self.samples = tr.get("samples", meta["data"].get("consumed_samples", 0))
        self.skipped_steps = tr["skipped_steps"]
        self.consecutive_skips = tr.get("consecutive_skips", 0)
        if "stage_start" in tr:
            self.stage_start = StageStart(**tr["stage_start"])
        if meta["data"].get("next_step") not in (None, tr["step"]):  # the data cursor must be at this step
            raise ckpt.CheckpointError(f"{path}: meta.json's trainer step {tr['step']} disagrees with its data "
                                       f"stream, which is at step {meta['data']['next_step']}")
        self.data.load_state_dict(meta["data"])
        ckpt.set_rng_state(meta["rng"])
        self.last_saved_step = self.step
        if self.is_logger:
            print(f"resumed from {path} at step {self.step} ({self.tokens:,} tokens, stage {self.stage.name!r}, "
                  f"layout {self.stage.layout_str()})", flush=True)

    # ---- one optimizer step -----------------------------------------------------------------------------------
    def _model_flops_per_token(self, seq_len: int) -> float:
        if seq_len not in self._flops_per_token:
            self._flops_per_token[seq_len] = float(model_report(self.cfg.model, seq_len)["flops_per_token"]["total"])
        return self._flops_per_token[seq_len]

    def _take_router_margin(self) -> torch.Tensor:
        """The smallest gap between the k-th and (k+1)-th biased router score of any token in this step, over all
        ranks. A margin near float rounding (~1e-7) means two parallel layouts may route that token differently.
        (Under pipeline parallelism the first step also sees the schedule's shape-inference pass.)"""
        margins = [m.gate.min_margin for m in self.model.moe_layers() if m.gate.min_margin is not None]
        for m in self.model.moe_layers():
            m.gate.min_margin = None
        value = torch.stack(margins).min().reshape(1).double() if margins else torch.full(
            (1,), math.inf, dtype=torch.float64, device=self.device)
        if self.topo.distributed:
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return value

    def _batch_digest(self, gbs: int) -> str:
        """The global batch's digest, identical for every layout: each data-parallel rank hashes only the samples
        it read, and the per-sample digests (32 bytes each) are gathered in rank order, which is sample order."""
        local = self.data.local_sample_digests(self.step, gbs).to(self.device)  # NCCL gathers device tensors
        group = self.topo.group("dp")
        if comm.group_size(group) > 1:
            parts = [torch.empty_like(local) for _ in range(comm.group_size(group))]
            dist.all_gather(parts, local, group=group)
            local = torch.cat(parts)
        return combine_sample_digests(local)

    def train_step(self) -> dict[str, Any]:
        stage, step_start = self.stage, time.time()
        gbs = self.batches.global_batch_size(self.samples - self.stage_start.samples)
        micro_batches = self.data.micro_batches(self.step, gbs, stage.micro_batch_size, device=self.device)
        digest = self._batch_digest(gbs)
        spec = self._loss_spec(micro_batches, gbs)
        step_tokens = gbs * stage.seq_len
        lr = self.plan.learning_rate(stage, self.stage_start, self.step, self.tokens + step_tokens)
        self.optimizer.set_lr(lr)
        values = self._forward_backward(micro_batches, spec)
        if not values.skipped:
            self.engine.update(self.cfg.train.clip_grad, values.grad_norm)
            if values.expert_counts is not None:
                update_expert_bias(self.model, values.expert_counts, stage.expert_bias_update_rate)
            self.consecutive_skips = 0
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
        self.optimizer.zero_grad()

        self.tokens += step_tokens
        self.samples += gbs
        self.step += 1
        seconds = max(time.time() - step_start, 1e-9)
        return self._step_record(values, lr=lr, gbs=gbs, step_tokens=step_tokens, seconds=seconds, digest=digest)

    def _loss_spec(self, micro_batches: list[dict], gbs: int) -> LossSpec:
        """The loss normalisers: target counts over the whole global batch (LM, and each MTP depth)."""
        local_targets = sum(self.model.count_targets(mb["labels"], mb["position_ids"]) for mb in micro_batches)
        # Context-parallel ranks share their micro-batches (each computes a part of every sequence): count over dp.
        targets = _sum_over(local_targets, self.topo.group("dp")).clamp(min=1)
        lm_tokens, mtp_tokens = targets[0], targets[1:]
        return LossSpec(self.stage.mtp_loss_weight, self.stage.aux_loss_coeff, gbs, lm_tokens, mtp_tokens)

    def _forward_backward(self, micro_batches: list[dict], spec: LossSpec) -> StepValues:
        """Forward and backward of every micro-batch, gradients reduced, losses and expert loads summed over
        ranks, and all that the update decision and the metrics need read in one host sync."""
        topo = self.topo
        self.model.train()
        run = (self.pipeline.forward_backward if self.pipeline is not None
               else partial(forward_backward, self.model, sequence_layout=self.engine.sequence_layout))
        self.engine.expect_gradients(len(micro_batches))  # gradient buckets are reduced as the backward finishes them
        result = run(micro_batches, spec)
        parts, expert_counts = result.parts, result.expert_counts
        router_margin = self._take_router_margin()

        grad_norm_sq = self.engine.reduce_gradients()
        # Losses: data-parallel ranks hold disjoint shares of each normalised term; tensor-parallel ranks agree.
        parts = _sum_over(_sum_over(parts, topo.group("dp_cp")), topo.group("pp"))  # pipeline: per-stage shares
        parts[AUX_PART] /= topo.cp  # every context-parallel rank computed the whole balance loss of its sequences
        if expert_counts is not None:
            expert_counts = _sum_over(expert_counts, topo.group("tp_dp_cp"))
        # A non-finite loss or gradient skips the update (every rank decides alike).
        bad = (~torch.isfinite(grad_norm_sq) | ~torch.isfinite(parts).all()).double().reshape(1)
        if topo.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return self._read_on_host(bad, grad_norm_sq, router_margin, parts, expert_counts)

    def _read_on_host(self, bad: torch.Tensor, grad_norm_sq: torch.Tensor, router_margin: torch.Tensor,
                      parts: torch.Tensor, expert_counts: torch.Tensor | None) -> StepValues:
        """The step's one host sync: everything the update decision and the metrics need, read at once."""
        sync = HostSync()
        for name, tensor in (("bad", bad), ("grad_norm_sq", grad_norm_sq), ("router_margin", router_margin),
                             ("parts", parts)):
            sync.add(name, tensor)
        if expert_counts is not None:
            now, after = expert_bias_norms(self.model, expert_counts, self.stage.expert_bias_update_rate)
            sync.add("bias_norms_now", now)
            sync.add("bias_norms_after", after)
            sync.add("expert_counts", expert_counts)
        host = sync.read()
        skipped = bool(host["bad"][0])
        counts_on_host = (torch.tensor(host["expert_counts"], dtype=torch.int64).view(expert_counts.shape)
                          if expert_counts is not None else None)
        norms = host.get("bias_norms_now" if skipped else "bias_norms_after", [])
        return StepValues(skipped, math.sqrt(host["grad_norm_sq"][0]), host["router_margin"][0],
                          LossValues.of(host["parts"]), expert_counts, counts_on_host, norms)

    def _step_record(self, values: StepValues, *, lr: float, gbs: int, step_tokens: int, seconds: float,
                     digest: str) -> dict[str, Any]:
        """The step's metrics (one line of metrics.jsonl)."""
        stage, losses = self.stage, values.losses
        tflops = self._model_flops_per_token(stage.seq_len) * step_tokens / seconds / self.world / 1e12
        record = {
            "step": self.step,
            "loss": losses.total(stage.mtp_loss_weight),
            "lm_loss": losses.lm,
            "mtp_loss": losses.mtp_mean,
            **{f"mtp_loss_depth{d + 1}": v for d, v in enumerate(losses.mtp_depths)},
            "aux_loss": losses.aux,
            "grad_norm": values.grad_norm,
            "lr": lr,
            "tokens": self.tokens,
            "samples": self.samples,
            "global_batch_size": gbs,
            "seq_len": stage.seq_len,
            "stage": stage.name,
            "stage_index": stage.index,
            "step_time_s": seconds,
            "tokens_per_s": step_tokens / seconds,
            "model_tflops_per_device": tflops,
            "mfu": tflops / peak_tflops(self.cfg.run),
            "memory/rss_gib": _rss_gib(),
            "memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "skipped": values.skipped,
            "skipped_steps": self.skipped_steps,
            "batch_digest": digest,
            "router/min_margin": values.router_margin,
        }
        if self.device.type == "cuda":
            record["memory/gpu_allocated_gib"] = torch.cuda.memory_allocated(self.device) / 2**30
            record["memory/gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if values.expert_counts_on_host is not None:
            norms = values.bias_norms
            record.update(expert_load_summary(values.expert_counts_on_host))
            record["expert_bias_norm"] = max(norms) if norms else 0.0
            record["expert_bias_norm_per_layer"] = [round(v, 6) for v in norms]
        return record

    def _evaluate_if_due(self, record: dict[str, Any]) -> None:
        """Validation losses and MTP acceptance on data.eval_sources, added to this step's record."""
        evaluator = Evaluator(self.cfg, self.model, self.topo)
        if evaluator.due(self.step):
            record.update(evaluator.evaluate(self.stage))

    # ---- the run ----------------------------------------------------------------------------------------------
    def _agreed_stop(self) -> bool:
        """Stop when any rank was signalled (ranks must leave the loop at the same step)."""
        flag = torch.tensor([1.0 if self._signals.requested else 0.0], device=self.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def fit(self, log: bool = True) -> list[dict[str, Any]]:
        total = self.plan.planned_steps()
        if self.plan.done(self.step, self.tokens):
            if self.is_logger:
                print(f"run {self.run_dir} is complete: step {self.step} of {total}, {self.tokens:,} tokens", flush=True)
            return []
        if self.is_logger:
            print(startup_banner(self.cfg, self.plan, self.stage, self.world, self.ckpt_dir, self.step), flush=True)
        if self.is_logger and self.plan.staged and self.step == 0:
            print(self.plan.describe(), flush=True)
        logger = MetricsLogger(
            self.run_dir, total, self.step,
            {"mode": self.cfg.run.wandb_mode, "project": self.cfg.run.wandb_project, "name": self.cfg.run.name,
             "config": self.cfg.to_dict()},
            enabled=log and self.is_logger,
        )
        self._signals = StopRequest(announce=self.is_logger).__enter__()
        records = []
        ok = False
        try:
            while self._next_step_due(logger):
                records.append(self._logged_step(logger))
            # A run always checkpoints when it ends, at the last step or on a signal.
            if self.last_saved_step != self.step:
                self.save(block=True)
            self.ckpt.wait()
            ok = True
        finally:
            self._signals.__exit__()
            if ok:
                logger.finish()
            else:
                logger.finish(exit_code=1)
                self.close()  # the data workers are stopped now, not joined forever at interpreter exit
        skipped = self.data.report() if self.data is not None else ""
        if self.is_logger and skipped:
            print(f"data: {skipped}", flush=True)
        if self.is_logger and self._signals.requested:
            print(f"stopped by a signal at step {self.step}; checkpoint {self.ckpt_dir / ckpt.checkpoint_name(self.step)}",
                  flush=True)
        return records

    def _next_step_due(self, logger: MetricsLogger) -> bool:
        """Between steps: report finished checkpoint writes; False when the run is done or was signalled; at a
        stage boundary, enter the next stage."""
        self.ckpt.poll()
        for done_save in self.ckpt.drain_completed():  # reported with the next step
            logger.note({"checkpoint/write_s": done_save["write_s"], "checkpoint/written_step": done_save["step"]})
        if self.plan.done(self.step, self.tokens) or self._agreed_stop():
            return False
        index = self.plan.stage_index(self.tokens)
        if index != self.stage.index:
            self._cross_boundary(index)
            logger.note({"checkpoint/stall_s": self.last_save_seconds})
        return True

    def _logged_step(self, logger: MetricsLogger) -> dict[str, Any]:
        """One step, its evaluation and metrics; the divergence stop and the periodic checkpoint."""
        t = self.cfg.train
        record = self.train_step()
        self._evaluate_if_due(record)
        if self.consecutive_skips and self.is_logger:
            print(f"step {self.step}: non-finite loss or gradient norm, update skipped "
                  f"({self.consecutive_skips} in a row, {self.skipped_steps} in total)", flush=True)
        done = self.plan.done(self.step, self.tokens)
        # Skipped shards, documents and tokens (the stream's read counters are per process: not logged, so a
        # resumed run's metrics equal an uninterrupted run's).
        record.update({k: v for k, v in self.data.stats().items() if k.startswith("data/skipped_")})
        logger.log(record, console=(self.step % t.log_interval == 0 or done))
        if t.max_consecutive_skips and self.consecutive_skips >= t.max_consecutive_skips:
            if self.is_logger:
                print(f"stopping: {self.consecutive_skips} consecutive steps with a non-finite loss or "
                      f"gradient norm (steps {self.step - self.consecutive_skips + 1}-{self.step}; "
                      f"train.max_consecutive_skips={t.max_consecutive_skips}). No checkpoint was written "
                      f"for these steps; resume from an earlier one (--resume PATH), e.g. with a lower "
                      f"learning rate.", file=sys.stderr, flush=True)
            self.ckpt.wait()
            raise SystemExit(EXIT_DIVERGED)
        if t.save_interval and self.step % t.save_interval == 0 and not done:
            self.save()
            logger.note({"checkpoint/stall_s": self.last_save_seconds})
        return record
