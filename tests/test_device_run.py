"""The fixes behind the first GPU run, each on a CPU: attention metadata without document ids sized for one document
per row (and the train bench's batches carrying their bound), the FP8 probe's operands that expose a wrong scale
layout, our vocab-parallel cross-entropy against the unsharded one and megatron-core's, no gloo group on the fake
process group, the benchmark's JSON after every section (kept across runs) and its git-ignored default folder, and
the device run's reading of exit statuses, budget and rerun command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from parallel.kernels import fp8
from mimo_train.model.kernels.metadata import AttentionMetadata, document_ids

REPO = Path(__file__).resolve().parents[1]


def test_metadata_without_document_ids_is_one_document_per_row():
    meta = AttentionMetadata(None, 2, 8, "cpu")
    assert meta.max_documents == 1
    assert meta.cu_seqlens().tolist() == [0, 8, 16]
    assert meta.slice(2, 8).cu_seqlens().tolist() == [0, 6, 12]
    with_ids = AttentionMetadata(document_ids(torch.arange(8).expand(2, 8)), 2, 8, "cpu")
    assert with_ids.max_documents == 9  # document ids without a bound: always correct, S + 1 slots


def test_the_train_bench_batch_carries_its_document_bound():
    from bench.gpu.train import synthetic_batch
    from mimo_train.config import CONFIG_ROOT, load_model_config
    from mimo_train.model import MiMoForCausalLM

    cfg = load_model_config(CONFIG_ROOT / "model" / "mimo_tiny.yaml", ["model.num_layers=1"])
    batch = synthetic_batch(cfg.vocab_size, 2, 16, "cpu", seed=0)
    meta = MiMoForCausalLM(cfg).prepare(batch["input_ids"], batch["position_ids"], batch["labels"],
                                        max_documents=batch["max_documents"]).attn_meta
    assert meta.max_documents == 2 and int(meta.doc_ids.max()) < 2
    assert meta.cu_seqlens().tolist() == [0, 0, 16, 16, 32]  # one document per row, two slots a row


def _wrong_layout(a, a_scale, b, b_scale, out_dtype, *, b_rows):
    """A blockwise GEMM that reads its scales in the wrong order (each operand's tile or block scales reversed)."""
    a_full = fp8.dequantize_blocks(a, a_scale.flip(-1), 1)
    b_full = fp8.dequantize_blocks(b, b_scale.flip(0), b_rows)
    return (a_full @ b_full.t()).to(out_dtype)


def _right_layout(a, a_scale, b, b_scale, out_dtype, *, b_rows):
    return (fp8.dequantize_blocks(a, a_scale, 1) @ fp8.dequantize_blocks(b, b_scale, b_rows).t()).to(out_dtype)


def test_fp8_probe_operands_expose_a_wrong_scale_layout(monkeypatch):
    """probe_errors is the check blockwise_probe makes on a GPU: the right layout is within the bound, a wrong one
    is O(1) off on tiles of different magnitudes; all-ones operands (the old probe) cannot tell them apart."""
    right, wrong = fp8.probe_errors(_right_layout, "cpu"), fp8.probe_errors(_wrong_layout, "cpu")
    assert all(e < fp8.EMULATION_REL_TOLERANCE for e in right.values()), right
    assert all(e > 0.3 for e in wrong.values()), wrong
    monkeypatch.setattr(fp8, "magnitude_tiles", lambda rows, cols, **_: torch.ones(rows, cols, dtype=torch.bfloat16))
    assert all(e == 0 for e in fp8.probe_errors(_wrong_layout, "cpu").values())


def test_vocab_parallel_cross_entropy_equals_unsharded_and_megatron_on_two_ranks():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "tests/scripts/vocab_parallel_ce.py")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.count("OK rank") == 2, run.stdout


def test_no_gloo_group_on_the_fake_process_group(tmp_path, monkeypatch):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from mimo_train.training.checkpoint import CheckpointManager

    made = []
    monkeypatch.setattr(dist, "new_group", lambda *a, **k: made.append(k) or None)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2, timeout=timedelta(seconds=30))
    try:
        manager = CheckpointManager(tmp_path, 0, distributed=True)
    finally:
        dist.destroy_process_group()
    assert manager.group is None and made == []


def test_bench_json_is_written_after_each_section_and_kept_across_runs(tmp_path, monkeypatch):
    """A section that cannot import fails alone (its handler catches the import), the JSON holds the sections
    before it, and a later run of other sections keeps them."""
    from bench.gpu.__main__ import main, parse_args

    monkeypatch.setitem(sys.modules, "bench.gpu.gemm", None)  # import bench.gpu.gemm raises ImportError
    with pytest.raises(ImportError):  # --smoke re-raises (CI must fail), after writing what it has
        main(["--smoke", "--only", "env", "gemm", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert saved["sections"]["env"]["status"] == "ok" and saved["failed_sections"] == ["gemm"]
    assert [r["name"] for r in saved["results"]] == ["env"]
    monkeypatch.delitem(sys.modules, "bench.gpu.gemm")
    from bench.gpu.harness import Harness

    h = Harness(smoke=True, device=torch.device("cpu"), json_path=tmp_path / "bench_gpu.json", replacing=("gemm",))
    with h.section("gemm"):
        h.result("gemm", kind="stand_in")
    h.write_json()
    saved = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert [r["name"] for r in saved["results"]] == ["env", "gemm"] and saved["failed_sections"] == []
    default = parse_args([]).json
    assert default.is_relative_to(REPO / "runs")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(default)], cwd=REPO)
    assert ignored.returncode == 0, f"{default} is not git-ignored"


def test_device_run_reads_exit_statuses_and_writes_the_rerun_command(tmp_path):
    from bench.gpu import device_run

    assert device_run.outcome("tests_kernels", 5, cuda=False) == "deselected"
    assert device_run.outcome("tests_kernels", 5, cuda=True) == "failed_no_tests_ran"
    assert device_run.outcome("bench", None, cuda=True) == "timeout"
    (tmp_path / "bench_gpu.json").write_text(json.dumps({"sections": {"env": {"status": "ok"},
                                                                      "swa": {"status": "failed"}}}))
    assert device_run.unfinished_sections(tmp_path, ("env", "swa", "layer")) == ["swa", "layer"]
    # a budget too small for anything: every part is deferred, and the summary says how to run them
    assert device_run.main(["--out", str(tmp_path), "--budget", "1"]) == 1
    lines = [json.loads(line) for line in (tmp_path / "parts.jsonl").read_text().splitlines()]
    assert [r["status"] for r in lines[:-1]] == ["deferred"] * 4
    assert lines[-1]["rerun"].startswith(f"bash bench/gpu/device_run.sh {tmp_path} --parts env tests_kernels "
                                         "tests_training bench --sections")


def test_device_check_names_what_triton_needs(monkeypatch, tmp_path):
    from bench.gpu import device_check

    monkeypatch.setenv("CC", "/opt/bin/cc")
    assert device_check.c_compiler() == "/opt/bin/cc"  # Triton's order: $CC first
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc, no clang
    assert device_check.c_compiler() is None
    assert device_check.python_header().name == "Python.h"
    found, missing = device_check.checks()
    assert found["c_compiler"] is None and any("C compiler" in m for m in missing) and "CUDA" in missing
