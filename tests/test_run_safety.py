"""Run safety: one run per run directory (a lock, taken over when its holder is gone), resumes that keep the whole
history (an older checkpoint becomes the branch point; nothing is deleted before the resume is validated), a
launcher that watches every rank, and one-line errors for the first-hour mistakes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from mimo_train.training import checkpoint as ckpt
from mimo_train.launch import cli
from mimo_train.config import load_config
from mimo_train.launch.launcher import launch_local
from mimo_train.training.run_lock import LOCK_NAME, RunLock, RunLocked
from tests.data_helpers import write_source
from tests.scripts.staged import REPO, env
from tests.test_launch_checks import CONFIG, TINY, _main, _one_thread  # noqa: F401 (an autouse fixture)


def _steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---- the run directory's lock ------------------------------------------------------------------------------------


def test_a_second_run_is_refused_and_a_killed_holder_is_taken_over(tmp_path, capsys):
    """Before: the second run trained beside the first (metrics steps 35, 36, 37, 1, 38, 2, ...)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "mimo_train.launch.cli", "train", "--config", CONFIG, *TINY, "train.steps=10000",
           f"run.dir={run_dir}"]
    first = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    rc, _, err = _main(capsys, "train", "--config", CONFIG, *TINY, "train.steps=10000", f"run.dir={run_dir}")
    line = _one_line(err)
    assert rc == 2 and f"another run is using it (host {socket.gethostname()}, pid {first.pid};" in line, err
    first.send_signal(signal.SIGKILL)  # the holder dies without releasing anything: the kernel drops its flock
    _, first_err = first.communicate(timeout=60)
    assert "assuming the intent" not in first_err  # DCP's single-process warning is not repeated at every save
    done = ckpt.find_latest(run_dir / "checkpoints")
    step = int(done.name.split("_")[1]) if done else 0
    rc, out, err = _main(capsys, "train", "--config", CONFIG, *TINY, f"train.steps={step + 1}", f"run.dir={run_dir}")
    assert rc == 0, err
    assert f"taking over the lock of host {socket.gethostname()}, pid {first.pid} (its process is gone)" in err
    assert _steps(metrics) == list(range(1, step + 2))  # the killed run's lines after its checkpoint moved aside
    assert json.loads((run_dir / LOCK_NAME).read_text() or "{}") == {}  # released at the end


