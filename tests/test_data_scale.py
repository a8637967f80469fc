"""Data at corpus scale: batches mixed across shards written in topic order, start-up on a 100,000-shard manifest,
compact host-to-device transfer, verify-data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch

from data_pipeline import DataConfig, GlobalSampleStream, SourceConfig
from data_pipeline.packing import windows_to_batch
from data_pipeline.shards import MANIFEST_NAME, Manifest, write_token_shard
from tests.data_helpers import EOS, write_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SEQ_LEN, TINY_GBS = 256, 8  # configs/train/tiny_cpu.yaml
SHARDS, DOCS_PER_SHARD, MAX_DOC = 64, 20, 24


def shards_of_batch(windows: np.ndarray, shard_of_token: np.ndarray) -> set[int]:
    tokens = windows[:, :-1].ravel()
    return set(shard_of_token[tokens[tokens != EOS]].tolist())


def topic_ordered_source(tmp_path):
    """Shard i holds only topic i: its token ids are a range of their own, so a token names its shard."""
    contents = write_source(tmp_path / "topics", shards=SHARDS, docs_per_shard=DOCS_PER_SHARD, first_token=1,
                            min_len=8, max_len=MAX_DOC)
    shard_of_token = np.zeros(1 + sum(len(d) for docs in contents for d in docs), dtype=np.int64)
    for shard, docs in enumerate(contents):
        for d in docs:
            shard_of_token[d] = shard
    return shard_of_token


def test_a_batch_draws_from_many_shards_written_in_topic_order(tmp_path):
    """Bound (source.py): with equal-sized shards, any 2G consecutive documents of a group of G shards hold a
    document of each of them, so a batch spanning >= 4G documents reads from >= G shards. The tiny config's batch
    (8 x 256 tokens) spans >= 2048 / (24 + 1) = 81 >= 4 x 16 documents here: >= 16 shards with G = 16."""
    shard_of_token = topic_ordered_source(tmp_path)
    group = 16
    assert TINY_GBS * TINY_SEQ_LEN // (MAX_DOC + 1) >= 4 * group

    def batches(group_shards, steps):
        config = DataConfig(sources=[SourceConfig("topics", str(tmp_path / "topics"))],
                            cache_dir=str(tmp_path / "cache"), num_workers=0, shuffle_group_shards=group_shards)
        stream = GlobalSampleStream(config)
        stream.set_stage(TINY_SEQ_LEN)
        out = []
        for step in range(steps):
            out.append(shards_of_batch(stream.local_token_windows(step, TINY_GBS).numpy(), shard_of_token))
            stream.micro_batches(step, TINY_GBS, 4)
        return out

    mixed = batches(group, steps=12)  # ~2.3 epochs of the 64 shards
    assert min(len(s) for s in mixed) >= group, [len(s) for s in mixed]
    for previous, current in zip(mixed, mixed[1:]):
        assert len(previous | current) >= group  # two consecutive batches together span many shards as well
    assert len(set().union(*mixed[:4])) >= 2 * group  # and the next batches move on to other groups
    # The control: a shard-level shuffle alone (G = 1, the order before corpus-wide mixing) reads each batch from
    # the few shards it happens to be in (a batch is ~6 shards' worth of tokens), so the bound above is real.
    unmixed = batches(1, steps=12)
    assert max(len(s) for s in unmixed) <= 8


START_UP_SCRIPT = r"""
import json, os, resource, sys, time
import torch  # noqa: F401  (imported before measuring, as the trainer has it)
from data_pipeline import DataConfig, GlobalSampleStream, SourceConfig

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

directory, cache = sys.argv[1], sys.argv[2]
before = rss_mib()
start = time.perf_counter()
stream = GlobalSampleStream(DataConfig(sources=[SourceConfig("big", directory)], cache_dir=cache, num_workers=0))
stream.set_stage(256)
opened = time.perf_counter()
batch = stream.micro_batches(0, 8, 4)
first_step = time.perf_counter()
print(json.dumps({"open_s": opened - start, "first_step_s": first_step - opened, "rss_mib": rss_mib() - before,
                  "shard_opens": stream.stats()["data/shard_opens"], "epoch_tokens": stream.sources[0].epoch_length}))
