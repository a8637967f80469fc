"""Faults: non-finite steps are skipped, counted and logged, and N in a row stop the run with a clear message;
SIGTERM, SIGUSR1 and Ctrl-C make a real `mimo-train train` process checkpoint at the next step boundary and exit 0
(a second Ctrl-C exits at once), also through the `--nproc` launcher; a crash with data workers running exits
promptly with one traceback, in one process and in N."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import mimo_train.training.trainer as trainer_module
from mimo_train.training import checkpoint as ckpt
from mimo_train.config import load_config
from mimo_train.training.trainer import EXIT_DIVERGED, Trainer
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


def _start_and_wait_for_steps(tmp_path, *extra, steps=2):
    cmd = [sys.executable, "-m", "mimo_train.launch.cli", "train", "--config", "configs/train/tiny_cpu.yaml", *TINY,
           "train.steps=10000", f"run.dir={tmp_path}", *extra]
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (lines.is_file() and len(lines.read_text().splitlines()) >= steps):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("signum,nproc", [(signal.SIGTERM, 1), (signal.SIGUSR1, 1), (signal.SIGINT, 1),
                                          (signal.SIGTERM, 2)],
                         ids=["SIGTERM", "SIGUSR1", "SIGINT", "SIGTERM-launcher-nproc2"])
def test_signal_checkpoints_at_the_next_step_and_exits_0(tmp_path, signum, nproc):
    """With --nproc 2 the signal goes to the launcher, which forwards it to both ranks (before: the launcher died
    with 143 and the ranks trained on; a SIGTERM to torchrun exited 1 with a traceback). That launch names no
    parallel.dp (auto: 2) and uses EP2; its validation losses and MTP acceptance at step 2 equal the single
    process's (tests/test_evaluation.py)."""
    from tests.test_evaluation import eval_overrides

    extra = ["train.global_batch_size=4", "train.micro_batch_size=2"]
    if nproc > 1:
        extra = [*eval_overrides(tmp_path), "parallel.ep=2"]
    proc = _start_and_wait_for_steps(tmp_path / "run", "--nproc", str(nproc), *extra)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    tmp_path = tmp_path / "run"
    if nproc > 1:
        reference_dir = tmp_path.parent / "single"
        cfg = load_config("configs/train/tiny_cpu.yaml", [*TINY, *extra[:-1], "train.steps=2", f"run.dir={reference_dir}"])
        Trainer(cfg, resume="none").fit()
        single = json.loads((reference_dir / "metrics.jsonl").read_text().splitlines()[1])
        launched = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])
        keys = [k for k in single if k.startswith("eval/")]
        assert len(keys) == 7 and all(abs(launched[k] - single[k]) <= 1e-5 * abs(single[k]) for k in keys), (
            {k: (single[k], launched[k]) for k in keys})
    if signum == signal.SIGINT:
        assert "Ctrl-C: checkpointing at the end of this step" in err
    lines = tmp_path / "metrics.jsonl"
    steps = [json.loads(l)["step"] for l in lines.read_text().splitlines()]
    latest = ckpt.find_latest(tmp_path / "checkpoints")
    assert latest.name == ckpt.checkpoint_name(steps[-1]) and steps == list(range(1, steps[-1] + 1))
    assert f"stopped by a signal at step {steps[-1]}" in out


def test_second_ctrl_c_exits_at_once(tmp_path):
    proc = _start_and_wait_for_steps(tmp_path, "data.num_workers=2")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)  # soon enough that the first Ctrl-C's step and checkpoint have not ended yet
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode not in (0, None) and time.time() - t0 < 60, (proc.returncode, err[-3000:])
    assert "second Ctrl-C" in err, err[-3000:]
    # One line, whatever the interrupt broke (before: 211 lines and 6 tracebacks through a checkpoint write).
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "mimo-train: interrupted; the newest checkpoint is the last one published"


@pytest.mark.parametrize("nproc", [1, 2])
def test_crash_with_data_workers_exits_promptly_with_one_traceback(tmp_path, nproc):
    """An exception at step 2 with two prefetch workers running (before: no exit until killed, 300 s)."""
    cmd = [sys.executable, str(REPO / "tests/scripts/crash_at_step.py"), "train", "--config",
           "configs/train/tiny_cpu.yaml", *TINY, "data.num_workers=2", "train.steps=100", "--nproc", str(nproc),
           "train.global_batch_size=4", "train.micro_batch_size=2", f"run.dir={tmp_path}"]
    t0 = time.time()
    res = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    elapsed = time.time() - t0
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
    assert elapsed < 90, elapsed
    assert res.stderr.count("Traceback (most recent call last)") == 1, res.stderr[-5000:]
    assert "IndexError: index out of range in self (injected at step 2)" in res.stderr
