"""One source's virtual token stream, addressable by token offset without reading what comes before.

A source (a directory of shards plus its manifest) is seen as an endless stream of tokens: epoch after epoch of
its documents, each followed by EOS. Epoch ``e`` visits the shards in a seeded permutation and, inside each
shard, the documents in a seeded permutation (a two-level shuffle, as webdataset's shard shuffle plus sample
shuffle, but exact and addressable). Token offsets are resolved with the manifest's per-shard token counts and
the tar index of the one shard that holds the offset, so seeking costs O(log shards) and opens one shard.

Unusable shards (missing, truncated, checksum mismatch) are found when the source is opened, skipped with a
warning and counted. They keep their place in the shard permutation with a length of zero, so the documents of
all other shards keep their relative order.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np

from .locking import file_lock
from .shards import ShardInfo, TokenShard, is_local, join_url, local_path, read_manifest, shard_problem, write_atomically

OPEN_SHARDS = 8  # open shards kept per process (LRU): consecutive windows of a source come from neighbouring shards
CACHED_LAYOUTS = 64  # per-shard document permutations kept per process (LRU)


class DataWarning(UserWarning):
    """Bad input that the stream survives (e.g. a skipped shard)."""


def stable_key(text: str) -> int:
    """A 64-bit integer for a name, identical on every machine and Python process (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def seeded_rng(*keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(keys))))


