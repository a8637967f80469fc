"""The global sample stream: the data position is a global sample index.

Global sample ``g`` is a pure function of (seed, sources, stage history, g): the stage containing ``g`` says
which source it comes from and which window of that source (``mixture.py``), and the window is a fixed range of
the source's virtual token stream (``source.py``, ``packing.py``). A global batch is a run of consecutive
indices; data-parallel rank ``r`` of ``dp`` takes the ``r``-th contiguous slice of it. Hence the global
batches do not depend on the DP size, and the whole data position is a handful of integers:

* ``consumed_samples``: samples handed out so far (the sum of earlier global batch sizes, so batch-size
  ramp-up needs nothing special);
* the current stage: its first global sample, ``seq_len``, mixture weights, and for each source the token
  offset at which its windows start in this stage.

A stage boundary (``set_stage`` with a new ``seq_len`` or new weights after samples were consumed) starts every
source's new windows at its first token that was not yet an input, so no token is repeated or skipped; a
document cut by the boundary continues in the source's first window of the new stage (see ``packing.py``).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import BUILTIN_HELDOUT, BUILTIN_SOURCES, DataConfig, check_weight
from .mixture import MixtureSchedule
from .packing import documents_bound, to_device, windows_to_batch
from .source import DataWarning, TokenSource, UnusableSource, stable_key

STATE_VERSION = 1


@dataclass
class Stage:
    start_sample: int  # global index of the stage's first sample
    seq_len: int
    weights: tuple[float, ...]  # per source, in config order
    source_offsets: tuple[int, ...]  # per source: stream offset of its first window in this stage
    seed: int
    schedule: MixtureSchedule = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # The stage start is part of the seed, so every stage interleaves its sources differently.
        self.schedule = MixtureSchedule(list(self.weights), (self.seed, self.start_sample))

    def windows(self, global_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source and stream offset of the window of each global sample index (which must be in this stage)."""
        stage_indices = np.asarray(global_indices, dtype=np.int64) - self.start_sample
        if stage_indices.size and stage_indices.min() < 0:
            raise ValueError(f"sample {int(stage_indices.min()) + self.start_sample} precedes the current stage "
                             f"(it starts at sample {self.start_sample}); earlier stages are not kept")
        sources, ordinals = self.schedule.locate(stage_indices)
        return sources, np.asarray(self.source_offsets)[sources] + ordinals * self.seq_len

    def offsets_after(self, global_count: int) -> tuple[int, ...]:
        """Each source's first unused stream offset once the first ``global_count`` samples are consumed."""
        counts = self.schedule.prefix_counts(global_count - self.start_sample)
        return tuple(int(o + c * self.seq_len) for o, c in zip(self.source_offsets, counts))


