"""One run per run directory: an exclusive lock held for the whole run.

Two `mimo-train train` processes on one `run.dir` (a double submit, a Slurm requeue that overlaps a straggler)
would interleave `metrics.jsonl` and overwrite each other's checkpoints. The run therefore holds
`<run.dir>/run.lock`:

- an `fcntl.flock` on the file, which the kernel releases whenever the holder exits, SIGKILL included, so a dead
  holder on the same host never blocks the next run;
- the file's content, `{"host", "pid", "heartbeat", "slurm_job_id"}`, rewritten every `HEARTBEAT_S` by a thread.
  It names the holder in the refusal, and it is what decides on file systems where a flock taken on one host is not
  seen on another (some NFS setups): a lock whose heartbeat is older than `STALE_S` (the holder's node was lost) is
  taken over, and so is one written by an earlier incarnation of the same Slurm job (a requeue runs only after
  Slurm ended the previous one).

Who holds it: the process that owns the launch, before any rank starts (the `--nproc` launcher, or the single
process); under torchrun or a multi-task Slurm step, rank 0 (the trainer takes it after the process group exists,
so every rank stops with the same one-line refusal). The lock is released at any exit: explicitly, at interpreter
exit, or by the kernel.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
# A lock whose heartbeat is older than this is stale (its holder's host stopped writing: node loss).
STALE_S = float(os.environ.get("MIMO_TRAIN_LOCK_STALE_S", 300))
# Set for the ranks of a launcher that holds the lock (the resolved run directory), so they do not take it again.
HELD_ENV = "MIMO_TRAIN_RUN_LOCK_HELD"


class RunLocked(RuntimeError):
    """Another live run holds the run directory (the message names its host and pid)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"


def stale_reason(holder: dict | None, now: float | None = None) -> str | None:
    """Why a recorded holder no longer holds the lock (None: it may still be running). Only called once the
    flock itself was granted, so on this host the holder is dead whatever its pid says (a reused pid)."""
    if holder is None:
        return "no holder recorded"
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname():
        alive = _pid_alive(int(holder.get("pid", -1)))
        return "its process is gone" if not alive else "its process no longer holds the lock"
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job:
        return f"an earlier run of Slurm job {job} (requeued)"
    age = now - float(holder.get("heartbeat", 0))
    if age > STALE_S:
        return f"its last heartbeat was {age:.0f} s ago (> {STALE_S:.0f} s: its host is presumed lost)"
    return None


class RunLock:
    """`RunLock(run_dir).acquire()` ... `.release()`; also a context manager."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunLocked(self._refusal(_read_holder(self.path))) from None
        holder = _read_holder(self.path)
        reason = stale_reason(holder) if holder is not None else None
        if holder is not None and reason is None:  # a live holder on another host, whose flock we cannot see
            os.close(fd)
            raise RunLocked(self._refusal(holder))
        if holder is not None:
            print(f"run.dir {self.run_dir}: taking over the lock of {_describe(holder)} ({reason})",
                  file=sys.stderr, flush=True)
        self._fd = fd
        self._write()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.release)
        return self

    def _refusal(self, holder: dict | None) -> str:
        who = _describe(holder) if holder else "another process"
        return (f"run.dir {self.run_dir}: another run is using it ({who}; lock file {self.path}); wait for it to "
                f"end, stop it, or choose another run.dir")

    def _write(self) -> None:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time(),
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        data = json.dumps(record).encode()
        # In place (not a rename): the flock belongs to this file, and a rename would create another one.
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except (OSError, TypeError):  # released meanwhile
                return

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no holder recorded: the next run takes it without a message
        except OSError:
            pass
        os.close(fd)  # releases the flock
        atexit.unregister(self.release)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def held_by_parent(run_dir: str | Path) -> bool:
    """True in the ranks of a launcher that holds this run directory's lock."""
    return os.environ.get(HELD_ENV) == str(Path(run_dir).resolve())
