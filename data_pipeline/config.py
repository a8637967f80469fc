"""Configuration of the data pipeline: the ``data:`` section of a training YAML.

Plain dataclasses with simple-typed fields, so the trainer's YAML loader can build them from nested dicts.
``validate()`` raises ``ValueError`` with a message that names the offending field.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

BUILTIN_SOURCE = "builtin:stdlib"
# Held-out text for validation: the standard library's sources that follow the builtin corpus (never trained on).
BUILTIN_HELDOUT = "builtin:stdlib-heldout"
BUILTIN_SOURCES = (BUILTIN_SOURCE, BUILTIN_HELDOUT)
BUILTIN_TOKENIZER = "builtin"
CACHE_ENV_VAR = "MIMO_TRAIN_CACHE"


@dataclass
class SourceConfig:
    name: str
    # a directory (local or fsspec URL) holding shards + manifest.json, or the literal "builtin:stdlib"; no default,
    # but an absent one is reported by validate() with the field's name rather than as a TypeError
    path: str = ""
    weight: float = 1.0

    def validate(self, where: str = "data.sources[0]") -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"{where}.name: must be a non-empty string, got {self.name!r}")
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"{where}.path: every data source needs a path (a shard directory, an fsspec URL or "
                             f"{BUILTIN_SOURCE!r}); source {self.name!r} has {self.path!r}")
        check_weight(f"{where}.weight", self.weight)


def _default_sources() -> list[SourceConfig]:
    return [SourceConfig("stdlib", BUILTIN_SOURCE, 1.0)]


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=_default_sources)
    tokenizer: str = BUILTIN_TOKENIZER  # "builtin" (byte-level BPE trained on the stdlib) or a path to a tokenizer.json
    vocab_size: int = 4096  # size for the builtin tokenizer
    # builtin tokenizer and corpus, copies of remote shards, checksum verdicts. Empty: $MIMO_TRAIN_CACHE if set,
    # else <run.dir>/cache. A relative path is taken under run.dir (never the working directory).
    cache_dir: str = ""
    seed: int = 1234
    num_workers: int = 1  # DataLoader workers for prefetch (0: read in the calling process)
    prefetch_factor: int = 2
    shuffle_group_shards: int = 64  # shards whose documents are interleaved together (see source.py)
    verify_checksums: bool = True  # sha256 of each shard on its first read (the size is always checked)

    def validate(self) -> None:
        if not isinstance(self.sources, list) or not self.sources:
            raise ValueError(f"data.sources: must be a non-empty list of sources, got {self.sources!r}")
        seen: set[str] = set()
        for i, source in enumerate(self.sources):
            if not isinstance(source, SourceConfig):
                raise ValueError(f"data.sources[{i}]: must be a SourceConfig, got {type(source).__name__}")
            source.validate(f"data.sources[{i}]")
            if source.name in seen:
                raise ValueError(f"data.sources[{i}].name: duplicate source name {source.name!r}")
            seen.add(source.name)
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError(f"data.tokenizer: must be 'builtin' or a path to a tokenizer.json, got {self.tokenizer!r}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 260:
            # a byte-level BPE needs the 256 byte symbols plus the special tokens
            raise ValueError(f"data.vocab_size: must be an integer >= 260, got {self.vocab_size!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"data.seed: must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"data.num_workers: must be an integer >= 0, got {self.num_workers!r}")
        if not isinstance(self.prefetch_factor, int) or self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor: must be an integer >= 1, got {self.prefetch_factor!r}")
        if isinstance(self.shuffle_group_shards, bool) or not isinstance(self.shuffle_group_shards, int) \
                or self.shuffle_group_shards < 1:
            raise ValueError(f"data.shuffle_group_shards: must be an integer >= 1, got {self.shuffle_group_shards!r}")
        if not isinstance(self.verify_checksums, bool):
            raise ValueError(f"data.verify_checksums: must be true or false, got {self.verify_checksums!r}")

    def resolved_cache_dir(self, run_dir: str | None = None) -> str:
        """The cache directory: ``cache_dir`` if set (under ``run_dir`` if relative), else $MIMO_TRAIN_CACHE, else
        ``<run_dir>/cache``."""
        return resolve_cache_dir(self.cache_dir or os.environ.get(CACHE_ENV_VAR, ""), run_dir)


def resolve_cache_dir(cache_dir: str, run_dir: str | None) -> str:
    """An absolute cache directory; a relative or empty one lives under the run directory, never under the CWD."""
    if os.path.isabs(cache_dir):
        return cache_dir
    if run_dir is None:
        raise ValueError(f"data.cache_dir: {cache_dir!r} is not an absolute path and there is no run directory to put "
                         f"it under; give an absolute data.cache_dir or set ${CACHE_ENV_VAR}")
    return os.path.join(os.path.abspath(run_dir), cache_dir or "cache")


def check_weight(where: str, weight: object) -> None:
    """A mixture weight must be a finite number > 0 (a zero weight would make a source silently vanish)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"{where}: must be a number > 0, got {weight!r}")
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{where}: must be > 0, got {weight!r}")
