"""Checkpoints with torch.distributed.checkpoint (DCP), published atomically.

Layout of a run directory's `checkpoints/`:

    step_00000040/            one complete checkpoint
        .metadata, *.distcp   DCP: model and optimizer tensors under their global (fully qualified) names
        meta.json             step, trainer and data-cursor state, each file's size and checksum; written last
    step_00000032.corrupt/    a checkpoint that failed verification at a resume: set aside (never deleted)
    latest                    the name of the newest published checkpoint (moved after the directory is in place)
    abandoned-<time>/         checkpoints newer than an older one a run resumed from (a branch no longer followed)

A checkpoint is written into `step_XXXXXXXX.tmp` and renamed into place only when every file, `meta.json` last, is
on disk (fsynced); a killed writer therefore leaves a `.tmp` directory that is never picked up. `find_latest` trusts
no pointer: it takes the newest `step_XXXXXXXX` directory whose meta.json lists files that all exist with the
recorded sizes (the integrity check, repeated before every load). `latest` is moved last, for people and scripts.

Every file's checksum (xxh3-64, or zlib's crc32 where xxhash is not installed) is computed while DCP writes it
(`ChecksummingFileSystem` hashes each buffer on its way to the file; no second read), recorded in meta.json, and
verified before a load. `find_verified` walks the checkpoints newest first, reports each one that fails by name,
sets it aside as `step_X.corrupt`, and returns the newest that verifies. meta.json carries a checksum of its own
content, so an edited step or data cursor fails verification too.

`CheckpointManager` adds what a training run needs: asynchronous saves (DCP `async_save` on a thread with its own
gloo group; the state is staged into a CPU copy before training goes on, and the checkpoint is published at a
later step boundary once every rank's write is complete), retention (the newest N, every K-th step and stage
boundaries are kept; the newest complete checkpoint and the one resumed from are never deleted), and removal of writers' leftovers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from parallel.state_dict import MASTER_KEY
from parallel.topology import checkpoint_group

# DCP warns at every save and load without a process group that it assumes one process: that is the intent here
# (a single-process run), so the warning is noise at every checkpoint.
warnings.filterwarnings("ignore", message=r"torch\.distributed is .*uninitialized, assuming the intent is to "
                                          r"(save|load) in a single process")

META = "meta.json"
LATEST = "latest"
PREFIX = "step_"
CORRUPT = ".corrupt"
_NAME = re.compile(r"^step_(\d{8,})$")
CHECKSUM_SUFFIX = ".sum"  # a file's checksum, written beside it by the rank that wrote it; folded into meta.json
META_CHECKSUM = "meta_checksum"  # meta.json's checksum of its own content
ABANDONED = "abandoned-"  # checkpoints newer than an older one a run resumed from: moved into abandoned-<time>/


def fault_point(name: str, step: int) -> None:
    """A no-op that tests replace to pause or kill a writer at a named point of the save/publish sequence:
    "before_meta", "before_rename", "before_latest", "during_retention"."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---- checksums, computed while writing ---------------------------------------------------------------------------


def checksum_algorithm() -> str:
    try:
        import xxhash  # noqa: F401

        return "xxh3_64"
    except ImportError:
        return "crc32"


class Checksum:
    """A running checksum of a byte stream: xxh3-64 (about 25 GB/s on one core) or zlib's crc32 (about 4 GB/s)."""

    def __init__(self, algorithm: str):
        self.algorithm = algorithm
        if algorithm == "xxh3_64":
            import xxhash

            self._h = xxhash.xxh3_64()
        elif algorithm == "crc32":
            self._crc = 0
        else:
            raise ValueError(f"unknown checksum algorithm {algorithm!r}")

    def update(self, data) -> None:
        if self.algorithm == "crc32":
            self._crc = zlib.crc32(data, self._crc)
        else:
            self._h.update(data)

    def hexdigest(self) -> str:
        return f"{self._crc:08x}" if self.algorithm == "crc32" else self._h.hexdigest()


