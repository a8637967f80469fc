"""Synthetic token sources for the data pipeline tests.

Every token id in a synthetic corpus is unique (documents hold runs of consecutive integers), so a test can
tell exactly which document and position any streamed token came from, and see repeats or gaps.
"""

from __future__ import annotations

import os

import numpy as np

from data_pipeline import DataConfig, SourceConfig
from data_pipeline.shards import MANIFEST_NAME, Manifest, write_token_shard

EOS = 0


def write_source(directory, *, shards: int, docs_per_shard: int, first_token: int, seed: int = 0,
                 min_len: int = 3, max_len: int = 40) -> list[list[np.ndarray]]:
    """Write a source of unique-token documents; returns its documents, shard by shard."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    contents, infos, next_token = [], [], first_token
    for shard in range(shards):
        docs = []
        for _ in range(docs_per_shard):
            length = int(rng.integers(min_len, max_len + 1))
            docs.append(np.arange(next_token, next_token + length, dtype=np.int64))
            next_token += length
        infos.append(write_token_shard(os.path.join(directory, f"shard-{shard:06d}.tar"), docs))
        contents.append(docs)
    manifest = Manifest(shards=infos, eos_id=EOS, tokenizer={"sha256": None, "vocab_size": next_token})
    with open(os.path.join(directory, MANIFEST_NAME), "w") as f:
        f.write(manifest.to_json())
    return contents


def two_source_config(tmp_path, *, weights=(1.0, 1.0), num_workers=0, seed=7, **source_sizes) -> DataConfig:
    """Sources "a" (tokens from 1) and "b" (tokens from 1_000_000), each 6 shards of 20 documents."""
    sizes = {"shards": 6, "docs_per_shard": 20, **source_sizes}
    write_source(tmp_path / "a", first_token=1, seed=1, **sizes)
    write_source(tmp_path / "b", first_token=1_000_000, seed=2, **sizes)
    return DataConfig(
        sources=[SourceConfig("a", str(tmp_path / "a"), weights[0]), SourceConfig("b", str(tmp_path / "b"), weights[1])],
        cache_dir=str(tmp_path / "cache"), seed=seed, num_workers=num_workers,
    )


def source_of(window: np.ndarray) -> str:
    """Which synthetic source a window belongs to (every window comes from exactly one source)."""
    token = int(window[window != EOS][0])
    return "a" if token < 1_000_000 else "b"
