"""Checkpoints: asynchronous save and atomic publish, retention, the integrity check, exact resume of a staged run
(bit for bit in float32), and SIGKILL of real `mimo-train train` processes at every point of a save."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from mimo_train.training import checkpoint as ckpt
from mimo_train.config import load_config
from mimo_train.training.trainer import Trainer
from tests.scripts.staged import REPO, env, metrics, reference_run, strip_timing, write_config, single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


# ---- the checkpoint manager on its own ---------------------------------------------------------------------------


def _slow_writer(monkeypatch, seconds: float):
    make = ckpt._storage_writer

    def slow(path):
        writer = make(path)
        write_data = writer.write_data

        def delayed(plan, planner):
            time.sleep(seconds)
            return write_data(plan, planner)

        writer.write_data = delayed
        return writer

    monkeypatch.setattr(ckpt, "_storage_writer", slow)


def test_async_save_publishes_only_when_complete_and_retention(tmp_path, monkeypatch, capsys):
    root = tmp_path / "ckpts"
    (root / "step_00000099.tmp").mkdir(parents=True)  # a killed writer's leftovers
    (root / "step_00000098.deleting").mkdir()
    manager = ckpt.CheckpointManager(root, 0, async_save=True, keep_last=2, keep_every=4)
    assert sorted(p.name for p in root.iterdir()) == []
    original_writer = ckpt._storage_writer
    _slow_writer(monkeypatch, 1.0)
    weights = torch.arange(1000, dtype=torch.float32)
    t0 = time.perf_counter()
    manager.save(1, {"w": weights}, {"note": "one"})
    stall = time.perf_counter() - t0
    weights.add_(1)  # training goes on: the checkpoint must hold the values at the time of the save
    assert stall < 0.5, stall
    assert ckpt.find_latest(root) is None and (root / "step_00000001.tmp").is_dir()  # not visible while writing
    assert not manager.poll()
    manager.wait()
    assert ckpt.find_latest(root).name == "step_00000001" and (root / "latest").read_text() == "step_00000001"
    state = {"w": torch.zeros(1000)}
    assert ckpt.load_checkpoint(root / "step_00000001", state)["note"] == "one"
    assert torch.equal(state["w"], torch.arange(1000, dtype=torch.float32))
    assert manager.timings["write_s"] >= 1.0 > manager.timings["stall_s"]

    monkeypatch.setattr(ckpt, "_storage_writer", original_writer)
    for step in range(2, 10):
        manager.save(step, {"w": weights + step}, {"stage_boundary": step == 5}, block=step % 2 == 0)
    manager.wait()
    # The newest two, every 4th step and the stage boundary.
    assert [p.name for p in ckpt.list_checkpoints(root)] == [f"step_{s:08d}" for s in (4, 5, 8, 9)]
    assert not [p for p in root.iterdir() if p.is_dir() and not ckpt._NAME.match(p.name)]

    # Integrity: a truncated file makes a checkpoint invisible to --resume auto, and refused by a direct load.
    victim = next(p for p in (root / "step_00000009").iterdir() if p.suffix == ".distcp")
    good = victim.read_bytes()
    victim.write_bytes(good[:-1])
    assert ckpt.find_latest(root).name == "step_00000008"
    with pytest.raises(RuntimeError, match="incomplete or corrupt"):
        ckpt.load_checkpoint(root / "step_00000009", {"w": torch.zeros(1000)})
    # Bytes flipped without changing any size: in a data file (step 9) and in DCP's .metadata (step 8). Both are
    # caught by the checksums recorded while writing, reported by name and set aside (not deleted); the newest
    # checkpoint that verifies (step 5) is the one resumed from.
    victim.write_bytes(bytes(b ^ 0x5A if 100 <= i < 100 + 19 * 32 else b for i, b in enumerate(good)))
    metadata = root / "step_00000008" / ".metadata"
    raw = bytearray(metadata.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    metadata.write_bytes(bytes(raw))
    assert ckpt.find_latest(root).name == "step_00000009"  # sizes alone do not see it
    # Ranks verify a share of the files each: exactly one of two ranks reads the damaged file.
    shares = [ckpt.verify(root / "step_00000009", share=(r, 2)) for r in range(2)]
    assert sum(p is not None for p in shares) == 1 and victim.name in next(p for p in shares if p)
    capsys.readouterr()
    assert ckpt.resolve_resume("auto", root).name == "step_00000005"
    err = capsys.readouterr().err
    assert f"{root / 'step_00000009'} is corrupt" in err and f"{victim.name}: checksum" in err, err
    assert f"{root / 'step_00000008'} is corrupt" in err and ".metadata: checksum" in err, err
    assert (root / "step_00000009.corrupt").is_dir() and (root / "step_00000008.corrupt").is_dir()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000004", "step_00000005"]
    with pytest.raises(ckpt.CheckpointError, match=r"--resume .*step_00000009.corrupt: not a usable checkpoint"):
        ckpt.resolve_resume(str(root / "step_00000009.corrupt"), root)
    # Retention never deletes the verified checkpoint a run resumed from, even when an older run's later steps
    # (here a copy of step 5 as step 7) are newer (5 is a stage boundary); leftovers removal keeps the corrupt ones.
    shutil.copytree(root / "step_00000005", root / "step_00000007")
    manager2 = ckpt.CheckpointManager(root, 0, keep_last=1)
    manager2.resumed_from = 4
    manager2.apply_retention()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000004", "step_00000005", "step_00000007"]
    assert (root / "step_00000009.corrupt").is_dir()


# ---- exact resume ------------------------------------------------------------------------------------------------


def _fit(config, run_dir, *overrides):
    trainer = Trainer(load_config(config, [f"run.dir={run_dir}", *overrides]), resume="auto")
    trainer.fit()
    return trainer


def test_exact_resume_of_a_staged_run_bit_for_bit(tmp_path):
    """Stopped mid-stage (step 5) or right at the stage boundary (step 7, before the switch) and resumed: the
    same metrics.jsonl, every field but the timings, bit for bit; the same final parameters and buffers."""
    config = write_config(tmp_path, save_interval=3)
    whole = _fit(config, tmp_path / "whole")
    reference = strip_timing(metrics(tmp_path / "whole"))
    for stop in (7,):
        run_dir = tmp_path / f"split{stop}"
        _fit(config, run_dir, f"train.steps={stop}")
        assert ckpt.find_latest(run_dir / "checkpoints").name == ckpt.checkpoint_name(stop)
        resumed = _fit(config, run_dir)
        assert strip_timing(metrics(run_dir)) == reference, stop
        for (name, p), q in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
            assert torch.equal(p, q), (stop, name)


def test_corrupt_checkpoint_is_reported_and_the_previous_one_resumed(tmp_path, capsys):
    """19 x 32 bytes of the newest checkpoint's data file XOR-ed, size unchanged: --resume auto names it, sets it
    aside and resumes from the previous checkpoint, and the run ends with the uninterrupted run's metrics (before
    checksums: loaded silently, loss 2e23 and NaN gradient norms, published as a new checkpoint)."""
    config = write_config(tmp_path, save_interval=3)
    _fit(config, tmp_path / "whole")
    run_dir = tmp_path / "split"
    _fit(config, run_dir, "train.steps=9")
    root = run_dir / "checkpoints"
    assert ckpt.find_latest(root).name == ckpt.checkpoint_name(9)
    victim = root / ckpt.checkpoint_name(9) / "__0_0.distcp"
    data = bytearray(victim.read_bytes())
    for k in range(19):
        start = 4096 + k * (len(data) - 8192) // 19
        data[start:start + 32] = bytes(b ^ 0xA5 for b in data[start:start + 32])
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    _fit(config, run_dir)
    captured = capsys.readouterr()
    assert f"checkpoint {root / ckpt.checkpoint_name(9)} is corrupt or incomplete (__0_0.distcp: checksum" in captured.err
    assert f"resumed from {root / ckpt.checkpoint_name(7)} at step 7" in captured.out
    assert strip_timing(metrics(run_dir)) == strip_timing(metrics(tmp_path / "whole"))
    assert (root / (ckpt.checkpoint_name(9) + ".corrupt")).is_dir()
    assert ckpt.verify(ckpt.find_latest(root)) is None


# ---- SIGKILL at every point of a save ----------------------------------------------------------------------------


def _launch(config, run_dir, pause_at=None):
    marker = run_dir.parent / f"{run_dir.name}.paused"
    marker.unlink(missing_ok=True)
    e = {**env(), "MIMO_TEST_PAUSE_AT": pause_at or "", "MIMO_TEST_PAUSE_MARKER": str(marker)}
    cmd = [sys.executable, str(REPO / "tests/scripts/kill_points.py"), "--config", str(config), f"run.dir={run_dir}"]
    return subprocess.Popen(cmd, env=e, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), marker


def _kill_when(proc, condition, what, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()


def _loadable(root: Path):
    """What --resume auto would load, checked beyond meta.json: DCP's metadata reads and names existing files."""
    path = ckpt.find_latest(root)
    if path is not None:
        metadata = FileSystemReader(str(path)).read_metadata()
        for info in metadata.storage_data.values():
            assert (path / info.relative_path).is_file()
    return None if path is None else int(path.name.split("_")[1])


