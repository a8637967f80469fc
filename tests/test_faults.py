"""Faults: non-finite steps are skipped, counted and logged, and N in a row stop the run with a clear message;
SIGTERM and SIGUSR1 make a real `mimo-train train` process checkpoint at the next step boundary and exit 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import mimo_train.trainer as trainer_module
from mimo_train import checkpoint as ckpt
from mimo_train.config import load_config
from mimo_train.trainer import EXIT_DIVERGED, Trainer
from tests.scripts.staged import REPO, env, single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


TINY = ["train.seq_len=64", "train.global_batch_size=2", "train.micro_batch_size=2", "train.warmup_steps=2",
        "run.wandb_mode=disabled", "data.num_workers=0"]


def _poison_steps(monkeypatch, trainer, steps):
    """Make the loss and every gradient NaN in the given (0-based) steps."""
    real = trainer_module.forward_backward

    def poisoned(model, micro_batches, spec, **kwargs):
        result = real(model, micro_batches, spec, **kwargs)
        if trainer.step in steps:
            result.parts[0] = float("nan")
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return result

    monkeypatch.setattr(trainer_module, "forward_backward", poisoned)


def test_non_finite_steps_are_skipped_and_n_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys):
    cfg = load_config("configs/train/tiny_cpu.yaml", [*TINY, "train.steps=20", "train.max_consecutive_skips=3",
                                                      f"run.dir={tmp_path}"])
    trainer = Trainer(cfg, resume="none")
    _poison_steps(monkeypatch, trainer, {1, 4, 5, 6})
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    skipped = trainer.train_step()  # step index 1: NaN
    assert skipped["skipped"] and skipped["skipped_steps"] == 1 and trainer.consecutive_skips == 1
    for k, v in trainer.model.state_dict().items():  # no update: weights, expert biases, Adam state untouched
        assert torch.equal(v, before[k]), k
    ok = trainer.train_step()
    assert not ok["skipped"] and trainer.consecutive_skips == 0 and ok["skipped_steps"] == 1
    with pytest.raises(SystemExit) as stop:
        trainer.fit()  # steps 4, 5, 6 are NaN: the third in a row stops the run
    assert stop.value.code == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "stopping: 3 consecutive steps with a non-finite loss or gradient norm (steps 5-7" in err
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["skipped"] for l in lines] == [False, True, True, True]  # steps 4..7 logged by fit
    assert lines[-1]["skipped_steps"] == 4
    # Nothing was saved for the diverged steps.
    assert ckpt.find_latest(tmp_path / "checkpoints") is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_checkpoints_at_the_next_step_and_exits_0(tmp_path, signum):
    cmd = [sys.executable, "-m", "mimo_train.cli", "train", "--config", "configs/train/tiny_cpu.yaml", *TINY,
           "train.steps=10000", f"run.dir={tmp_path}"]
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (lines.is_file() and len(lines.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    steps = [json.loads(l)["step"] for l in lines.read_text().splitlines()]
    latest = ckpt.find_latest(tmp_path / "checkpoints")
    assert latest.name == ckpt.checkpoint_name(steps[-1]) and steps == list(range(1, steps[-1] + 1))
    assert f"stopped by a signal at step {steps[-1]}" in out
