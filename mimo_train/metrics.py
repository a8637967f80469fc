"""Per-step metrics: `metrics.jsonl` in the run directory, console progress lines, and wandb.

`metrics.jsonl` holds one JSON object per optimizer step. On a resume from step k the lines after k (written by the
interrupted run after its last checkpoint) are dropped first, so the file never holds a step twice.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch


def expert_load_summary(counts: torch.Tensor) -> dict[str, Any]:
    """counts [num_moe_layers, E]: tokens each expert received in this step."""
    c = counts.double()
    mean = c.mean(dim=1).clamp(min=1e-12)
    return {
        "expert_load/max_over_mean": (c.max(dim=1).values / mean).max().item(),
        "expert_load/min_over_mean": (c.min(dim=1).values / mean).min().item(),
        "expert_load/cv": (c.std(dim=1, unbiased=False) / mean).mean().item(),
        "expert_load/dead_experts": int((counts == 0).sum().item()),
        "expert_load/cv_per_layer": [round(v, 5) for v in (c.std(dim=1, unbiased=False) / mean).tolist()],
    }


def truncate_after(path: Path, step: int) -> None:
    """Keep only the lines of steps <= step (the ones covered by the checkpoint being resumed)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line torn by a kill mid-write
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, wandb_cfg: dict | None, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self.enabled = enabled
        self.start_time = time.time()
        self.start_step = start_step
        self.wandb = None
        if enabled:
            truncate_after(self.path, start_step)
            if wandb_cfg and wandb_cfg["mode"] != "disabled":
                self.wandb = _init_wandb(run_dir, wandb_cfg)

    def log(self, record: dict[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if not isinstance(v, (list, str))}, step=record["step"])
        if console:
            print(self.progress_line(record), flush=True)

    def progress_line(self, r: dict[str, Any]) -> str:
        done = r["step"] - self.start_step
        elapsed = time.time() - self.start_time
        eta = elapsed / max(done, 1) * (self.total_steps - r["step"])
        return (
            f"step {r['step']:>6}/{self.total_steps} | loss {r['loss']:.4f} | lm {r['lm_loss']:.4f} | "
            f"mtp {r['mtp_loss']:.4f} | gnorm {r['grad_norm']:.3f} | lr {r['lr']:.2e} | "
            f"tok/s {r['tokens_per_s']:,.0f} | ETA {_duration(eta)}"
        )

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _init_wandb(run_dir: Path, cfg: dict):
    import wandb

    # The run id is kept in the run directory so a resumed run continues the same wandb run.
    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(
        project=cfg["project"], name=cfg.get("name") or run_dir.name, id=run_id, resume="allow",
        dir=str(run_dir), mode=cfg["mode"], config=cfg.get("config"),
    )
