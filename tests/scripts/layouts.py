"""Train several parallel layouts one after another in one process group (one torchrun launch instead of one per
layout): `torchrun --nproc_per_node=N tests/scripts/layouts.py OUT_DIR SPEC.json`, where SPEC maps a run name to
its config overrides (all layouts of N processes). Each run writes OUT_DIR/NAME/metrics.jsonl."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mimo_train.config import load_config
from mimo_train.trainer import Trainer


def main(out_dir: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    for name, overrides in spec.items():
        cfg = load_config("configs/train/tiny_cpu.yaml", [*overrides, f"run.dir={Path(out_dir) / name}"])
        trainer = Trainer(cfg, resume="none")
        trainer.fit()
        trainer.data.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