class WindowReader:
    """Reads the packed windows of global samples (picklable: DataLoader workers get a copy)."""

    def __init__(self, sources: list[TokenSource]):
        self.sources = sources

    def read(self, stage: Stage, global_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows ``[n, seq_len + 1]`` (int32) of global samples, and each window's EOS id (int32)."""
        sources, offsets = stage.windows(global_indices)
        seq_len = stage.seq_len
        windows = np.empty((len(sources), seq_len + 1), dtype=np.int32)
        # Consecutive samples of a source are consecutive windows of its stream: read each such run as one token
        # range and cut it into windows, rather than resolving every window on its own.
        run_start = 0
        for row in range(1, len(sources) + 1):
            if row < len(sources) and sources[row] == sources[row - 1] and offsets[row] == offsets[row - 1] + seq_len:
                continue
            count = row - run_start
            tokens = self.sources[sources[run_start]].read(int(offsets[run_start]), count * seq_len + 1)
            for k in range(count):
                windows[run_start + k] = tokens[k * seq_len : (k + 1) * seq_len + 1]
            run_start = row
        eos = np.array([self.sources[s].eos_id for s in sources], dtype=np.int32)
        return windows, eos

    def take_new_problems(self) -> list[tuple[int, int, str]]:
        """(source, shard, reason) of the shards found unusable since the last call."""
        return [(i, shard, reason) for i, s in enumerate(self.sources) for shard, reason in s.take_new_problems()]

    def absorb_problems(self, problems: list[tuple[int, int, str]]) -> None:
        """Record shards that a prefetch worker found unusable (warned and counted in this process)."""
        for source, shard, reason in problems:
            self.sources[source]._mark_bad(shard, reason)
        self.take_new_problems()


def _init_worker(worker_id: int) -> None:
    """Prefetch workers leave stopping to the trainer: Slurm signals every process of a job step (SIGTERM on
    preemption), and a worker that died of it would crash the trainer before it could checkpoint. They leave
    reporting bad shards to it too: each step's item carries what the worker found."""
    import signal

    warnings.simplefilter("ignore", DataWarning)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def rank_sample_indices(start: int, global_batch_size: int, dp_rank: int, dp_size: int) -> np.ndarray:
    """Global sample indices of one rank's slice of the global batch that starts at ``start``."""
    per_rank = global_batch_size // dp_size
    return np.arange(start + dp_rank * per_rank, start + (dp_rank + 1) * per_rank)


def split_micro_batches(windows: torch.Tensor, eos: torch.Tensor, micro_batch_size: int,
                        device=None) -> list[dict[str, torch.Tensor]]:
    """Model-ready micro-batches on ``device``: one copy of the compact int32 windows, then the derivation there.
    Each also carries ``max_documents``, a host-side bound on the documents of its rows (for the attention kernels)."""
    starts = range(0, len(windows), micro_batch_size)
    bounds = [documents_bound(windows[m : m + micro_batch_size], eos[m : m + micro_batch_size]) for m in starts]
    windows, eos = to_device(windows, eos, device)
    return [{**windows_to_batch(windows[m : m + micro_batch_size], eos[m : m + micro_batch_size]), "max_documents": b}
            for m, b in zip(starts, bounds)]


class _PrefetchedSteps(IterableDataset):
    """This rank's windows for the steps ahead, assuming the global batch size stays the same.

    An item is one step's windows as a single int32 tensor: one shared-memory transfer per step, of the
    smallest form of the data (the three int64 model tensors are 6x its size and are built where the batch lands),
    with the shards the worker found unusable meanwhile. DataLoader workers take steps
    round-robin (worker w builds steps w, w+W, ...) and the DataLoader returns them in order, so prefetching
    never changes the order. If the trainer asks for anything else (another batch size, a new stage, a
    resume), the stream discards this iterator and starts a new one.
    """

    def __init__(self, reader, stage, start, global_batch_size, dp_rank, dp_size):
        self.reader, self.stage, self.start = reader, stage, start
        self.global_batch_size, self.dp_rank, self.dp_size = global_batch_size, dp_rank, dp_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        step = worker
        while True:
            indices = rank_sample_indices(self.start + step * self.global_batch_size, self.global_batch_size,
                                          self.dp_rank, self.dp_size)
            windows, eos = self.reader.read(self.stage, indices)
            yield torch.from_numpy(windows), torch.from_numpy(eos), self.reader.take_new_problems()
            step += workers


@dataclass
class _Served:
    """The last step handed out, so that asking for the same step again returns the same data."""
    step: int
    start: int
    global_batch_size: int
    micro_batch_size: int
    device: object
    windows: torch.Tensor  # this rank's int32 windows on the host, kept for the step's sample digests
    eos: torch.Tensor
    batches: list


class GlobalSampleStream:
    def __init__(self, data: DataConfig, *, dp_rank: int = 0, dp_size: int = 1, run_dir: str | None = None):
        data.validate()
        if not (isinstance(dp_size, int) and dp_size >= 1 and isinstance(dp_rank, int) and 0 <= dp_rank < dp_size):
            raise ValueError(f"dp_rank/dp_size: need 0 <= dp_rank < dp_size, got {dp_rank}/{dp_size}")
        self.data, self.dp_rank, self.dp_size = data, dp_rank, dp_size
        cache_dir = data.resolved_cache_dir(run_dir)
        self.sources = [TokenSource(s.name, self._source_directory(s.path, data, cache_dir), seed=data.seed,
                                    cache_dir=cache_dir, group_shards=data.shuffle_group_shards,
                                    verify_checksums=data.verify_checksums) for s in data.sources]
        self.names = [s.name for s in data.sources]
        self._check_tokenizers(cache_dir)
        self.reader = WindowReader(self.sources)
        self._config_weights = tuple(float(s.weight) for s in data.sources)
        self._stage: Stage | None = None
        self._consumed = 0
        self._next_step: int | None = None  # None: the first call may be for any step
        self._served: _Served | None = None
        self._prefetch = None  # (key, iterator) of the running DataLoader
        # Token ids must stay below this (the model's vocabulary; None: unchecked): a manifest that understates
        # its vocabulary must not feed the embedding ids it does not have.
        self.token_limit: int | None = None

    # ---- construction helpers --------------------------------------------------------------------------------

    @staticmethod
    def _source_directory(path: str, data: DataConfig, cache_dir: str) -> str:
        if path not in BUILTIN_SOURCES:
            return path
        from .prepare import ensure_builtin_corpus  # imported here: preparing needs the tokenizer stack

        shard_dir, _ = ensure_builtin_corpus(cache_dir, data.vocab_size, tokenizer=data.tokenizer,
                                             heldout=path == BUILTIN_HELDOUT)
        return shard_dir

    def _check_tokenizers(self, cache_dir: str) -> None:
        eos = {s.eos_id for s in self.sources}
        if len(eos) > 1:
            raise ValueError(f"data.sources: the sources were tokenized with different EOS ids {sorted(eos)}")
        if self.data.tokenizer != "builtin":
            from .tokenizer import file_sha256

            expected = file_sha256(self.data.tokenizer)
            for source in self.sources:
                if source.tokenizer_info.get("sha256") not in (None, expected):
                    warnings.warn(f"data source {source.name!r} was tokenized with another tokenizer than "
                                  f"{self.data.tokenizer}", DataWarning, 3)

    # ---- stages ----------------------------------------------------------------------------------------------

    def set_stage(self, seq_len: int, weights: dict[str, float] | None = None) -> None:
        """Start a stage (training start or a stage boundary): a new seq_len and/or mixture weights.

        ``weights`` maps source names to weights; sources not named keep their config weight. Calling it again
        with the current values is a no-op (so a resumed trainer may repeat its stage setup)."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len: must be a positive integer, got {seq_len!r}")
        new_weights = list(self._config_weights)
        for name, weight in (weights or {}).items():
            if name not in self.names:
                raise ValueError(f"weights[{name!r}]: no such data source (sources: {self.names})")
            check_weight(f"weights[{name!r}]", weight)
            new_weights[self.names.index(name)] = float(weight)
        stage = self._stage
        if stage is not None and (stage.seq_len, stage.weights) == (seq_len, tuple(new_weights)):
            return
        if stage is None or self._consumed == stage.start_sample:
            offsets = stage.source_offsets if stage else (0,) * len(self.sources)  # nothing drawn: just redefine
        else:
            offsets = stage.offsets_after(self._consumed)
        self._stage = Stage(self._consumed, seq_len, tuple(new_weights), offsets, self.data.seed)
        self._stop_prefetch()

    def _current_stage(self) -> Stage:
        if self._stage is None:
            raise RuntimeError("call set_stage(seq_len, weights) before asking for data")
        return self._stage

    # ---- steps -----------------------------------------------------------------------------------------------

    def _check_sizes(self, global_batch_size: int, micro_batch_size: int = 1) -> None:
        if global_batch_size < 1 or micro_batch_size < 1 or global_batch_size % (self.dp_size * micro_batch_size):
            raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                             f"dp_size {self.dp_size} x micro_batch_size {micro_batch_size}")

    def _step_start(self, step: int) -> int:
        """Global index of the first sample of ``step``: the step just served, or the next one."""
        if self._served is not None and step == self._served.step:
            return self._served.start
        if self._next_step is None or step == self._next_step:
            return self._consumed
        raise ValueError(f"step {step} requested, but the stream is at step {self._next_step} "
                         f"(steps must be requested in order; the last one may be repeated)")

    def micro_batches(self, step: int, global_batch_size: int, micro_batch_size: int,
                      device=None) -> list[dict[str, torch.Tensor]]:
        """This rank's model-ready micro-batches for optimizer step ``step``, on ``device`` (None: the CPU).

        The windows cross to the device as int32 ids; labels and positions are derived there. Steps are requested
        in order; asking again for the step just served returns the same micro-batches (idempotent)."""
        self._check_sizes(global_batch_size, micro_batch_size)
        served = self._served
        if served is not None and step == served.step:
            if (served.global_batch_size, served.micro_batch_size) != (global_batch_size, micro_batch_size):
                raise ValueError(f"step {step} was already served with global/micro batch size "
                                 f"{served.global_batch_size}/{served.micro_batch_size}")
            if served.device != device:
                served.batches = split_micro_batches(served.windows, served.eos, micro_batch_size, device)
                served.device = device
            return served.batches
        start = self._step_start(step)
        windows, eos = self._read_step(start, global_batch_size)
        self._check_token_ids(windows, start)
        batches = split_micro_batches(windows, eos, micro_batch_size, device)
        self._served = _Served(step, start, global_batch_size, micro_batch_size, device, windows, eos, batches)
        self._consumed = start + global_batch_size
        self._next_step = step + 1
        return batches

    def _check_token_ids(self, windows: torch.Tensor, start: int) -> None:
        if self.token_limit is None or not windows.numel():
            return
        top = int(windows.numpy().max())  # a host tensor, read through numpy (no device involved)
        if top >= self.token_limit:
            raise UnusableSource(f"token id {top} in the step starting at sample {start} is >= model.vocab_size "
                                 f"{self.token_limit}: the shards do not match the model's vocabulary (check "
                                 f"data.tokenizer and each manifest's tokenizer.vocab_size)")

    def _read_step(self, start: int, global_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's windows (int32) and their EOS ids for the step starting at global sample ``start``."""
        stage = self._current_stage()
        if self.data.num_workers == 0:
            indices = rank_sample_indices(start, global_batch_size, self.dp_rank, self.dp_size)
            windows, eos = self.reader.read(stage, indices)
            self.reader.take_new_problems()  # already recorded (and warned) in this process
            return torch.from_numpy(windows), torch.from_numpy(eos)
        key = (id(stage), start, global_batch_size)
        if self._prefetch is None or self._prefetch[0] != key:
            self._stop_prefetch()
            dataset = _PrefetchedSteps(self.reader, stage, start, global_batch_size, self.dp_rank, self.dp_size)
            loader = DataLoader(dataset, batch_size=None, num_workers=self.data.num_workers,
                                prefetch_factor=self.data.prefetch_factor, worker_init_fn=_init_worker)
            self._prefetch = [key, iter(loader)]
        windows, eos, problems = next(self._prefetch[1])
        self.reader.absorb_problems(problems)
        self._prefetch[0] = (id(stage), start + global_batch_size, global_batch_size)
        return windows, eos

    def _stop_prefetch(self) -> None:
        if self._prefetch is not None:
            iterator = self._prefetch[1]
            self._prefetch = None
            iterator._shutdown_workers()  # stop the workers now rather than at garbage collection

    # ---- digests ---------------------------------------------------------------------------------------------

    def local_token_windows(self, step: int, global_batch_size: int) -> torch.Tensor:
        """This rank's windows ``[global_batch_size // dp_size, seq_len + 1]`` (int32) of ``step``."""
        self._check_sizes(global_batch_size)
        served = self._served
        if served is not None and (served.step, served.global_batch_size) == (step, global_batch_size):
            return served.windows
        start = self._step_start(step)
        indices = rank_sample_indices(start, global_batch_size, self.dp_rank, self.dp_size)
        return torch.from_numpy(self.reader.read(self._current_stage(), indices)[0])

    def local_sample_digests(self, step: int, global_batch_size: int) -> torch.Tensor:
        """sha256 of each of this rank's samples of ``step`` (``[n, 32]`` uint8), from the windows it read for the
        step: a rank hashes only its own slice. The trainer all-gathers them over data-parallel ranks (rank order
        is global sample order) and combines them with ``combine_sample_digests``."""
        return sample_digests(self.local_token_windows(step, global_batch_size))

    def global_batch_digest(self, step: int, global_batch_size: int) -> str:
        """The digest of the global batch of ``step``, the same for any DP size, computed by reading the whole
        global batch: for tests and checks (training combines every rank's ``local_sample_digests`` instead)."""
        self._check_sizes(global_batch_size)
        start = self._step_start(step)
        windows, _ = self.reader.read(self._current_stage(), np.arange(start, start + global_batch_size))
        return digest_token_windows(torch.from_numpy(windows))

    def locate(self, global_index: int) -> tuple[str, int]:
        """(source name, stream offset) of the window of a global sample of the current stage (for inspection)."""
        sources, offsets = self._current_stage().windows(np.array([global_index]))
        return self.names[int(sources[0])], int(offsets[0])

    # ---- state -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        stage = self._current_stage()
        return {
            "version": STATE_VERSION,
            "seed": self.data.seed,
            "consumed_samples": self._consumed,
            "next_step": self._next_step,
            "stage_start_sample": stage.start_sample,
            "seq_len": stage.seq_len,
            "weights": dict(zip(self.names, stage.weights)),
            "source_offsets": dict(zip(self.names, stage.source_offsets)),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["seed"] != self.data.seed:
            raise ValueError(f"data.seed: the checkpoint's data stream used seed {state['seed']}, "
                             f"the config says {self.data.seed}; changing it would repeat and skip data")
        missing = sorted(set(state["source_offsets"]) - set(self.names))
        if missing:
            raise ValueError(f"data.sources: the checkpoint's stream has sources {missing} that the config lacks")
        for name in self.names:
            if name not in state["source_offsets"]:
                warnings.warn(f"data source {name!r} is new since the checkpoint: it starts at its beginning",
                              DataWarning, 2)
        weights = tuple(float(state["weights"].get(n, w)) for n, w in zip(self.names, self._config_weights))
        offsets = tuple(int(state["source_offsets"].get(n, 0)) for n in self.names)
        self._stop_prefetch()
        self._stage = Stage(int(state["stage_start_sample"]), int(state["seq_len"]), weights, offsets, self.data.seed)
        self._consumed = int(state["consumed_samples"])
        self._next_step = state["next_step"]
        self._served = None

    # ---- metrics ---------------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Counters for the metrics logger. Read counters cover this process only (not DataLoader workers)."""
        skipped = [s.skipped() for s in self.sources]
        result = {
            "data/consumed_samples": self._consumed,
            "data/skipped_shards": sum(s["shards"] for s in skipped),
            "data/skipped_documents": sum(s["documents"] for s in skipped),
            "data/skipped_tokens": sum(s["tokens"] for s in skipped),
            "data/shard_opens": sum(s.counters["shard_opens"] for s in self.sources),
            "data/document_reads": sum(s.counters["document_reads"] for s in self.sources),
        }
        if self._stage is not None:
            result["data/seq_len"] = self._stage.seq_len
            result["data/stage_start_sample"] = self._stage.start_sample
        return result

    def report(self) -> str:
        """A summary of skipped input, for the end of a run (empty when nothing was skipped)."""
        lines = [f"data source {s.name!r}: skipped shard {s.shards[i].url} ({reason})"
                 for s in self.sources for i, reason in sorted(s.bad_shards.items())]
        if lines:
            totals = self.stats()
            lines.append(f"skipped {totals['data/skipped_shards']} shards, {totals['data/skipped_documents']} "
                         f"documents, {totals['data/skipped_tokens']} tokens")
        return "\n".join(lines)

    def close(self) -> None:
        self._stop_prefetch()


def sample_digests(windows: torch.Tensor) -> torch.Tensor:
    """sha256 of each window (a row of little-endian int32 token ids), as ``[n, 32]`` uint8."""
    rows = np.ascontiguousarray(windows.detach().to("cpu", torch.int32).numpy(), dtype="<i4")
    digests = b"".join(hashlib.sha256(row).digest() for row in rows)
    return torch.frombuffer(bytearray(digests), dtype=torch.uint8).reshape(len(rows), 32)


def combine_sample_digests(digests: torch.Tensor) -> str:
    """The batch digest: sha256 hex of its samples' digests in global sample order."""
    return hashlib.sha256(digests.detach().to("cpu", torch.uint8).contiguous().numpy().tobytes()).hexdigest()


def digest_token_windows(windows: torch.Tensor) -> str:
    """The batch digest of windows in global sample order (= combine_sample_digests of their sample digests)."""
    return combine_sample_digests(sample_digests(windows))


__all__ = ["GlobalSampleStream", "Stage", "combine_sample_digests", "digest_token_windows", "sample_digests",
           "stable_key"]