def test_sigkill_at_any_point_never_leaves_a_loadable_incomplete_checkpoint(tmp_path, tmp_path_factory):
    _, reference = reference_run(tmp_path_factory)
    config = write_config(tmp_path, save_interval=3, keep_last=3)
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    # (where to pause a save, the newest loadable checkpoint after the kill)
    chain = [
        ("write:3", None),           # inside DCP's file writes of the first (asynchronous) save
        ("before_meta:3", None),     # files written, meta.json not yet
        ("before_rename:6", 3),      # meta.json written in step_6.tmp, not renamed: step 3 stays the newest
        ("before_latest:7", 7),      # renamed into place, `latest` still names step 6: the directory scan wins
        ("during_retention:3", 9),   # step 3 renamed out of the way by retention, not yet deleted
        ("mid-step", 9),             # killed while training step 10 or 11, no save in flight
    ]
    for pause, expected in chain:
        if pause == "mid-step":
            proc, _ = _launch(config, run_dir)
            lines = run_dir / "metrics.jsonl"
            _kill_when(proc, lambda: lines.is_file() and len(lines.read_text().splitlines()) >= 10, "step 10")
        else:
            proc, marker = _launch(config, run_dir, pause)
            _kill_when(proc, marker.is_file, f"the pause at {pause}")
        assert _loadable(root) == expected, pause
        if pause.startswith("before_latest"):
            assert (root / "latest").read_text() == "step_00000006"
    final = subprocess.run([sys.executable, "-m", "mimo_train.launch.cli", "train", "--config", str(config),
                            f"run.dir={run_dir}"], env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "resumed from" in final.stdout and "step_00000009" in final.stdout
    # The interrupted, five-times-killed run wrote exactly the metrics of the uninterrupted one.
    assert strip_timing(metrics(run_dir)) == strip_timing(reference)
    assert not [p for p in root.iterdir() if p.is_dir() and not ckpt._NAME.match(p.name)]
