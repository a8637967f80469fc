"""bf16 autocast training: runs, stays finite, and tracks the float32 run closely (bf16 has ~3 significant digits)."""

from __future__ import annotations

import json

from mimo_train.config import load_config
from mimo_train.trainer import Trainer

BASE = ["train.seq_len=128", "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=2",
        "run.wandb_mode=disabled"]


def _losses(tmp_path, name, *extra):
    cfg = load_config("configs/train/tiny_cpu.yaml", [*BASE, f"run.dir={tmp_path / name}", *extra])
    Trainer(cfg, resume="none").fit()
    return [json.loads(l)["lm_loss"] for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_bf16_autocast_tracks_float32(tmp_path):
    fp32 = _losses(tmp_path, "fp32")
    bf16 = _losses(tmp_path, "bf16", "train.bf16=true")
    assert fp32 != bf16  # autocast really changed the arithmetic
    for a, b in zip(bf16, fp32):
        assert abs(a - b) / b < 0.02, (a, b)
