"""The run's log file, `<run.dir>/train.log`: everything rank 0 prints (stdout and stderr) and every other rank's
stderr (warnings, errors, tracebacks), prefixed with the rank. The console is unchanged; the file is appended to,
so a resumed run continues it. Lines of different ranks do not interleave mid-line (each line is one append)."""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

LOG_NAME = "train.log"


class _Tee:
    """A text stream that writes to `stream` and, a whole line at a time, to the log file."""

    def __init__(self, stream, fd: int, prefix: str):
        self._stream, self._fd, self._prefix, self._pending = stream, fd, prefix, ""

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        self._pending += text
        if "\n" in self._pending:
            complete, self._pending = self._pending.rsplit("\n", 1)
            lines = "".join(f"{self._prefix}{line}\n" for line in complete.split("\n"))
            os.write(self._fd, lines.encode("utf-8", "replace"))
        return n

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextmanager
def tee_console(run_dir: str | Path, rank: int):
    """Within the block, copy this process's console into `<run_dir>/train.log` (rank 0: stdout and stderr;
    others: stderr). A traceback that ends the block is in the log too."""
    path = Path(run_dir) / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    saved = sys.stdout, sys.stderr
    if rank == 0:
        sys.stdout = _Tee(sys.stdout, fd, prefix)
    sys.stderr = _Tee(sys.stderr, fd, prefix)
    try:
        yield path
    except Exception:  # into the log only: the interpreter prints it to the console once, as usual
        text = "".join(f"{prefix}{line}\n" for line in traceback.format_exc().rstrip("\n").split("\n"))
        os.write(fd, text.encode("utf-8", "replace"))
        raise
    finally:
        sys.stdout, sys.stderr = saved
        os.close(fd)
