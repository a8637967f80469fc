"""Checks before any work: the whole config, every stage's layout and batch rules against the process count
(`parallel.dp: auto` derived from it), the run directory against --resume none, and a resumed run's config against
the checkpoint's. Each failure is one line naming the field and the rule, exit status 2, before any rank starts."""

from __future__ import annotations

import json

import pytest

from mimo_train.launch import cli
from tests.scripts.staged import single_thread, write_config


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


TINY = ["train.seq_len=64", "train.global_batch_size=2", "train.micro_batch_size=2", "train.warmup_steps=2",
        "run.wandb_mode=disabled", "data.num_workers=0"]
CONFIG = "configs/train/tiny_cpu.yaml"


def _main(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_bad_launches_fail_with_one_line_before_any_process_starts(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: mimo_tiny\ntrain:\n  steps: 3\n   seed: 4\n")
    staged = write_config(tmp_path, stage_parallel=[{}, {"ep": 3}])
    run = f"run.dir={tmp_path / 'run'}"
    cases = [
        (["--nproc", "0"], "--nproc: must be >= 1 (got 0)"),
        (["--nproc", "2", "parallel.dp=1"],
         "parallel: tp x pp x dp x cp = 1x1x1x1 = 1 must equal the world size 2 (--nproc 2)"),
        (["--nproc", "2", "train.global_batch_size=4", "train.micro_batch_size=4"],
         "train.global_batch_size: the global batch 4 must be a multiple of micro_batch_size x parallel.dp = 4 x 2"),
        (["--nproc", "2", "parallel.tp=3"], "parallel.dp: 'auto' needs the world size 2 to be a multiple of tp x pp x cp"),
        (["--resume", tmp_path / "nope"], f"--resume {tmp_path / 'nope'}: no such checkpoint directory"),
        (["train.seq_len=9000"], "train.seq_len: must be <= model.max_position_embeddings (8192) (got 9000)"),
        (["train.lr=[1,"], "override 'train.lr=[1,': the value is not valid YAML"),
        (["--config", bad_yaml], f"{bad_yaml}:4:8: YAML syntax error: mapping values are not allowed here"),
        (["--config", staged, "--nproc", "2"], "train.stages[1] (b): parallel.ep=3: must divide model.num_experts (8)"),
    ]
    for extra, message in cases:
        config = [] if "--config" in extra else ["--config", CONFIG, *TINY]
        rc, out, err = _main(capsys, "train", *config, run, *extra)
        assert rc == 2, (extra, out, err)
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp_path / "run").exists()  # nothing started


def test_dp_auto_fills_the_allocation_of_a_submission(capsys):
    rc, out, err = _main(capsys, "submit", "--config", CONFIG, "--nodes", "2", "--gpus-per-node", "8", "--dry-run")
    assert rc == 0, err
    assert "--ntasks=16" in out
    rc, out, err = _main(capsys, "submit", "--config", CONFIG, "--nodes", "2", "--gpus-per-node", "8", "--dry-run",
                         "parallel.dp=8")
    assert rc == 2 and "parallel: tp x pp x dp x cp = 1x1x8x1 = 8 must equal the world size 16" in err, err


def test_resume_none_refuses_an_existing_run_and_resume_compares_the_config(tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = ["train", "--config", CONFIG, *TINY, f"run.dir={run_dir}"]
    assert _main(capsys, *base, "train.steps=2")[0] == 0
    metrics = (run_dir / "metrics.jsonl").read_text()
    assert len(metrics.splitlines()) == 2

    # --resume none into it: refused, naming the directory and both ways on; nothing touched.
    rc, _, err = _main(capsys, *base, "--resume", "none", "train.steps=1")
    assert rc == 2 and f"run.dir {run_dir}: holds a run already" in err and "--overwrite" in err, err
    assert "new run.dir" in err and (run_dir / "metrics.jsonl").read_text() == metrics

    # A resume with a changed model or seed: each differing field with both values, before anything is built.
    rc, _, err = _main(capsys, *base, "train.steps=3", "model.num_layers=11", "train.seed=5")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "model.num_layers: checkpoint 12, config 11" in err and "train.seed: checkpoint 1234, config 5" in err, err
    # What may change on a resume (README "Resuming"): here the learning rate, logging and batch size.
    rc, out, err = _main(capsys, *base, "train.steps=3", "train.lr=1e-3", "train.log_interval=2",
                         "train.global_batch_size=4")
    assert rc == 0 and "resumed from" in out, err
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    # --overwrite moves the old run aside (never deletes it) and starts afresh.
    rc, out, err = _main(capsys, *base, "--resume", "none", "--overwrite", "train.steps=1")
    assert rc == 0, err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and f"moved the old run {run_dir} aside to {aside[0]}" in out
    assert len((aside[0] / "metrics.jsonl").read_text().splitlines()) == 3
    assert (aside[0] / "checkpoints" / "step_00000003").is_dir()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
