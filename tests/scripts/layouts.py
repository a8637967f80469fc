"""Train several parallel layouts one after another in one process group (one torchrun launch instead of one per
layout): `torchrun --nproc_per_node=N tests/scripts/layouts.py OUT_DIR SPEC.json`, where SPEC maps a run name to
its config overrides (all layouts of N processes). Each run writes OUT_DIR/NAME/metrics.jsonl, and each rank the
host syncs of every step to OUT_DIR/NAME/host_syncs_rankR.json (with the step's sync budget)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from mimo_train.config import load_config
from mimo_train.trainer import Trainer
from tests.host_syncs import count_host_syncs, sync_budget


def main(out_dir: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    for name, overrides in spec.items():
        cfg = load_config("configs/train/tiny_cpu.yaml", [*overrides, f"run.dir={Path(out_dir) / name}"])
        trainer = Trainer(cfg, resume="none")
        counts = []
        real_step = trainer.train_step

        def counted_step():
            with count_host_syncs(trainer) as counter:
                record = real_step()
            counts.append(counter.count)
            return record

        trainer.train_step = counted_step
        trainer.fit()
        trainer.data.close()
        stage = trainer.stage
        micro_batches = stage.global_batch_size // stage.parallel.dp // stage.micro_batch_size
        (Path(cfg.run.dir) / f"host_syncs_rank{dist.get_rank()}.json").write_text(
            json.dumps({"per_step": counts, "budget": sync_budget(trainer, micro_batches)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
