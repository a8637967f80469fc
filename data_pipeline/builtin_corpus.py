"""The builtin corpus: the Python standard library's source files, real text present on every machine.

The first use trains the builtin byte-level BPE on it (here) and prepares it as shards in the cache directory
(`prepare.ensure_builtin_corpus`); later uses (and the other ranks, which wait on a file lock meanwhile) find them
there. The corpus is capped to the
first ``CORPUS_BYTES`` of the sorted ``.py`` files so that preparing it takes seconds; the next ``HELDOUT_BYTES``
are the held-out source ``builtin:stdlib-heldout`` (validation on text the corpus does not contain).
"""

from __future__ import annotations

import os
import sys
import sysconfig

from .locking import file_lock

CORPUS_BYTES = 8 << 20
HELDOUT_BYTES = 256 << 10  # the held-out source (validation): the files after the corpus, this many bytes
SHARD_DOCUMENTS = 48  # ~16 shards: enough for shard shuffling and per-shard tests to mean something
CORPUS_TAG = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{CORPUS_BYTES >> 20}mb"


def stdlib_source_files(max_bytes: int = CORPUS_BYTES, skip_bytes: int = 0) -> list[str]:
    """The sorted stdlib .py files, from the first one after `skip_bytes` until `max_bytes` more are chosen."""
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(
        os.path.join(directory, name)
        for directory, subdirs, names in os.walk(root)
        if "site-packages" not in directory and "dist-packages" not in directory
        for name in names if name.endswith(".py")
    )
    chosen, total, skipped = [], 0, 0
    for path in paths:
        if skipped < skip_bytes:
            skipped += os.path.getsize(path)
            continue
        if total >= max_bytes:
            break
        chosen.append(path)
        total += os.path.getsize(path)
    return chosen


def ensure_builtin_tokenizer(cache_dir: str, vocab_size: int) -> str:
    """Path of the builtin tokenizer (a byte-level BPE of ``vocab_size`` trained on the corpus), cached."""
    from .shards import write_atomically
    from .tokenizer import train_byte_level_bpe

    path = os.path.join(cache_dir, "tokenizers", f"bpe-{vocab_size}-{CORPUS_TAG}.json")
    with file_lock(os.path.join(cache_dir, "builtin.lock")):
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            texts = (open(p, encoding="utf-8", errors="replace").read() for p in stdlib_source_files())
            write_atomically(path, train_byte_level_bpe(texts, vocab_size).to_str().encode())
    return path