def test_a_lock_of_another_host_is_taken_over_only_when_its_heartbeat_is_stale(tmp_path, monkeypatch):
    """Where a flock is not seen across hosts (some NFS setups), the holder record decides: a fresh heartbeat from
    another host refuses, a stale one (node lost) or one of an earlier run of the same Slurm job is taken over."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock_file = run_dir / LOCK_NAME
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)

    def holder(age_s: float, job=None) -> None:
        lock_file.write_text(json.dumps({"host": "node-7", "pid": 4242, "heartbeat": time.time() - age_s,
                                         "slurm_job_id": job}))

    holder(5)
    with pytest.raises(RunLocked, match="another run is using it \\(host node-7, pid 4242"):
        RunLock(run_dir).acquire()
    holder(3600)
    lock = RunLock(run_dir).acquire()
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    with pytest.raises(RunLocked, match=f"host {socket.gethostname()}, pid {os.getpid()}"):
        RunLock(run_dir).acquire()  # this process holds it: another open file is refused, even here
    lock.release()
    holder(5, job="777")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    RunLock(run_dir).acquire().release()  # a requeued job: its earlier run ended before Slurm started this one


def test_without_a_launcher_rank_0_takes_the_lock_and_every_rank_stops(tmp_path, capfd):
    """Ranks started by torchrun or srun (no launcher holding the lock): rank 0 takes it once the process group
    exists, and every rank stops with exit status 2 and the reason said once."""
    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        rc = launch_local(2, ["train", "--config", CONFIG, *TINY, "train.global_batch_size=4", "train.steps=1",
                              f"run.dir={run_dir}"])
    err = capfd.readouterr().err
    assert rc == 2 and err.count("another run is using it") == 1 and f"pid {os.getpid()};" in err, err
    assert "Traceback" not in err and not (run_dir / "checkpoints").exists()


# ---- resumes keep the history --------------------------------------------------------------------------------


def test_resuming_an_older_checkpoint_branches_and_loses_nothing(tmp_path, capsys):
    """Before: after `--resume step_3` in a run at step 8, retention deleted step_3 and the new step_4, `--resume
    auto` went back to the old step_8, and metrics.jsonl ended as [1..5, 9, 10]."""
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    base = ["train", "--config", CONFIG, *TINY, "train.save_interval=1", "train.async_save=false",
            f"run.dir={run_dir}"]
    assert _main(capsys, *base, "train.steps=8", "train.keep_last=8")[0] == 0
    first_branch = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}

    rc, out, err = _main(capsys, *base, "train.steps=5", "train.keep_last=2", "--resume", root / "step_00000003")
    assert rc == 0, err
    aside = [p for p in root.iterdir() if p.name.startswith(ckpt.ABANDONED)]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == [
        "metrics.jsonl", *(ckpt.checkpoint_name(s) for s in range(4, 9))]
    assert _steps(aside[0] / "metrics.jsonl") == [4, 5, 6, 7, 8] and "is now the branch point" in out
    assert (root / "step_00000003").is_dir()  # the checkpoint resumed from is kept (keep_last=2 keeps 4, 5)
    # The new branch starts from step 3's exact state: step 4's loss and the batches equal the first branch's
    # (from step 5 on, the shorter schedule's learning rate differs, as the resume said).
    assert "resume with a changed learning-rate schedule (train.steps 8 -> 5)" in out, out
    branch = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert branch[4]["loss"] == first_branch[4]["loss"] and branch[5]["lr"] != first_branch[5]["lr"]
    assert all(branch[s]["batch_digest"] == first_branch[s]["batch_digest"] for s in (4, 5))

    rc, out, err = _main(capsys, *base, "train.steps=7", "train.keep_last=2")
    assert rc == 0 and "resumed from" in out and "step_00000005" in out, err
    assert "resume with a changed learning-rate schedule (train.steps 5 -> 7)" in out, out
    assert _steps(run_dir / "metrics.jsonl") == list(range(1, 8))

    # meta.json edited after it was written (here the step): not loaded, and nothing is cut before that is known.
    meta_file = root / "step_00000007" / ckpt.META
    meta = json.loads(meta_file.read_text())
    meta["trainer"]["step"] = 4
    meta_file.write_text(json.dumps(meta))
    history = (run_dir / "metrics.jsonl").read_text()
    rc, _, err = _main(capsys, *base, "train.steps=8", "--resume", root / "step_00000007")
    assert rc == 2 and "meta.json was changed after it was written" in _one_line(err), err
    assert (run_dir / "metrics.jsonl").read_text() == history
    rc, out, err = _main(capsys, *base, "train.steps=8", "train.keep_last=2")
    assert rc == 0 and "step_00000007 is corrupt or incomplete (meta.json was changed" in err, err
    assert (root / "step_00000007.corrupt").is_dir() and _steps(run_dir / "metrics.jsonl") == list(range(1, 9))
    assert _steps(run_dir / "metrics.superseded.jsonl") == [7]  # the line of the step that was redone


# ---- the launcher ------------------------------------------------------------------------------------------------


RANKS = textwrap.dedent("""
    import os, signal, sys, time
    rank, mode = int(os.environ["RANK"]), sys.argv[1]
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if rank == int(os.environ["WORLD_SIZE"]) - 1:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL) if mode != "exit-5" else sys.exit(5)
    time.sleep(600)  # outside any collective: only the launcher can stop it
""")


def test_launcher_watches_every_rank_and_exits_with_the_failed_ones_status(tmp_path, capfd):
    """Before: with rank 0 alive, the launcher never polled rank 1; after kill -9 of rank 1 it waited forever."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    for nproc, mode, status in ((2, "kill", 137), (3, "ignore-term", 137), (3, "exit-5", 5)):
        t0 = time.time()
        rc = launch_local(nproc, [mode], command=[sys.executable, str(script)])
        elapsed = time.time() - t0
        err = capfd.readouterr().err
        assert rc == status and f"rank {nproc - 1} failed (exit status {status})" in err, (mode, rc, err)
        assert elapsed < 15, (mode, elapsed)  # SIGTERM, and SIGKILL after the grace period for those ignoring it


# ---- one line for each first-hour mistake --------------------------------------------------------------------


