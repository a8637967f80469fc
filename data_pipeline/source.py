"""One source's virtual token stream, addressable by token offset without reading what comes before.

A source (a directory of shards plus its manifest) is seen as an endless stream of tokens: epoch after epoch of
its documents, each followed by EOS. The order of an epoch mixes documents across the whole corpus in two levels,
both seeded by (data.seed, source name, epoch), so every epoch has a new order:

1. the shards are visited in a seeded permutation, cut into groups of ``group_shards`` consecutive shards;
2. inside a group, the documents of all its shards are interleaved: each shard's documents in a seeded
   permutation, spread evenly over the group with a seeded phase per shard (slot ``j`` of a shard with ``n``
   documents sits at ``(j + phase) / n``; the group is visited by increasing slot position).

The even spread is what gives a bound rather than an expectation: between two documents of a shard with ``n_s``
of the group's ``D`` documents lie at most ``D / n_s + G - 1`` others, so **any run of ``D / n_s + G``
consecutive documents of a group holds a document of that shard**; with equal-sized shards, any ``2G``
consecutive documents hold one of every shard of their group. A global batch that spans ``4G`` documents of one
source therefore reads from at least ``G`` of its shards, whatever order the shards were written in.

Addressing needs, in memory, per shard: its manifest entry (url, sha256, counts: about 0.8 KB as Python objects,
75 MiB measured for 100,000 shards) and per epoch its place in the permutation and its group's offset (16 bytes);
per document, only for the groups being read: 16 bytes (which shard, which document, stream offset), plus the
tar index of each open shard. Nothing is read at start-up: a group's layout opens its shards (the tar
index gives each document's length) when the stream first reads from it.

A shard found unusable when it is opened (missing, wrong size, checksum mismatch, unreadable, or an object store
that keeps failing) is skipped in place: its documents keep their slots with the lengths the manifest implies,
filled with EOS, which carries no loss (``packing.py``). Every other document keeps its position in the stream, so
the verdict, which each process reaches on its own and lazily, never shifts the data of any other shard, of any
rank or of a resumed run.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np

from .remote import ShardUnavailable, cached_remote_shard
from .shards import ShardInfo, TokenShard, is_local, join_url, local_path, read_manifest
from .verify import ChecksumLedger, size_problem

CACHED_GROUP_LAYOUTS = 2  # the group being read and the next one


class DataWarning(UserWarning):
    """Bad input that the stream survives (e.g. a skipped shard)."""


class UnusableSource(ValueError):
    """A data source with nothing left to read (empty, or every shard unusable): the run cannot go on. The
    command line reports it in one line (it may arrive wrapped by a DataLoader worker, see `one_line`)."""


def one_line(error: BaseException) -> str:
    """The message of an error raised here, also when a DataLoader worker re-raised it with its traceback."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    return re.sub(rf"^(?:[\w.]+\.)?{type(error).__name__}: ", "", last)  # the traceback's `module.Type: ` prefix


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


@dataclass
class GroupLayout:
    """The visiting order of one group's documents in one epoch."""
    shards: np.ndarray  # the group's shard indices
    members: np.ndarray  # per visited document: its shard, as an index into ``shards`` (int32)
    documents: np.ndarray  # per visited document: its index inside that shard (int32)
    starts: np.ndarray  # stream offset of each visited document within the group, and the group's length (int64)


