"""Single-process training: determinism, exact gradient accumulation, exact resume, a falling loss, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from mimo_train.config import load_config
from mimo_train.training.trainer import Trainer

BASE = ["train.seq_len=128", "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=2",
        "run.wandb_mode=disabled"]


def run(tmp_path, name, steps, *extra, resume="auto"):
    cfg = load_config("configs/train/tiny_cpu.yaml", [*BASE, f"train.steps={steps}", f"run.dir={tmp_path / name}", *extra])
    trainer = Trainer(cfg, resume=resume)
    trainer.fit(log=True)
    return trainer, [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_same_seed_gives_identical_runs_and_accumulation_is_exact(tmp_path):
    _, a = run(tmp_path, "a", 3)
    _, b = run(tmp_path, "b", 3)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["batch_digest"] for r in a] == [r["batch_digest"] for r in b]
    # One micro-batch of 4 instead of two of 2: the same global batch, the same gradient up to float rounding.
    _, c = run(tmp_path, "c", 3, "train.micro_batch_size=4")
    assert [r["batch_digest"] for r in c] == [r["batch_digest"] for r in a]
    for x, y in zip(a, c):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
            assert abs(x[key] - y[key]) <= 1e-5 * abs(y[key]), (key, x[key], y[key])
    # A different seed gives a different run.
    _, d = run(tmp_path, "d", 1, "train.seed=7")
    assert d[0]["loss"] != a[0]["loss"]


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path):
    full, whole = run(tmp_path, "whole", 4)
    run(tmp_path, "split", 2)
    resumed, split = run(tmp_path, "split", 4)  # --resume auto picks up step 2
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    assert [r["loss"] for r in split] == [r["loss"] for r in whole]
    assert [r["batch_digest"] for r in split] == [r["batch_digest"] for r in whole]
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    # Expert correction biases (buffers, moved by the trainer) are restored too.
    for (name, b), c in zip(full.model.named_buffers(), resumed.model.buffers()):
        assert torch.equal(b, c), name


def test_metrics_contents(tmp_path):
    _, records = run(tmp_path, "m", 2)
    r = records[-1]
    for key in ("step", "loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm", "lr", "tokens", "batch_digest",
                "expert_load/max_over_mean", "expert_load/cv", "expert_load/dead_experts", "expert_bias_norm"):
        assert key in r, key
    assert r["tokens"] == 2 * 4 * 128
    assert r["aux_loss"] > 0 and len(r["batch_digest"]) == 64
    assert r["expert_bias_norm"] > 0  # the bias update ran


def test_loss_falls_on_real_text(tmp_path):
    _, records = run(tmp_path, "fall", 30, "train.lr=3e-3")
    first, last = records[0]["lm_loss"], sum(r["lm_loss"] for r in records[-5:]) / 5
    # Batches mix documents from across the corpus (the packer does not take runs of neighbouring stdlib files), so
    # 30 steps lower the loss by ~0.9 nats (8.40 -> 7.46) rather than the 1.5+ that correlated batches allowed.
    assert last < first - 0.7, (first, last)


def test_cli_trains_resumes_and_reports_completion(tmp_path):
    cmd = [sys.executable, "-m", "mimo_train.launch.cli", "train", "--config", "configs/train/tiny_cpu.yaml", *BASE,
           "train.steps=2", f"run.dir={tmp_path / 'cli'}"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "step      2/2" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "is complete" in again.stdout
    bad = subprocess.run(cmd + ["model.num_experts_per_tok=99"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "model.num_experts_per_tok: top-k must be <= num_experts" in bad.stderr
    assert (tmp_path / "cli" / "config.yaml").is_file()


def test_hf_export_and_import_commands(tmp_path):
    """Export (under umask 077) gives a directory anyone can read, with the run's tokenizer; import round-trips."""
    run(tmp_path, "exp", 1)
    cli = [sys.executable, "-m", "mimo_train.launch.cli"]
    out = subprocess.run(cli + ["hf-export", str(tmp_path / "exp" / "checkpoints"), str(tmp_path / "hf"),
                                "--dtype", "fp32"],
                         capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o077))
    assert out.returncode == 0, out.stderr
    hf_dir = tmp_path / "hf"
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"} <= {
        p.name for p in hf_dir.iterdir()}
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in hf_dir.iterdir()) and hf_dir.stat().st_mode & 0o777 == 0o755
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from data_pipeline.builtin_corpus import ensure_builtin_tokenizer

    cfg = load_config(tmp_path / "exp" / "config.yaml")
    reference = Tokenizer.from_file(ensure_builtin_tokenizer(cfg.data.resolved_cache_dir(), cfg.data.vocab_size))
    text = "def train(model):\n    return model.fit()  # ok"
    assert AutoTokenizer.from_pretrained(hf_dir).encode(text, add_special_tokens=False) == reference.encode(text).ids
    back = subprocess.run(cli + ["hf-import", str(tmp_path / "hf"), str(tmp_path / "imported")],
                          capture_output=True, text=True, timeout=300)
    assert back.returncode == 0, back.stderr
    from mimo_train.training import checkpoint as ckpt
    from mimo_train.interop.hf import load_pretrained

    trained = Trainer(load_config(tmp_path / "exp" / "config.yaml"), resume="auto").model
    exported = load_pretrained(tmp_path / "hf")
    state = {"model": exported.state_dict()}
    ckpt.load_checkpoint(ckpt.find_latest(tmp_path / "imported"), state)
    for name, t in trained.state_dict().items():
        assert torch.equal(t, exported.state_dict()[name]), name
        assert torch.equal(t, state["model"][name]), name
