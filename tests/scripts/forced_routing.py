"""Train with every token forced onto experts 0 and 1 (a huge correction bias, bias updates off), so under EP
most ranks receive no token at all. Run directly (one process) or under torchrun; writes metrics.jsonl."""

from __future__ import annotations

import sys

import torch

from mimo_train.config import load_config
from mimo_train.training.trainer import Trainer


def main(run_dir: str, overrides: list[str]) -> None:
    cfg = load_config("configs/train/tiny_cpu.yaml", [f"run.dir={run_dir}", "train.expert_bias_update_rate=0",
                                                       "run.wandb_mode=disabled", *overrides])
    trainer = Trainer(cfg, resume="none")
    with torch.no_grad():
        for layer in trainer.model.decoder_layers():
            if layer.is_moe:
                layer.mlp.gate.e_score_correction_bias[:2] = 100.0
    trainer.fit()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