"""


def test_start_up_on_a_100k_shard_manifest_reads_no_shard(tmp_path):
    """A manifest of 100,000 shards (every entry names one small real shard, so nothing large is written):
    opening the stream reads none of them, and the first step opens one group of shards, however big the corpus."""
    shard = write_token_shard(str(tmp_path / "shard.tar"),
                              [np.arange(1 + 100 * i, 1 + 100 * i + 90, dtype=np.uint32) for i in range(50)])
    manifest = Manifest(shards=[shard] * 100_000, eos_id=EOS, tokenizer={"vocab_size": 10_000})
    (tmp_path / MANIFEST_NAME).write_text(manifest.to_json())
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", START_UP_SCRIPT, str(tmp_path), str(tmp_path / "cache")],
                         capture_output=True, text=True, env=env, timeout=300, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    print("100k-shard start-up:", figures)
    assert figures["epoch_tokens"] == 100_000 * 50 * 91
    assert figures["shard_opens"] == 64  # one group (data.shuffle_group_shards), not the corpus
    assert figures["open_s"] < 10 and figures["first_step_s"] < 10
    assert figures["rss_mib"] < 400


def test_host_to_device_bytes_are_four_per_token_and_derivation_matches_the_host(tmp_path):
    write_source(tmp_path / "src", shards=2, docs_per_shard=10, first_token=1)
    config = DataConfig(sources=[SourceConfig("src", str(tmp_path / "src"))], cache_dir=str(tmp_path / "cache"),
                        num_workers=0)
    stream = GlobalSampleStream(config)
    stream.set_stage(32)
    batches = stream.micro_batches(0, 8, 4)
    windows = stream.local_token_windows(0, 8)
    assert windows.dtype == torch.int32  # what crosses to the device: (seq_len + 1) x 4 bytes per sample
    host_bytes = windows.numel() * windows.element_size() / (8 * 32)
    tensors = [mb[key] for mb in batches for key in ("input_ids", "labels", "position_ids")]
    model_bytes = sum(t.numel() * t.element_size() for t in tensors) / (8 * 32)
    assert host_bytes == 4 * 33 / 32 and model_bytes == 24
    # the derivation on a tensor (where the device does it) equals the one on numpy rows of int64
    reference = windows_to_batch(windows.numpy().astype(np.int64), np.full(8, EOS))
    for key, value in windows_to_batch(windows, torch.full((8,), EOS, dtype=torch.int32)).items():
        assert value.dtype == torch.int64 and torch.equal(value, reference[key])
        assert torch.equal(torch.cat([mb[key] for mb in batches]), value)


def test_verify_data_command_checks_every_shard_and_fills_the_ledger(tmp_path):
    write_source(tmp_path / "src", shards=6, docs_per_shard=5, first_token=1)
    with open(tmp_path / "src" / "shard-000002.tar", "r+b") as f:
        f.seek(700)
        f.write(b"\xff" * 16)
    os.remove(tmp_path / "src" / "shard-000005.tar")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mimo_train.launch.cli", "verify-data", str(tmp_path / "src"), "--workers", "2",
               "--cache-dir", str(tmp_path / "cache")]
    half = subprocess.run([*command, "--part", "1/2"], capture_output=True, text=True, env=env, timeout=120)
    assert half.returncode == 1 and "2 of 3 shards sound (part 1/2)" in half.stdout  # shards 1, 3, 5: 5 is missing
    assert "shard-000002" not in half.stdout
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "shard-000002.tar: sha256 mismatch" in result.stdout
    assert "shard-000005.tar: missing" in result.stdout
    assert "4 of 6 shards sound" in result.stdout
    assert "verify-data" in result.stderr and "B/s" in result.stderr  # the progress bar
    # a run using the same cache hashes nothing again: every present shard has a verdict in the ledger
    assert len(os.listdir(tmp_path / "cache" / "verified-shards")) == 5
