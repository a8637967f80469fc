"""mimo-train data pipeline: tokenized webdataset shards, a resumable global sample stream, mixtures, packing.

Modules, one responsibility each:
  config          the ``data:`` config section (DataConfig, SourceConfig)
  tokenizer       loading a tokenizer.json; training the builtin byte-level BPE
  shards          the shard format (webdataset tars of uint32 token ids), the manifest
  verify          size check on open, lazy sha256 with a ledger, ``mimo-train verify-data``
  remote          shards in object stores (fsspec): fetched with retries into the cache
  prepare         ``mimo-train prepare-data``: raw text to shards, restartable
  builtin_corpus  the stdlib corpus, prepared on first use
  source          one source as an addressable virtual token stream (corpus-wide mixing, skipped bad shards)
  mixture         deterministic weighted interleaving of sources with random access
  packing         int32 windows of seq_len + 1 tokens to input_ids / labels / position_ids, on the device
  stream          GlobalSampleStream: global sample index, stages, DP slices, prefetch, digests, state
"""

from importlib import import_module

from .config import DataConfig, SourceConfig

# The rest is imported on first use: `mimo_train.config` needs only the config classes, and importing the shard
# reader would pull in webdataset, which the one-GPU benchmark machine does not have (bench/gpu).
_LAZY = {
    "IGNORE_INDEX": "labels", "windows_to_batch": "packing",
    "add_prepare_data_parser": "prepare", "ensure_builtin_corpus": "prepare", "prepare_dataset": "prepare",
    "DataWarning": "source",
    "GlobalSampleStream": "stream", "combine_sample_digests": "stream", "digest_token_windows": "stream",
    "sample_digests": "stream",
}

__all__ = ["DataConfig", "SourceConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
