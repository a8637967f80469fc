"""mimo-train data pipeline: tokenized webdataset shards, a resumable global sample stream, mixtures, packing.

Modules, one responsibility each:
  config          the ``data:`` config section (DataConfig, SourceConfig)
  tokenizer       loading a tokenizer.json; training the builtin byte-level BPE
  shards          the shard format (webdataset tars of uint32 token ids), the manifest, shard verification
  prepare         ``mimo-train prepare-data``: raw text to shards, restartable
  builtin_corpus  the stdlib corpus, prepared on first use
  source          one source as an addressable virtual token stream (shuffled epochs, skipped bad shards)
  mixture         deterministic weighted interleaving of sources with random access
  packing         windows of seq_len + 1 tokens to input_ids / labels / position_ids
  stream          GlobalSampleStream: global sample index, stages, DP slices, prefetch, digests, state
"""

from .config import DataConfig, SourceConfig
from .packing import IGNORE_INDEX, windows_to_batch
from .prepare import add_prepare_data_parser, ensure_builtin_corpus, prepare_dataset
from .source import DataWarning
from .stream import GlobalSampleStream, digest_token_windows

__all__ = [
    "DataConfig", "SourceConfig", "GlobalSampleStream", "digest_token_windows", "add_prepare_data_parser",
    "ensure_builtin_corpus", "prepare_dataset", "windows_to_batch", "IGNORE_INDEX", "DataWarning",
]
