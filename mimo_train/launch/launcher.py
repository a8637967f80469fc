"""`mimo-train train --nproc N`: start N local ranks and own them until they end.

The launcher starts each rank as `python -m mimo_train.launch.cli train ...` with the environment `init_process_group`
reads (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as torchrun's standalone mode
does, and then:

- forwards SIGTERM, SIGINT and SIGUSR1 to every rank exactly once per signal it receives (the ranks run in their
  own session, so a Ctrl-C in the terminal reaches them through the launcher only, never twice), waits for them to
  checkpoint and exit, and exits 0 when every rank stopped cleanly;
- watches every rank; when one fails, prints "rank N failed (exit status S)", stops the others within seconds
  (SIGTERM, then SIGKILL after a grace period: a rank outside a collective would otherwise wait for the
  process-group timeout) and exits with the failed rank's status, as a shell reports it (137 for a rank killed by
  SIGKILL): one traceback, the failed rank's own, and no wrapper's. The
  trainer's planned exits (relaunch for another stage layout, divergence) are every rank's, after a collective
  checkpoint: those ranks are left to finish;
- ranks die with the launcher (Linux: PR_SET_PDEATHSIG), so killing it with SIGKILL orphans nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
POLL_S = 0.1
# Seconds the other ranks get to exit after SIGTERM when one rank failed, before SIGKILL.
GRACE_S = 3.0
# Exit statuses every rank reaches together (mimo_train.training.trainer EXIT_RELAUNCH, EXIT_DIVERGED): not failures to
# stop the other ranks for.
PLANNED_EXITS = (3, 4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: its own session (terminal signals come through the launcher) and SIGKILL when the
    launcher dies (Linux only; elsewhere the launcher's handlers are the only safeguard)."""
    os.setsid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def rank_environment(rank: int, nproc: int, port: int) -> dict[str, str]:
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def launch_local(nproc: int, argv: list[str], command: list[str] | None = None) -> int:
    """Run `command <argv>` (default: this Python's `-m mimo_train.launch.cli`) as `nproc` ranks; the exit status of the
    run (0, or the first failure's)."""
    port = free_port()
    cmd = [*(command or [sys.executable, "-m", "mimo_train.launch.cli"]), *argv]
    procs = [subprocess.Popen(cmd, env=rank_environment(r, nproc, port), preexec_fn=_die_with_parent)
             for r in range(nproc)]

    def forward(signum, frame) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        return _wait(procs)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:  # only reached with live ranks when the launcher itself fails
            if p.poll() is None:
                p.kill()
                p.wait()


def _wait(procs: list[subprocess.Popen]) -> int:
    """Watch every rank until all have ended; when one fails, stop the others and return its status."""
    while True:
        codes = [p.poll() for p in procs]  # every rank polled each round (a live rank 0 hides nothing)
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0, *PLANNED_EXITS)]
        if failed:
            rank, code = failed[0]
            status = _exit_status(code)
            print(f"mimo-train: rank {rank} failed (exit status {status}); stopping the other ranks",
                  file=sys.stderr, flush=True)
            stop_ranks(procs)
            return status
        if all(c is not None for c in codes):
            return _exit_status(next((c for c in codes if c != 0), 0))
        time.sleep(POLL_S)


def stop_ranks(procs: list[subprocess.Popen], grace_s: float = GRACE_S) -> None:
    """SIGTERM to every live rank, SIGKILL to those still alive `grace_s` later (a rank blocked outside a collective
    would otherwise wait for the process-group timeout), then reap them all."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in list(procs)) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _exit_status(returncode: int) -> int:
    """A rank killed by a signal reports -signum; a shell reports 128 + signum."""
    return 128 - returncode if returncode < 0 else returncode
