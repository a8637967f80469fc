"""Train several parallel layouts one after another in one process group (one torchrun launch instead of one per
layout): `torchrun --nproc_per_node=N tests/scripts/layouts.py OUT_DIR SPEC.json`, where SPEC maps a run name to
its config overrides (all layouts of N processes). Each run writes OUT_DIR/NAME/metrics.jsonl, and each rank the
host syncs of every step to OUT_DIR/NAME/host_syncs_rankR.json (with the step's sync budget) and when, within each
step's backward, the gradient reduce-scatters were launched to OUT_DIR/NAME/overlap_rankR.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mimo_train.config import load_config
from mimo_train.training.trainer import Trainer
from parallel import comm
from tests.host_syncs import count_host_syncs, sync_budget


class OverlapRecorder:
    """Numbers the events of a step: every gradient accumulation (a hook registered after the engine's, so it fires
    once the engine has seen that gradient) and every reduce-scatter launch."""

    def __init__(self, model):
        self.events: list[str] = []
        self.parameters = sum(p.requires_grad for p in model.parameters())
        self._real = getattr(dist, comm.REDUCE_SCATTER)
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda _: self.events.append("grad"))

    def __enter__(self):
        def recorded(*args, **kwargs):
            self.events.append("reduce_scatter")
            return self._real(*args, **kwargs)

        self.events.clear()
        setattr(torch.distributed, comm.REDUCE_SCATTER, recorded)
        return self

    def __exit__(self, *exc):
        setattr(torch.distributed, comm.REDUCE_SCATTER, self._real)

    def summary(self) -> dict:
        """How many gradients arrived after the step's first reduce-scatter launch (0: none overlapped)."""
        first = self.events.index("reduce_scatter") if "reduce_scatter" in self.events else len(self.events)
        return {"launches": self.events.count("reduce_scatter"),
                "gradients_after_first_launch": self.events[first:].count("grad")}


def main(out_dir: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    for name, overrides in spec.items():
        cfg = load_config("configs/train/tiny_cpu.yaml", [*overrides, f"run.dir={Path(out_dir) / name}"])
        trainer = Trainer(cfg, resume="none")
        counts, overlap = [], []
        real_step = trainer.train_step
        recorder = OverlapRecorder(trainer.model)

        def counted_step():
            with recorder:
                with count_host_syncs(trainer) as counter:
                    record = real_step()
            counts.append(counter.count)
            overlap.append(recorder.summary())
            return record

        trainer.train_step = counted_step
        trainer.fit()
        trainer.data.close()
        stage = trainer.stage
        micro_batches = stage.global_batch_size // stage.parallel.dp // stage.micro_batch_size
        (Path(cfg.run.dir) / f"host_syncs_rank{dist.get_rank()}.json").write_text(
            json.dumps({"per_step": counts, "budget": sync_budget(trainer, micro_batches)}))
        (Path(cfg.run.dir) / f"overlap_rank{dist.get_rank()}.json").write_text(
            json.dumps({"per_step": overlap, "parameters": recorder.parameters}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