def file_checksum(path: Path, algorithm: str, chunk: int = 16 << 20) -> str:
    h = Checksum(algorithm)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class _ChecksummingStream:
    """A write stream that hashes every buffer before passing it on (everything else is the file's own)."""

    def __init__(self, raw, checksum: Checksum):
        self._raw, self._checksum = raw, checksum
        self.bytes_written = 0

    def write(self, data) -> int:
        self._checksum.update(data)
        n = self._raw.write(data)
        self.bytes_written += n
        return n

    def __getattr__(self, name):
        return getattr(self._raw, name)


def _fs_base():
    from torch.distributed.checkpoint.filesystem import FileSystem

    return FileSystem


class ChecksummingFileSystem(_fs_base()):
    """DCP's local file system, with a checksum of every file it writes kept beside it in `<name>.sum`
    (`{"size", "checksum"}`), so that each rank records its own files and rank 0 collects them at publication."""

    algorithm = checksum_algorithm()

    @contextmanager
    def create_stream(self, path, mode: str):
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        path = Path(path)
        checksum = Checksum(self.algorithm)
        with super().create_stream(path, mode) as stream:
            hashed = _ChecksummingStream(stream, checksum)
            yield hashed
        _write_synced(_sum_path(path), json.dumps({"size": hashed.bytes_written, "checksum": checksum.hexdigest(),
                                                   "algorithm": self.algorithm}))

    def rename(self, path, new_path) -> None:  # DCP writes `.metadata.tmp` and renames it
        super().rename(path, new_path)
        if _sum_path(Path(path)).is_file():
            os.replace(_sum_path(Path(path)), _sum_path(Path(new_path)))


def _sum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def collect_checksums(directory: Path) -> dict[str, dict[str, Any]]:
    """{file name: {size, checksum, algorithm}} from the `.sum` files of a written checkpoint (which it removes)."""
    sums = {}
    for p in sorted(directory.glob("*" + CHECKSUM_SUFFIX)):
        sums[p.name[: -len(CHECKSUM_SUFFIX)]] = json.loads(p.read_text())
    return sums


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, Any], meta: dict[str, Any], rank: int = 0) -> Path:
    """Save `tensors` (a DCP state dict: model and optimizer) and `meta` (JSON-able) as checkpoint `step`,
    synchronously.

    Collective when distributed: every rank writes its shards into the same temporary directory, then rank 0
    alone writes meta.json, renames the directory into place and moves `latest`."""
    root = Path(root)
    tmp = prepare_tmp(root, step, rank)
    dcp.save(tensors, storage_writer=_storage_writer(tmp))
    _barrier()
    final = root / checkpoint_name(step)
    if rank == 0:
        publish(root, step, meta)
    _barrier()
    return final


def prepare_tmp(root: Path, step: int, rank: int) -> Path:
    """The (empty) temporary directory checkpoint `step` is written into. Collective when distributed."""
    tmp = root / f"{checkpoint_name(step)}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a writer that was killed
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    return tmp


def _write_synced(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def publish(root: Path, step: int, meta: dict[str, Any]) -> Path:
    """Rank 0, once every rank's DCP write into `step_X.tmp` is complete: meta.json (listing every file and its
    size), then the atomic rename into place, then `latest`. A kill at any point leaves either a `.tmp`
    directory (ignored) or a complete checkpoint."""
    final = root / checkpoint_name(step)
    tmp = root / f"{final.name}.tmp"
    fault_point("before_meta", step)
    sums = collect_checksums(tmp)
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())
             if not p.name.endswith((".partial", CHECKSUM_SUFFIX))}
    missing = sorted(set(files) - set(sums))
    if missing:
        raise RuntimeError(f"{tmp}: no checksum was recorded while writing {missing}")
    meta = {**meta, "step": step, "files": files, "complete": True,
            "checksums": {name: sums[name]["checksum"] for name in files},
            "checksum_algorithm": sums[next(iter(files))]["algorithm"]}
    meta[META_CHECKSUM] = meta_checksum(meta)
    _write_synced(tmp / META, json.dumps(meta, indent=1))
    for p in tmp.glob("*" + CHECKSUM_SUFFIX):
        p.unlink()
    _fsync_dir(tmp)
    fault_point("before_rename", step)
    if final.exists():  # a re-save of the same step (e.g. after a resume) replaces the old copy
        old = root / f"{final.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    fault_point("before_latest", step)
    _write_synced(root / LATEST, final.name)
    _fsync_dir(root)
    return final


