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

from .config import DataConfig, SourceConfig
from .packing import IGNORE_INDEX, windows_to_batch
from .prepare import add_prepare_data_parser, ensure_builtin_corpus, prepare_dataset
from .source import DataWarning
from .stream import GlobalSampleStream, combine_sample_digests, digest_token_windows, sample_digests

__all__ = [
    "DataConfig", "SourceConfig", "GlobalSampleStream", "digest_token_windows", "sample_digests", "combine_sample_digests", "add_prepare_data_parser",
    "ensure_builtin_corpus", "prepare_dataset", "windows_to_batch", "IGNORE_INDEX", "DataWarning",
]
