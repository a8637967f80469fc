"""Checks of the ``data:`` section against the files it names, before any model is built or data is read.

Each problem is one ``DataConfigError`` (a ValueError) naming the field and what to do; the trainer reports it as
a config error (one line, exit status 2). Reading manifests and the tokenizer's vocabulary costs milliseconds and
touches no shard.
"""

from __future__ import annotations

import json

import fsspec

from .config import BUILTIN_SOURCE, BUILTIN_SOURCES, BUILTIN_TOKENIZER, DataConfig
from .shards import MANIFEST_NAME, join_url, read_manifest


class DataConfigError(ValueError):
    """The data section names something that is not there, or data the model cannot take."""


def check_data_sources(data: DataConfig, model_vocab_size: int, run_dir: str | None = None) -> None:
    """Every source has a path, a directory and a manifest; the tokenizer file exists; no token id can reach
    ``model_vocab_size`` (from each manifest's recorded vocabulary, else from the tokenizer file); each source was
    tokenized with the configured tokenizer (the manifest's sha256 of it; the builtin one is found, or trained, in
    the cache under ``run_dir``)."""
    tokenizer_vocab = _tokenizer_vocab_size(data.tokenizer)
    expected = _TokenizerIdentity(data, run_dir)
    for i, source in enumerate(data.sources):
        where = f"data.sources[{i}]"
        if not getattr(source, "path", None):
            raise DataConfigError(f"{where}.path: every data source needs a path (a shard directory or "
                                  f"{BUILTIN_SOURCE!r}), source {getattr(source, 'name', '?')!r} has none")
        if source.path in BUILTIN_SOURCES:
            continue
        fs, directory = fsspec.core.url_to_fs(source.path)
        if not fs.isdir(directory):
            raise DataConfigError(f"{where}.path: no such directory {source.path!r}")
        if not fs.exists(join_url(directory, MANIFEST_NAME)):
            raise DataConfigError(f"{where}.path: {source.path!r} has no {MANIFEST_NAME}; run "
                                  f"`mimo-train prepare-data ... --out {source.path}` first")
        try:
            manifest = read_manifest(source.path)
        except (ValueError, KeyError, TypeError) as error:
            raise DataConfigError(f"{where}.path: unreadable manifest: {error}") from None
        if not manifest.shards or not sum(s.tokens for s in manifest.shards):
            raise DataConfigError(f"{where}.path: {source.path!r} holds no tokens (its manifest lists "
                                  f"{len(manifest.shards)} shards, 0 tokens); prepare it again from non-empty input")
        expected.check(where, source, manifest.tokenizer)
        vocab = manifest.tokenizer.get("vocab_size") or tokenizer_vocab
        if vocab is not None and int(vocab) > model_vocab_size:
            raise DataConfigError(f"model.vocab_size: {model_vocab_size} is too small for data source "
                                  f"{source.name!r}, whose token ids go up to {int(vocab) - 1} (vocabulary "
                                  f"{vocab}); raise model.vocab_size to at least {vocab}")


def _tokenizer_vocab_size(tokenizer: str) -> int | None:
    if tokenizer == BUILTIN_TOKENIZER:
        return None
    try:
        with fsspec.open(tokenizer, "rt") as f:
            document = json.load(f)
    except FileNotFoundError:
        raise DataConfigError(f"data.tokenizer: no such file {tokenizer!r} (give 'builtin' or a tokenizer.json "
                              f"path)") from None
    except ValueError as error:
        raise DataConfigError(f"data.tokenizer: {tokenizer!r} is not a tokenizer.json: {error}") from None
    from .tokenizer import load_tokenizer

    return load_tokenizer(tokenizer).get_vocab_size() if "model" in document else None


class _TokenizerIdentity:
    """The sha256 of the configured tokenizer file, computed once and only when a manifest records one."""

    def __init__(self, data: DataConfig, run_dir: str | None):
        self.data, self.run_dir = data, run_dir
        self._sha256: str | None = None

    def _file(self) -> str:
        if self.data.tokenizer != BUILTIN_TOKENIZER:
            return self.data.tokenizer
        from .builtin_corpus import ensure_builtin_tokenizer

        return ensure_builtin_tokenizer(self.data.resolved_cache_dir(self.run_dir), self.data.vocab_size)

    def sha256(self) -> str:
        if self._sha256 is None:
            from .tokenizer import file_sha256

            self._sha256 = file_sha256(self._file())
        return self._sha256

    def check(self, where: str, source, recorded: dict) -> None:
        """Shards of another tokenizer would train on ids that mean other tokens (or none): refused."""
        if not recorded.get("sha256") or recorded["sha256"] == self.sha256():
            return  # written without a tokenizer record (synthetic data), or by the same tokenizer
        configured = (f"the builtin tokenizer of data.vocab_size={self.data.vocab_size}"
                      if self.data.tokenizer == BUILTIN_TOKENIZER else self.data.tokenizer)
        raise DataConfigError(f"{where}.path: {source.path!r} was tokenized with another tokenizer (vocabulary "
                              f"{recorded.get('vocab_size', '?')}, sha256 {recorded['sha256'][:12]}) than "
                              f"data.tokenizer ({configured}, sha256 {self.sha256()[:12]}); set data.tokenizer to "
                              f"the tokenizer.json saved beside the shards, or prepare the data again")
