"""Helpers for the staged-run tests: configs derived from configs/train/test_staged.yaml, launching `mimo-train
train` (one process in-process or as a subprocess, or N processes through --nproc), reading metrics back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BASE_CONFIG = REPO / "configs/train/test_staged.yaml"
# Fields that depend on time or on the machine, not on the numbers being trained.
TIMING_KEYS = ("step_time_s", "tokens_per_s", "model_tflops_per_device", "mfu", "checkpoint/stall_s",
               "checkpoint/write_s")
# The numerical trajectory compared across runs.
TRAJECTORY_KEYS = ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm")


def write_config(directory: Path, name: str = "config.yaml", stage_parallel: list[dict] | None = None,
                 **train) -> Path:
    """A copy of the staged test config with `train` fields replaced and per-stage layout overrides."""
    tree = yaml.safe_load(BASE_CONFIG.read_text())
    tree["train"].update(train)
    for stage, layout in zip(tree["train"]["stages"], stage_parallel or []):
        stage["parallel"] = layout
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def cli(config: Path, run_dir: Path, *overrides: str, nproc: int = 1, resume: str = "auto",
        timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mimo_train.launch.cli", "train", "--config", str(config), "--resume", resume,
           "--nproc", str(nproc), f"run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def strip_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith(("memory/", "checkpoint/"))}
            for r in records]


def max_rel_diff(a: list[dict], b: list[dict], keys=TRAJECTORY_KEYS) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        for k in keys:
            worst = max(worst, abs(x[k] - y[k]) / max(abs(y[k]), 1e-12))
    return worst


def reference_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The uninterrupted single-process run of the staged test config (as a subprocess, one thread, like every
    run it is compared with), checkpointing every 4 steps and keeping all: computed once per test session."""
    root = tmp_path_factory.getbasetemp() / "staged_reference"
    run_dir = root / "run"
    if not (run_dir / "metrics.jsonl").is_file():
        config = write_config(root, save_interval=4, keep_last=0)
        result = cli(config, run_dir)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 12))
    return run_dir, records


def single_thread():
    """For an autouse fixture: in-process training on one intra-op thread, like the subprocesses (OMP_NUM_THREADS=1).
    On a busy 2-core machine two spinning OpenMP threads make a tiny step 10-30 times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