class TokenSource:
    def __init__(self, name: str, directory: str, *, seed: int, cache_dir: str, group_shards: int = 64,
                 verify_checksums: bool = True):
        self.name, self.directory, self.cache_dir = name, directory, cache_dir
        self.group_shards, self.verify_checksums = group_shards, verify_checksums
        manifest = read_manifest(directory)
        self.eos_id = manifest.eos_id
        self.tokenizer_info = manifest.tokenizer
        self.shards: list[ShardInfo] = manifest.shards
        self._documents = np.array([s.nsamples for s in self.shards], dtype=np.int64)
        self._tokens = np.array([s.tokens for s in self.shards], dtype=np.int64)
        # Each shard's share of an epoch's stream: its tokens plus one EOS per document.
        self.epoch_length = int(self._tokens.sum() + self._documents.sum())
        if not self.shards or int(self._tokens.sum()) == 0:
            raise UnusableSource(f"data source {name!r} ({directory}) is empty: its manifest lists no tokens")
        self._seed_keys = (seed, stable_key(name))
        self.bad_shards: dict[int, str] = {}  # found by this process (and reported to it by its workers)
        self.new_problems: list[tuple[int, str]] = []  # found since the last take_new_problems()
        self.counters: Counter = Counter()
        self._reset_caches()

    # ---- bad input -------------------------------------------------------------------------------------------

    def _mark_bad(self, shard: int, reason: str) -> None:
        if shard in self.bad_shards:
            return
        self.bad_shards[shard] = reason
        self.new_problems.append((shard, reason))
        warnings.warn(f"data source {self.name!r}: skipping shard {self.shards[shard].url}: {reason}", DataWarning, 3)
        if len(self.bad_shards) == len(self.shards):
            raise UnusableSource(f"data source {self.name!r} ({self.directory}): every shard is unusable: "
                                 f"{self.bad_shards}")

    def take_new_problems(self) -> list[tuple[int, str]]:
        problems, self.new_problems = self.new_problems, []
        return problems

    def skipped(self) -> dict[str, int]:
        bad = [self.shards[i] for i in self.bad_shards]
        return {"shards": len(bad), "documents": sum(s.nsamples for s in bad), "tokens": sum(s.tokens for s in bad)}

    # ---- addressing ------------------------------------------------------------------------------------------

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard visiting order of an epoch and the stream offset at which each group of shards starts."""

        def make():
            order = seeded_rng(*self._seed_keys, epoch).permutation(len(self.shards))
            lengths = (self._tokens + self._documents)[order]
            group_lengths = np.add.reduceat(lengths, np.arange(0, len(order), self.group_shards))
            return order, np.concatenate([[0], np.cumsum(group_lengths)[:-1]])

        return self._epoch_layouts.get_or_make(epoch, make)

    def _group_layout(self, epoch: int, group: int) -> GroupLayout:
        def make():
            order, _ = self._epoch_layout(epoch)
            shards = order[group * self.group_shards : (group + 1) * self.group_shards]
            lengths = [self._document_lengths(int(s)) for s in shards]
            counts = np.array([len(x) for x in lengths], dtype=np.int64)
            slot_member = np.repeat(np.arange(len(shards)), counts)
            slot_rank = np.concatenate([np.arange(c) for c in counts])
            phases = seeded_rng(*self._seed_keys, epoch, group).random(len(shards))
            visit = np.argsort((slot_rank + phases[slot_member]) / counts[slot_member], kind="stable")
            # the j-th slot of a shard takes the j-th document of the shard's own seeded permutation
            slot_document = np.concatenate([seeded_rng(*self._seed_keys, epoch, int(s)).permutation(c)
                                            for s, c in zip(shards, counts)])
            first_of_member = np.concatenate([[0], np.cumsum(counts)[:-1]])
            members, documents = slot_member[visit], slot_document[visit]
            with_eos = np.concatenate(lengths)[first_of_member[members] + documents] + 1
            starts = np.concatenate([[0], np.cumsum(with_eos)])
            return GroupLayout(shards, members.astype(np.int32), documents.astype(np.int32), starts)

        return self._group_layouts.get_or_make((epoch, group), make)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the virtual stream (int32)."""
        out = np.empty(length, dtype=np.int32)
        filled = 0
        while filled < length:
            epoch, offset = divmod(start + filled, self.epoch_length)
            _, group_starts = self._epoch_layout(epoch)
            # the last group starting at or before `offset` (a group without documents is never picked)
            group = int(np.searchsorted(group_starts, offset, side="right")) - 1
            layout = self._group_layout(epoch, group)
            in_group = offset - int(group_starts[group])
            position = int(np.searchsorted(layout.starts, in_group, side="right")) - 1
            within = in_group - int(layout.starts[position])
            while filled < length and position < len(layout.members):
                shard = int(layout.shards[layout.members[position]])
                take = min(int(layout.starts[position + 1] - layout.starts[position]) - within, length - filled)
                reader = self._open(shard)
                if reader is None:  # skipped in place: the slot is kept, filled with EOS (no loss is taken on it)
                    out[filled : filled + take] = self.eos_id
                else:
                    body = reader.document(int(layout.documents[position]))[within : within + take]
                    out[filled : filled + len(body)] = body
                    if len(body) < take:  # the EOS after the document is not stored in the shard
                        out[filled + len(body)] = self.eos_id
                filled += take
                self.counters["document_reads"] += 1
                position, within = position + 1, 0
        return out

    # ---- shard files -----------------------------------------------------------------------------------------

    def _document_lengths(self, shard: int) -> np.ndarray:
        """Token count of each document of a shard: from its tar index, or, for a skipped shard, the manifest's
        tokens spread evenly over its documents (the slots only have to have a fixed, known size)."""
        reader = self._open(shard)
        if reader is not None:
            return reader.document_lengths
        n, tokens = int(self._documents[shard]), int(self._tokens[shard])
        return np.full(n, tokens // max(n, 1), dtype=np.int64) + (np.arange(n) < tokens % max(n, 1))

    def _open(self, shard: int) -> TokenShard | None:
        """The open shard, or None if it is unusable (found now, on its first open, or before)."""
        if shard in self.bad_shards:
            return None
        try:
            return self._open_shards.get_or_make(shard, lambda: self._open_checked(shard))
        except ShardUnavailable as problem:
            self._mark_bad(shard, str(problem))
            return None

    def _open_checked(self, shard: int) -> TokenShard:
        info = self.shards[shard]
        url = join_url(self.directory, info.url)
        if is_local(url):
            path = local_path(url)
            problem = size_problem(path, info)
            if problem is None and self.verify_checksums:
                problem = ChecksumLedger(self.cache_dir).checksum_problem(path, info.sha256)
            if problem is not None:
                raise ShardUnavailable(problem)
        else:
            path = cached_remote_shard(url, info, self.cache_dir, self.verify_checksums)
        self.counters["shard_opens"] += 1
        try:
            reader = TokenShard(path, info.nsamples)
        except Exception as error:  # noqa: BLE001 - a damaged tar fails in many ways inside the tar index
            raise ShardUnavailable(f"unreadable: {error}") from None
        if len(reader.document_lengths) != info.nsamples or int(reader.document_lengths.sum()) != info.tokens:
            reader.close()
            raise ShardUnavailable("its documents disagree with the manifest")
        return reader

    def _reset_caches(self) -> None:
        self._epoch_layouts = _LRU(2)
        self._group_layouts = _LRU(CACHED_GROUP_LAYOUTS)
        # the shards of the groups being read stay open (an mmap and a tar index each)
        self._open_shards = _LRU(CACHED_GROUP_LAYOUTS * self.group_shards, on_evict=TokenShard.close)

    def __getstate__(self):
        # DataLoader workers get a copy without open mmaps; each reopens the shards it needs
        state = self.__dict__.copy()
        for key in ("_epoch_layouts", "_group_layouts", "_open_shards"):
            state.pop(key)
        state["counters"] = Counter()
        state["new_problems"] = []
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset_caches()
