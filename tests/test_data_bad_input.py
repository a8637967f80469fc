"""Bad input: broken shards are skipped (warned, counted, reported) without reordering the rest; config errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from data_pipeline import DataConfig, DataWarning, GlobalSampleStream, SourceConfig
from data_pipeline.shards import MANIFEST_NAME, Manifest
from tests.data_helpers import EOS, write_source

SEQ_LEN = 16


def source_tokens(config, n_windows):
    """The first ``n_windows`` windows' inputs of a one-source stream, concatenated, and the stream."""
    stream = GlobalSampleStream(config)
    stream.set_stage(SEQ_LEN)
    windows = stream.local_token_windows(0, n_windows).numpy()
    return np.concatenate([w[:-1] for w in windows]), stream


def split_documents(tokens):
    parts = np.split(tokens, np.flatnonzero(tokens == EOS) + 1)
    return [p[p != EOS].tolist() for p in parts if np.any(p != EOS)]


def test_missing_truncated_and_corrupt_shards_are_skipped_without_reordering(tmp_path):
    shards = write_source(tmp_path / "src", shards=8, docs_per_shard=10, first_token=1, seed=3)
    config = DataConfig(sources=[SourceConfig("src", str(tmp_path / "src"))], cache_dir=str(tmp_path / "cache"),
                        seed=11, num_workers=0)
    n_windows = 120  # more than one epoch (~1700 tokens): every shard is visited
    clean, _ = source_tokens(config, n_windows)

    os.remove(tmp_path / "src" / "shard-000001.tar")  # missing
    with open(tmp_path / "src" / "shard-000004.tar", "r+b") as f:  # truncated (a half-copied file)
        f.truncate(3000)
    with open(tmp_path / "src" / "shard-000006.tar", "r+b") as f:  # same size, flipped bytes: a bad tar
        f.seek(700)
        f.write(b"\xff" * 64)

    with pytest.warns(DataWarning) as caught:
        damaged, stream = source_tokens(config, n_windows)
    messages = " ".join(str(w.message) for w in caught)
    for name, reason in [("shard-000001", "missing"), ("shard-000004", "truncated"), ("shard-000006", "sha256")]:
        assert name in messages and reason in messages
    stats = stream.stats()
    assert stats["data/skipped_shards"] == 3
    assert stats["data/skipped_documents"] == 30
    assert stats["data/skipped_tokens"] == sum(len(d) for i in (1, 4, 6) for d in shards[i])
    assert "shard-000006.tar (sha256 mismatch)" in stream.report()

    # The other documents come in the same order as before: the clean stream without the bad shards' documents
    # reads exactly like the damaged one (up to where the shorter run stops, in a partly read document).
    bad_tokens = np.concatenate([d for i in (1, 4, 6) for d in shards[i]])
    expected = [d for d in split_documents(clean) if not np.isin(d, bad_tokens).any()]
    observed = split_documents(damaged)
    n = min(len(expected), len(observed)) - 1
    assert n > 40 and observed[:n] == expected[:n]
    assert not np.isin(damaged, bad_tokens).any()


def test_checksum_verdicts_are_reused_until_a_file_changes(tmp_path):
    """Nothing is hashed at start-up; the first read hashes a shard once and remembers the verdict in the cache."""
    write_source(tmp_path / "src", shards=2, docs_per_shard=4, first_token=1)
    config = DataConfig(sources=[SourceConfig("src", str(tmp_path / "src"))], cache_dir=str(tmp_path / "cache"),
                        num_workers=0)
    ledger = tmp_path / "cache" / "verified-shards"
    GlobalSampleStream(config)
    assert not ledger.exists()  # opening the stream read no shard
    source_tokens(config, 4)
    assert len(os.listdir(ledger)) == 2
    with open(tmp_path / "src" / "shard-000000.tar", "r+b") as f:
        f.seek(600)
        f.write(b"\x00\x01")  # same size, new mtime: the ledger entry no longer applies
    with pytest.warns(DataWarning, match="sha256 mismatch"):
        _, stream = source_tokens(config, 4)
    assert stream.stats()["data/skipped_shards"] == 1


def test_config_errors_name_the_field(tmp_path):
    write_source(tmp_path / "src", shards=1, docs_per_shard=3, first_token=1)
    good = SourceConfig("src", str(tmp_path / "src"))
    with pytest.raises(ValueError, match=r"data.sources\[1\].weight: must be > 0, got 0"):
        DataConfig(sources=[good, SourceConfig("other", str(tmp_path / "src"), 0)]).validate()
    with pytest.raises(ValueError, match=r"data.sources\[0\].weight: must be > 0, got -1"):
        GlobalSampleStream(DataConfig(sources=[SourceConfig("src", str(tmp_path / "src"), -1)]))
    with pytest.raises(ValueError, match=r"data.sources: must be a non-empty list"):
        DataConfig(sources=[]).validate()
    with pytest.raises(ValueError, match=r"data.sources\[1\].name: duplicate"):
        DataConfig(sources=[good, good]).validate()
    with pytest.raises(ValueError, match=r"data.num_workers"):
        DataConfig(sources=[good], num_workers=-1).validate()

    stream = GlobalSampleStream(DataConfig(sources=[good], cache_dir=str(tmp_path / "cache"), num_workers=0))
    with pytest.raises(ValueError, match=r"weights\['src'\]: must be > 0, got 0"):
        stream.set_stage(SEQ_LEN, {"src": 0})
    with pytest.raises(ValueError, match=r"weights\['nope'\]: no such data source"):
        stream.set_stage(SEQ_LEN, {"nope": 1.0})
    four_ranks = GlobalSampleStream(DataConfig(sources=[good], cache_dir=str(tmp_path / "cache")), dp_size=4)
    four_ranks.set_stage(SEQ_LEN)
    with pytest.raises(ValueError, match="global_batch_size 6 must be a positive multiple"):
        four_ranks.micro_batches(0, 6, 1)
    with pytest.raises(ValueError, match="dp_rank/dp_size"):
        GlobalSampleStream(DataConfig(sources=[good], cache_dir=str(tmp_path / "cache")), dp_rank=2, dp_size=2)


def test_an_empty_source_is_a_config_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / MANIFEST_NAME).write_text(Manifest(shards=[], eos_id=0, tokenizer={}).to_json())
    config = DataConfig(sources=[SourceConfig("empty", str(empty))], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="data source 'empty'.*is empty"):
        GlobalSampleStream(config)
    with pytest.raises(ValueError, match="no manifest.json"):
        GlobalSampleStream(DataConfig(sources=[SourceConfig("none", str(tmp_path / "nothing"))],
                                      cache_dir=str(tmp_path / "cache")))


def test_a_source_with_only_broken_shards_is_an_error(tmp_path):
    write_source(tmp_path / "src", shards=1, docs_per_shard=3, first_token=1)
    os.remove(tmp_path / "src" / "shard-000000.tar")
    config = DataConfig(sources=[SourceConfig("src", str(tmp_path / "src"))], cache_dir=str(tmp_path / "cache"),
                        num_workers=0)
    with pytest.warns(DataWarning), pytest.raises(ValueError, match="every shard is unusable"):
        source_tokens(config, 1)  # found on the first read: nothing is checked at start-up