def meta_checksum(meta: dict[str, Any]) -> str:
    """sha256 of meta.json's own content (every key but this checksum, in a canonical form): an edited step,
    data cursor or file list fails verification instead of resuming from a state the tensors do not match."""
    content = {k: v for k, v in meta.items() if k != META_CHECKSUM}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _read_meta_safely(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def is_complete(path: Path) -> bool:
    """Every file that meta.json lists exists with its recorded size (the cheap structural check; `verify` reads
    the files and compares their checksums)."""
    return _structure_problem(Path(path)) is None


def structure_problem(path: str | Path) -> str | None:
    """What the cheap structural check finds wrong (meta.json, its own checksum, file sizes), or None."""
    return _structure_problem(Path(path))


def _structure_problem(path: Path) -> str | None:
    meta = _read_meta_safely(path)
    if meta is None:
        return "meta.json is missing or unreadable"
    if not meta.get("complete") or not meta.get("files"):
        return "meta.json does not describe a complete checkpoint"
    if META_CHECKSUM in meta and meta[META_CHECKSUM] != meta_checksum(meta):  # older checkpoints have none
        return "meta.json was changed after it was written (its content does not match its own checksum)"
    for name, size in meta["files"].items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if (path / name).stat().st_size != size:
            return f"{name} has {(path / name).stat().st_size} bytes, {size} were written"
    return None


def verify(path: str | Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """None when the checkpoint is complete and every file has the checksum recorded when it was written; else
    what is wrong (naming the file). `share = (rank, world)`: check the checksums of every world-th file only, so
    that the ranks of a job read a large checkpoint together. Checkpoints written before checksums existed are
    checked for sizes only."""
    path = Path(path)
    problem = _structure_problem(path)
    if problem is not None:
        return problem
    meta = read_meta(path)
    algorithm = meta.get("checksum_algorithm")
    rank, world = share
    for name, expected in sorted(meta.get("checksums", {}).items())[rank::world]:
        actual = file_checksum(path / name, algorithm)
        if actual != expected:
            return f"{name}: checksum {actual} differs from the {expected} recorded when it was written ({algorithm})"
    return None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Published checkpoint directories, oldest first (temporary ones excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(dirs, key=lambda p: int(_NAME.match(p.name).group(1)))


def find_latest(root: str | Path) -> Path | None:
    """The newest structurally complete checkpoint (sizes only: cheap; resumes use `find_verified`)."""
    for path in reversed(list_checkpoints(root)):
        if is_complete(path):
            return path
    return None


def _alone(problem: str | None) -> str | None:
    return problem


def find_verified(root: str | Path, set_aside: bool = True, share: tuple[int, int] = (0, 1),
                  agree=_alone) -> Path | None:
    """The newest checkpoint that verifies (checksums included). Each newer one that fails is reported by name on
    stderr and, with `set_aside`, renamed to `step_X.corrupt` (kept for inspection; never loaded, never counted
    by retention). Distributed: every rank calls it with its `share` of the files and an `agree` that returns the
    first problem any rank found; rank 0 reports and sets aside."""
    for path in reversed(list_checkpoints(root)):
        problem = agree(verify(path, share))
        if problem is None:
            return path
        if share[0] != 0:
            continue
        action = ""
        if set_aside:
            aside = path.with_name(path.name + CORRUPT)
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(path, aside)
            action = f"; set aside as {aside.name}"
        print(f"checkpoint {path} is corrupt or incomplete ({problem}){action}; trying the next older one",
              file=sys.stderr, flush=True)
    return None


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())


def saved_precision(path: Path) -> str:
    """`train.precision` of the run that wrote a checkpoint (its saved config); for checkpoints older than that
    field, from its keys: fp32 master weights are kept by bf16 (and fp8: the same state) runs only."""
    saved = read_meta(path).get("config", {}).get("train", {})
    if "precision" in saved:
        return saved["precision"]
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return "bf16" if any(k.endswith(f".{MASTER_KEY}") for k in keys) else "fp32"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names it and what is wrong."""


def load_checkpoint(path: str | Path, tensors: dict[str, Any], verified: bool = False) -> dict[str, Any]:
    """Load into `tensors` in place (DCP reshards to whatever layout they have) and return the meta dict. The
    checkpoint is verified first unless the caller just did (`verified`)."""
    path = Path(path)
    if verified is False:
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"{path}: checkpoint is incomplete or corrupt ({problem})")
    dcp.load(tensors, checkpoint_id=str(path))
    return read_meta(path)


def resolve_resume(resume: str, root: str | Path, share: tuple[int, int] = (0, 1), agree=_alone) -> Path | None:
    """`auto`: the newest checkpoint that verifies, if any; `none`: start fresh; otherwise a checkpoint path (which
    must verify). Distributed, every rank calls it (see `find_verified`) and gets the same answer or error."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_verified(root, share=share, agree=agree)
    path = Path(resume)
    problem = agree(verify(path, share) if path.is_dir() else "no such checkpoint directory")
    if problem is not None:
        raise CheckpointError(f"--resume {resume}: not a usable checkpoint ({problem})")
    return path


def abandon_newer(root: str | Path, step: int) -> tuple[Path | None, list[str]]:
    """Resuming from checkpoint `step` makes it the branch point of the run's history: the published checkpoints
    after it (the branch no longer followed) are moved, never deleted, into `abandoned-<time>/`, so that `--resume
    auto` and retention see only the live branch; `latest` names `step` again. Returns (that directory or None,
    the names moved)."""
    root = Path(root)
    newer = [p for p in list_checkpoints(root) if int(_NAME.match(p.name).group(1)) > step]
    if not newer:
        return None, []
    aside = root / f"{ABANDONED}{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while aside.exists():
        aside = root / f"{ABANDONED}{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        n += 1
    aside.mkdir()
    for path in newer:
        os.replace(path, aside / path.name)
    _write_synced(root / LATEST, checkpoint_name(step))
    _fsync_dir(root)
    return aside, [p.name for p in newer]


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state().tolist(), "python": _jsonable(random.getstate()),
             "numpy": _jsonable(np.random.get_state())}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(x):
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return x.tolist()
    return x


# --------------------------------------------------------------------------------------------------------------
# A training run's checkpoints: asynchronous saves, publication, retention
# --------------------------------------------------------------------------------------------------------------


def _storage_writer(path: Path):
    """The DCP writer (a function so tests can slow it down to kill a process in the middle of a write)."""
    from torch.distributed.checkpoint import FileSystemWriter

    writer = FileSystemWriter(str(path), sync_files=True)
    writer.fs = ChecksummingFileSystem()
    return writer


class CheckpointManager:
    """Saves of one training run. Every method is called by every rank at the same step boundary, except that
    publication and retention are rank 0's alone (rank 0's DCP future completes only after every rank's files
    are written: DCP's coordinator gathers every rank's write results before it writes `.metadata`)."""

    def __init__(self, root: str | Path, rank: int, *, async_save: bool = True, keep_last: int = 3,
                 keep_every: int = 0, distributed: bool = False):
        self.root = Path(root)
        self.rank = rank
        self.async_save = async_save
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.pending: dict[str, Any] | None = None
        self.last_published: int | None = None
        # The checkpoint this run resumed from (verified before the load): retention never deletes it.
        self.resumed_from: int | None = None
        self.timings: dict[str, float] = {}  # of the last save: stall_s (training blocked), write_s (to publish)
        self.completed: list[dict[str, float]] = []  # {step, write_s} of saves published since last drained
        # Background writes use their own gloo group, so their collectives never interleave with training's. Not
        # on the fake process group (one process standing in for many: simulations, device tests), which cannot
        # host a gloo group and whose collectives do nothing, so there is nothing to keep apart.
        self.group = checkpoint_group() if distributed else None
        if rank == 0:
            self.remove_leftovers()
        _barrier()

    def remove_leftovers(self) -> None:
        """Temporary directories of writers that were killed (never loadable; removed at start-up)."""
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith(PREFIX) and not _NAME.match(p.name) and not p.name.endswith(CORRUPT):
                shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, tensors: dict[str, Any], meta: dict[str, Any], block: bool = False) -> None:
        """Checkpoint `step`. Asynchronous unless `block` (or async saves are off): returns once the state is
        staged; `poll` (at each step boundary) or `wait` publishes it when the write is complete."""
        self.wait()  # one write in flight at a time
        t0 = time.perf_counter()
        tmp = prepare_tmp(self.root, step, self.rank)
        writer = _storage_writer(tmp)
        if self.async_save and not block:
            future = dcp.async_save(tensors, storage_writer=writer, process_group=self.group)
            if hasattr(future, "upload_completion"):  # AsyncSaveResponse when staging is asynchronous too
                future = future.upload_completion
            self.pending = {"step": step, "meta": meta, "future": future, "t0": t0}
            self.timings = {"stall_s": time.perf_counter() - t0}
        else:
            dcp.save(tensors, storage_writer=writer, process_group=self.group)
            self.pending = {"step": step, "meta": meta, "future": None, "t0": t0}
            self._finish()
            self.timings = {"stall_s": time.perf_counter() - t0, "write_s": time.perf_counter() - t0}

    def poll(self) -> bool:
        """Publish the pending save if its write is complete (rank 0); True when something completed."""
        if self.pending is None or (self.pending["future"] is not None and not self.pending["future"].done()):
            return False
        self._finish()
        return True

    def wait(self) -> None:
        """Block until the pending save (if any) is written and published."""
        if self.pending is not None:
            self._finish()

    def _finish(self) -> None:
        pending, self.pending = self.pending, None
        if pending["future"] is not None:
            pending["future"].result()  # re-raises a failed write
        if self.rank == 0:
            publish(self.root, pending["step"], pending["meta"])
            self.last_published = pending["step"]
            self.apply_retention()
        self.timings["write_s"] = time.perf_counter() - pending["t0"]
        self.completed.append({"step": pending["step"], "write_s": self.timings["write_s"]})

    def drain_completed(self) -> list[dict[str, float]]:
        done, self.completed = self.completed, []
        return done

    def apply_retention(self) -> None:
        """Keep the newest `keep_last`, every step that is a multiple of `keep_every`, and stage boundaries;
        never the newest complete checkpoint, the one this run published last, nor the verified one it resumed
        from, whatever other directories (an older run's later steps) exist.
        A deleted checkpoint is renamed out of the `step_X` namespace first, so a kill mid-deletion never
        leaves a half-deleted checkpoint that looks loadable."""
        if self.keep_last <= 0:
            return
        published = list_checkpoints(self.root)
        newest = find_latest(self.root)
        # The checkpoint resumed from (this run's branch point) is kept as well as the newest one published.
        trusted = {self.last_published, self.resumed_from} - {None}
        keep = set(published[-self.keep_last:])
        for path in published:
            step = int(_NAME.match(path.name).group(1))
            if path == newest or step in trusted or (self.keep_every and step % self.keep_every == 0):
                keep.add(path)
            else:
                try:
                    if read_meta(path).get("stage_boundary"):
                        keep.add(path)
                except (OSError, json.JSONDecodeError):
                    pass
        for path in published:
            if path not in keep:
                trash = path.with_name(path.name + ".deleting")
                os.replace(path, trash)
                fault_point("during_retention", int(_NAME.match(path.name).group(1)))
                shutil.rmtree(trash, ignore_errors=True)