class _LRU(OrderedDict):
    def __init__(self, capacity: int, on_evict=None):
        super().__init__()
        self.capacity, self.on_evict = capacity, on_evict

    def get_or_make(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        if len(self) > self.capacity:
            _, evicted = self.popitem(last=False)
            if self.on_evict:
                self.on_evict(evicted)
        return value


class TokenSource:
    def __init__(self, name: str, directory: str, *, seed: int, cache_dir: str):
        self.name, self.directory, self.cache_dir = name, directory, cache_dir
        manifest = read_manifest(directory)
        self.eos_id = manifest.eos_id
        self.tokenizer_info = manifest.tokenizer
        self.shards = manifest.shards
        if not self.shards or sum(s.tokens for s in self.shards) == 0:
            raise ValueError(f"data source {name!r} ({directory}) is empty: its manifest lists no tokens")
        self._seed_keys = (seed, stable_key(name))

        self.bad_shards = self._find_bad_shards()
        for index, reason in sorted(self.bad_shards.items()):
            warnings.warn(f"data source {name!r}: skipping shard {self.shards[index].url}: {reason}", DataWarning, 2)
        # Each shard's share of an epoch's stream: its tokens plus one EOS per document; zero for a skipped shard.
        self._stream_lengths = np.array(
            [0 if i in self.bad_shards else s.tokens + s.nsamples for i, s in enumerate(self.shards)], dtype=np.int64
        )
        self.epoch_length = int(self._stream_lengths.sum())
        if self.epoch_length == 0:
            raise ValueError(f"data source {name!r} ({directory}): every shard is unusable: {self.bad_shards}")
        self.counters: Counter = Counter()
        self._reset_caches()

    # ---- bad input -------------------------------------------------------------------------------------------

    def _find_bad_shards(self) -> dict[int, str]:
        """Check every shard (existence, size, sha256) once; the verdicts of unchanged files are kept in a ledger
        under the cache dir, so a restart (or the other ranks of a node) do not hash the corpus again."""
        ledger_path = os.path.join(self.cache_dir, "verified-shards", f"{stable_key(self.directory):016x}.json")
        os.makedirs(os.path.dirname(ledger_path), exist_ok=True)
        with file_lock(ledger_path + ".lock"):
            try:
                with open(ledger_path) as f:
                    ledger = json.load(f)
            except (FileNotFoundError, ValueError):
                ledger = {}
            urls = [join_url(self.directory, s.url) for s in self.shards]
            with ThreadPoolExecutor(8) as pool:
                fingerprints = list(pool.map(_file_fingerprint, urls))

            def verdict(i: int) -> str | None:
                entry = ledger.get(urls[i])
                if fingerprints[i] is not None and entry and entry["fingerprint"] == [*fingerprints[i], self.shards[i].sha256]:
                    return entry["problem"]
                return shard_problem(urls[i], self.shards[i])

            with ThreadPoolExecutor(8) as pool:  # hashing releases the GIL: shards are checked in parallel
                verdicts = list(pool.map(verdict, range(len(urls))))
            for url, fingerprint, info, problem in zip(urls, fingerprints, self.shards, verdicts):
                if fingerprint is not None:
                    ledger[url] = {"fingerprint": [*fingerprint, info.sha256], "problem": problem}
            write_atomically(ledger_path, json.dumps(ledger).encode())
        return {i: problem for i, problem in enumerate(verdicts) if problem is not None}

    def skipped(self) -> dict[str, int]:
        bad = [self.shards[i] for i in self.bad_shards]
        return {"shards": len(bad), "documents": sum(s.nsamples for s in bad), "tokens": sum(s.tokens for s in bad)}

    # ---- addressing ------------------------------------------------------------------------------------------

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard visiting order of an epoch and the stream offset at which each visited shard starts."""

        def make():
            order = seeded_rng(*self._seed_keys, epoch).permutation(len(self.shards))
            starts = np.concatenate([[0], np.cumsum(self._stream_lengths[order])[:-1]])
            return order, starts

        return self._epoch_layouts.get_or_make(epoch, make)

    def _shard_layout(self, epoch: int, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Document visiting order inside a shard for an epoch, each document's offset and length (with EOS)."""

        def make():
            lengths = self._open(shard).document_lengths
            order = seeded_rng(*self._seed_keys, epoch, shard).permutation(len(lengths))
            with_eos = lengths[order] + 1
            return order, np.concatenate([[0], np.cumsum(with_eos)[:-1]]), with_eos

        return self._shard_layouts.get_or_make((epoch, shard), make)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the virtual stream (int64)."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            epoch, offset = divmod(start + filled, self.epoch_length)
            order, starts = self._epoch_layout(epoch)
            # the last shard starting at or before `offset`; zero-length (skipped) shards are never picked
            slot = int(np.searchsorted(starts, offset, side="right")) - 1
            shard = int(order[slot])
            doc_order, doc_starts, doc_lengths = self._shard_layout(epoch, shard)
            in_shard = offset - int(starts[slot])
            position = int(np.searchsorted(doc_starts, in_shard, side="right")) - 1
            within = in_shard - int(doc_starts[position])
            reader = self._open(shard)
            while filled < length and position < len(doc_order):
                tokens = reader.document(int(doc_order[position]))
                take = min(int(doc_lengths[position]) - within, length - filled)
                body = tokens[within : within + take]  # the EOS after the document is not stored in the shard
                out[filled : filled + len(body)] = body
                if len(body) < take:
                    out[filled + len(body)] = self.eos_id
                filled += take
                self.counters["document_reads"] += 1
                position, within = position + 1, 0
        return out

    # ---- shard files -----------------------------------------------------------------------------------------

    def _open(self, shard: int) -> TokenShard:
        def make():
            self.counters["shard_opens"] += 1
            info = self.shards[shard]
            return TokenShard(self._local_copy(join_url(self.directory, info.url), info), info.nsamples)

        return self._open_shards.get_or_make(shard, make)

    def _local_copy(self, url: str, info: ShardInfo) -> str:
        """A local path for the shard: itself if local, else a copy fetched through fsspec into the cache dir
        (named by its sha256, so every process and run shares it; the copy appears atomically)."""
        if is_local(url):
            return local_path(url)
        path = os.path.join(self.cache_dir, "remote-shards", f"{info.sha256}.tar")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with fsspec.open(url, "rb") as f:
                write_atomically(path, f.read())
        return path

    def _reset_caches(self) -> None:
        self._epoch_layouts = _LRU(4)
        self._shard_layouts = _LRU(CACHED_LAYOUTS)
        self._open_shards = _LRU(OPEN_SHARDS, on_evict=TokenShard.close)

    def __getstate__(self):
        # DataLoader workers get a copy without open mmaps; each reopens the shards it needs
        state = self.__dict__.copy()
        for key in ("_epoch_layouts", "_shard_layouts", "_open_shards"):
            state.pop(key)
        state["counters"] = Counter()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset_caches()


def _file_fingerprint(url: str) -> tuple | None:
    """(size, modification stamp) of a file, to tell whether a ledger verdict still applies; None if unknown."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created")
    if stamp is None:
        return None
    if is_local(url):
        stamp = os.stat(local_path(url)).st_mtime_ns
    return (int(info["size"]), str(stamp))