def _fake_manifest_tokenizer(directory, sha256: str, vocab_size: int) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["tokenizer"] = {"file": "tokenizer.json", "sha256": sha256, "vocab_size": vocab_size}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_first_hour_mistakes_fail_in_one_line(tmp_path, capsys):
    run = f"run.dir={tmp_path / 'run'}"
    base = ["train", "--config", CONFIG, *TINY, "train.steps=1", run]
    other = tmp_path / "other"
    write_source(other, shards=1, docs_per_shard=4, first_token=5)
    _fake_manifest_tokenizer(other, "ab" * 32, 1024)  # shards of another tokenizer (a 1024-token vocabulary)
    empty = tmp_path / "empty"
    write_source(empty, shards=0, docs_per_shard=0, first_token=5)
    cases = [
        ([f"data.sources=[{{name: other, path: {other}}}]"],
         "data.sources[0].path: '%s' was tokenized with another tokenizer (vocabulary 1024, sha256 abababababab) "
         "than data.tokenizer (the builtin tokenizer of data.vocab_size=4096" % other),
        ([f"data.sources=[{{name: e, path: {empty}}}]"], f"data.sources[0].path: '{empty}' holds no tokens"),
        (["--nproc", "2", "parallel.pp=2"],
         "train.global_batch_size: pipeline parallelism (parallel.pp=2) needs at least 2 micro-batches per step"),
        (["--overwrite"], "--overwrite: only with --resume none"),
        (["train.eval_interval=5"], "train.eval_interval: 5 asks for validation, but data.eval_sources is empty"),
    ]
    for extra, message in cases:
        rc, out, err = _main(capsys, *base, *extra)
        assert rc == 2 and message in _one_line(err), (extra, err)
    assert not (tmp_path / "run").exists()  # refused before anything started

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    for name in ("empty.jsonl", "blank.jsonl"):
        rc, _, err = _main(capsys, "prepare-data", tmp_path / name, "--out", tmp_path / f"ds-{name}", "--workers", "1")
        # (the progress bar, a terminal's one refreshed line, may come first)
        assert rc == 2 and "prepare-data: error: inputs" in err.strip().splitlines()[-1] and "Traceback" not in err
        assert not (tmp_path / f"ds-{name}" / "manifest.json").exists()
    rc, _, err = _main(capsys, "verify-data", tmp_path / "nope")
    assert rc == 2 and f"{tmp_path / 'nope'}: no such directory" in _one_line(err)
    assert load_config(CONFIG, ["model=mimo_tiny", "model.num_layers=3"]).model.num_layers == 3
    help_text = subprocess.run([sys.executable, "-m", "mimo_train.launch.cli", "prepare-data", "--help"], env=env(),
                               cwd=REPO, capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and '"\\ud800"' in help_text.stdout, help_text.stderr[-2000:]


def test_unusable_data_found_while_reading_stops_in_one_line(tmp_path, capsys):
    """Every shard corrupt, found while reading (the sizes match, the checksums do not), through a DataLoader
    worker (before: 92 lines, three chained tracebacks); token ids beyond the model's vocabulary."""
    bad = tmp_path / "bad"
    write_source(bad, shards=2, docs_per_shard=12, first_token=5)
    for shard in bad.glob("*.tar"):
        data = bytearray(shard.read_bytes())
        data[600:700] = b"x" * 100
        shard.write_bytes(bytes(data))
    rc, _, err = _main(capsys, "train", "--config", CONFIG, *TINY, "train.steps=1", "data.num_workers=1",
                       f"data.sources=[{{name: bad, path: {bad}}}]", f"run.dir={tmp_path / 'run'}")
    assert rc == 2, err
    assert f"data error: data source 'bad' ({bad}): every shard is unusable" in _one_line(err)
    # A manifest that understates its vocabulary passes the checks before launch; its ids never reach the model.
    large = tmp_path / "large"
    write_source(large, shards=1, docs_per_shard=8, first_token=4090, min_len=20, max_len=30)
    _fake_manifest_tokenizer(large, "", 100)
    rc, _, err = _main(capsys, "train", "--config", CONFIG, *TINY, "train.steps=1",
                       f"data.sources=[{{name: large, path: {large}}}]", f"run.dir={tmp_path / 'run2'}")
    assert rc == 2 and "is >= model.vocab_size 4096: the shards do not match" in _one_line(err), err


def test_validation_with_the_default_cache_reaches_the_console(tmp_path, monkeypatch, capsys):
    """Neither data.cache_dir nor $MIMO_TRAIN_CACHE: the eval stream's cache lives under the run directory, as the
    training stream's does. Before: the first eval step raised "data.cache_dir: '' is not an absolute path"."""
    from tests.test_evaluation import held_out_source

    monkeypatch.delenv("MIMO_TRAIN_CACHE", raising=False)
    write_source(tmp_path / "train", shards=2, docs_per_shard=12, first_token=5, seed=3, min_len=20, max_len=90)
    rc, out, err = _main(capsys, "train", "--config", CONFIG, *TINY, "train.steps=2", "train.eval_interval=2",
                         "train.eval_samples=2", f"data.sources=[{{name: train, path: {tmp_path / 'train'}}}]",
                         f"data.eval_sources={held_out_source(tmp_path / 'held')}", f"run.dir={tmp_path / 'run'}")
    assert rc == 0, err
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    line = f"eval step 2 | held: lm {record['eval/held/lm_loss']:.4f}, mtp1 {record['eval/held/mtp_loss_depth1']:.4f}"
    assert line in out, out
