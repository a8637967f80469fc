"""Stopping a run cleanly on a signal: SIGTERM (Slurm preemption, `kill`), SIGUSR1 (Slurm's warning before the time
limit) and SIGINT (Ctrl-C) ask the trainer to checkpoint at the next step boundary and exit 0. A second SIGINT
means "now": it raises KeyboardInterrupt at once (the trainer's cleanup still stops the data workers)."""

from __future__ import annotations

import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_interrupted_now = False  # a second Ctrl-C raised KeyboardInterrupt (possibly wrapped by what it interrupted)


def interrupted_now() -> bool:
    """True once a second Ctrl-C stopped this process: whatever error follows is its consequence (a checkpoint
    write it broke, say), not a failure to report with a traceback."""
    return _interrupted_now


class StopRequest:
    """Installed for the duration of a `with` block; `requested` turns true on the first stop signal."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self.announce = announce
        self._interrupts = 0
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                # Said before raising: the interrupt may land inside a checkpoint write, whose error then wraps it.
                print("second Ctrl-C: stopping now, without a checkpoint", file=sys.stderr, flush=True)
                global _interrupted_now
                _interrupted_now = True
                raise KeyboardInterrupt("second Ctrl-C")
            if self.announce:
                print("Ctrl-C: checkpointing at the end of this step, then exiting (press Ctrl-C again to exit now, "
                      "without a checkpoint)", file=sys.stderr, flush=True)
        self.requested = True

    def __enter__(self) -> "StopRequest":
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
