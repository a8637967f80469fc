"""Smoke tests of the benchmarks at tiny sizes: they run, their RESULT lines are well-formed, and the attention
benchmark compares equal computations. No timing thresholds (timings belong to `python -m bench.<name>`)."""

from __future__ import annotations

import math

import pytest
import torch

from bench import attention, checkpoint, train_step
from bench.common import parse_result

# dcp.save/load without a process group warn that they assume a single process, which is the case here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def result_of(lines: list[str], name: str) -> dict[str, str]:
    assert lines and lines[-1].startswith("RESULT "), lines[-1:]
    assert sum(line.startswith("RESULT ") for line in lines) == 1
    got, fields = parse_result(lines[-1])
    assert got == name
    return fields


def as_float(fields: dict[str, str], key: str) -> float:
    value = float(fields[key])
    assert math.isfinite(value) and value > 0, (key, fields[key])
    return value


def test_parse_result_rejects_malformed_lines():
    assert parse_result("RESULT x ratio=1.5 a_b=2")[1] == {"ratio": "1.5", "a_b": "2"}
    for bad in ("RESULT x", "RESULT x ratio 1.5", "result x ratio=1", "RESULT x ratio=1 extra"):
        with pytest.raises(ValueError):
            parse_result(bad)


def test_hf_eager_mask_is_the_129_key_causal_window():
    mask = attention.hf_eager_mask(1, 300, 129)
    assert mask.shape == (1, 1, 300, 300) and mask.dtype == torch.float32
    allowed = mask[0, 0] == 0
    assert allowed.sum(-1).tolist() == [min(i + 1, 129) for i in range(300)]
    assert not allowed.triu(1).any()  # causal
    assert (mask[0, 0][~allowed] == torch.finfo(torch.float32).min).all()


@pytest.mark.parametrize("seq_len,window_keys", [(300, 129), (70, 17)])
def test_attention_equals_hf_eager(seq_len, window_keys):
    pair = attention.Pair(batch=2, seq_len=seq_len, heads=4, kv_heads=2, head_dim=24, v_head_dim=16,
                          window_keys=window_keys)
    diffs = pair.max_abs_diffs()
    assert diffs["out"] < 1e-5, diffs
    assert max(diffs.values()) < 1e-4, diffs  # gradients of q, k, v and the sink too


def test_attention_bench_result_line():
    lines = attention.run([64, 160], threads=1, repeats=1, batch=1, heads=2, kv_heads=1, head_dim=16,
                          v_head_dim=8, window_keys=17)
    fields = result_of(lines, "attention")
    assert as_float(fields, "ratio") == as_float(fields, "ratio_160")
    for key in ("ratio_64", "ratio_nomask_64", "ratio_nomask_160", "ours_ms", "hf_ms"):
        as_float(fields, key)
    assert fields["seq_len"] == "160" and fields["threads"] == "1"


def test_train_step_bench_result_line_and_equal_losses():
    lines = train_step.run(batch=1, seq_len=48, steps=2, threads=1, subprocesses=False)
    fields = result_of(lines, "train_step")
    for key in ("ratio", "mem_ratio", "ours_ms", "hf_ms"):
        as_float(fields, key)
    assert float(fields["loss_diff"]) < 1e-5  # the same computation on both sides
    assert fields["seq_len"] == "48"


def test_checkpoint_bench_result_line(tmp_path):
    lines = checkpoint.run(str(tmp_path), threads=1, repeats=1, overrides=(), tiny_batch=2, tiny_seq_len=32,
                           step_repeats=1, saves=1, modes=("thread",))
    fields = result_of(lines, "checkpoint")
    for key in ("ratio", "load_ratio", "save_mib_s", "raw_write_mib_s", "async_stall_frac", "sync_stall_frac",
                "checksum_frac", "verify_frac"):
        as_float(fields, key)
    assert fields["async_mode"] == "thread"
    assert any("saved==snapshot" in line for line in lines)
    assert not any(line.startswith("async thread: not measured") for line in lines)
    assert list(tmp_path.iterdir()) == []  # the benchmark cleans up after itself
