"""Monitoring: the offline wandb run files (read back record by record) hold every metric, a resumed run continues
the same wandb run id, metrics.jsonl has one line per step across resumes, the console shows loss, tokens/s, MFU
and ETA, and MFU uses the sliding-window-aware FLOPs count."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from mimo_train.config import load_config
from mimo_train.model.info import model_report
from mimo_train.training.metrics import peak_tflops, resolve_wandb_mode
from mimo_train.training.trainer import Trainer
from tests.scripts.staged import write_config, single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


EXPECTED = ["loss", "lm_loss", "mtp_loss", "mtp_loss_depth1", "aux_loss", "grad_norm", "lr", "tokens",
            "tokens_per_s", "model_tflops_per_device", "mfu", "memory/rss_gib", "memory/peak_rss_gib",
            "expert_load/max_over_mean", "expert_load/min_over_mean", "expert_load/cv", "expert_load/dead_experts",
            "expert_load/cv_per_layer/0", "expert_load/max_over_mean_per_layer/10", "expert_load/dead_experts_per_layer/3",
            "expert_bias_norm", "expert_bias_norm_per_layer/0", "skipped_steps", "global_batch_size", "seq_len"]


def read_wandb_records(path: Path):
    """The records of a `run-<id>.wandb` file: wandb's LevelDB-style log (7-byte header ':W&B' + magic + version,
    32 KiB blocks of chunks with a 7-byte header: CRC32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, pos, pending = [], 7, b""
    block = 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # full or last
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_dir: Path):
    """{step: {key: value}} over every offline run directory of the run (a resume adds one), and the run ids."""
    history, ids = {}, set()
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in read_wandb_records(f):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                history.setdefault(row["_step"], {}).update(row)
    return history, ids


def test_wandb_offline_files_metrics_jsonl_and_console(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: "auto" means offline
    assert resolve_wandb_mode("auto") == "offline"
    config = write_config(tmp_path, save_interval=2)
    run_dir = tmp_path / "run"
    common = [f"run.dir={run_dir}", "run.wandb_mode=auto", "run.peak_tflops=0.5"]
    Trainer(load_config(config, [*common, "train.steps=3"]), resume="auto").fit()
    first_out = capsys.readouterr().out
    Trainer(load_config(config, [*common, "train.steps=5"]), resume="auto").fit()
    second_out = capsys.readouterr().out
    assert "resumed from" in second_out and "step_00000003" in second_out

    # metrics.jsonl: one line per step, no duplicates, across the resume.
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4, 5]
    for key in ("checkpoint/stall_s",):  # the save at step 2 is reported with step 3, the one at 4 with step 5
        assert key in lines[2] and key in lines[4]
    cfg = load_config(config)
    flops = model_report(cfg.model, 64)["flops_per_token"]["total"]  # sliding-window-aware, MTP included
    for l in lines:
        expected = flops * l["global_batch_size"] * 64 / l["step_time_s"] / 1e12
        assert l["model_tflops_per_device"] == pytest.approx(expected, rel=1e-6)
        assert l["mfu"] == pytest.approx(l["model_tflops_per_device"] / 0.5, rel=1e-9)

    # The wandb files: the same run id before and after the resume, every metric of every step.
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    history, ids = wandb_history(run_dir)
    assert ids == {run_id}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
    assert sorted(history) == [1, 2, 3, 4, 5]
    for step, row in history.items():
        missing = [k for k in EXPECTED if k not in row]
        assert not missing, (step, missing)
        assert row["loss"] == lines[step - 1]["loss"]
    assert history[3]["checkpoint/stall_s"] == lines[2]["checkpoint/stall_s"]

    # Console: step, loss, tokens/s, MFU, ETA.
    progress = [l for l in (first_out + second_out).splitlines() if l.startswith("step ")]
    assert len(progress) == 5
    assert all(all(word in l for word in ("loss", "tok/s", "MFU", "ETA")) for l in progress)


def test_peak_flops_per_device_type(monkeypatch):
    cfg = load_config("configs/train/tiny_cpu.yaml").run
    assert peak_tflops(cfg) == cfg.device_peak_tflops["cpu"]
    cfg.peak_tflops = 123.0
    assert peak_tflops(cfg) == 123.0
    cfg.peak_tflops = 0.0
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert peak_tflops(cfg) == 989.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA GB200")
    assert peak_tflops(cfg) == 2500.0  # the longest matching key wins (not "B200")


def test_startup_banner_log_file_skipped_shards_and_wandb_mode_from_the_environment(tmp_path, capsys, monkeypatch):
    """One CLI run on a source with a missing shard, run.wandb_mode=disabled but WANDB_MODE=offline: the banner, the
    skipped shard in metrics.jsonl, wandb and the final summary, and train.log with the console's lines."""
    import os

    from mimo_train.launch import cli
    from tests.data_helpers import write_source

    write_source(tmp_path / "src", shards=4, docs_per_shard=10, first_token=1, seed=3, max_len=20)
    os.remove(tmp_path / "src" / "shard-000001.tar")
    config = tmp_path / "config.yaml"
    config.write_text(f"model: mimo_tiny\ndata:\n  sources: [{{name: src, path: {tmp_path / 'src'}}}]\n"
                      f"  num_workers: 0\n  cache_dir: {tmp_path / 'cache'}\n")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import mimo_train.training.trainer as trainer_module

    timeouts = []
    monkeypatch.setattr(trainer_module, "init_distributed", lambda timeout_s, **_: timeouts.append(timeout_s) or (0, 1))
    run_dir = tmp_path / "run"
    rc = cli.main(["train", "--config", str(config), "train.steps=3", "train.seq_len=64", "train.global_batch_size=2",
                   "train.micro_batch_size=2", "run.wandb_mode=disabled", f"run.dir={run_dir}",
                   "run.process_group_timeout_s=77"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "mimo-train: model 4.32M parameters (4.08M without MTP), 2.46M active per token; 1 process" in out
    assert "stage main: layout tp=1 pp=1 dp=1 cp=1 ep=1 etp=1, 2 x 64 = 128 tokens per step" in out
    assert f"checkpoints: {run_dir / 'checkpoints'}" in out
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["data/skipped_shards"] == 1 and lines[-1]["data/skipped_documents"] == 10
    assert "skipped shard" in out and "shard-000001.tar (missing" in out
    # When an earlier test of this process started the wandb session, its service may still be writing the offline
    # file after finish() returned: wait for the last step to be in it.
    deadline = time.time() + 60
    while 3 not in (history := wandb_history(run_dir)[0]) and time.time() < deadline:
        time.sleep(0.5)
    assert history[3]["data/skipped_shards"] == 1, sorted(history)
    log = (run_dir / "train.log").read_text()
    assert "mimo-train: model 4.32M parameters" in log and "step      3/3" in log and "skipped shard" in log
    assert "shard-000001" in log  # the data warning (stderr) is in the log too
    assert timeouts == [77]  # the process-group timeout is the config's
