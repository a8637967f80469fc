"""`mimo-train train` that pauses at a chosen point of a checkpoint save, so a test can SIGKILL it right there.

MIMO_TEST_PAUSE_AT=POINT:STEP, where POINT is "write" (inside DCP's write of the files, on the background
thread of an asynchronous save) or one of `mimo_train.training.checkpoint.fault_point`'s names ("before_meta",
"before_rename", "before_latest", "during_retention"). On reaching it the process creates
MIMO_TEST_PAUSE_MARKER and sleeps (until killed). Arguments are those of `mimo-train train`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mimo_train.training import checkpoint


def _pause(point: str, step: int) -> None:
    want_point, want_step = os.environ["MIMO_TEST_PAUSE_AT"].split(":")
    if point == want_point and step == int(want_step):
        Path(os.environ["MIMO_TEST_PAUSE_MARKER"]).write_text(f"{point}:{step}")
        time.sleep(600)


def install() -> None:
    if not os.environ.get("MIMO_TEST_PAUSE_AT"):
        return
    checkpoint.fault_point = _pause
    make_writer = checkpoint._storage_writer

    def slow_writer(path):
        writer = make_writer(path)
        step = int(Path(path).name.split("_")[1].split(".")[0])
        write_data = writer.write_data

        def paused_write_data(plan, planner):
            _pause("write", step)
            return write_data(plan, planner)

        writer.write_data = paused_write_data
        return writer

    checkpoint._storage_writer = slow_writer


if __name__ == "__main__":
    install()
    from mimo_train.launch.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
