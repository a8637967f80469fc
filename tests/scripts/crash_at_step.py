"""`mimo-train train` whose training step raises an IndexError at step 2 (like token ids beyond the vocabulary), in
one process or, with --nproc N, in rank 0 of N ranks started by the local launcher (this script is each rank)."""

from __future__ import annotations

import os
import sys


def main() -> int:
    import mimo_train.training.trainer as trainer_module
    from mimo_train.launch import cli
    from mimo_train.launch.launcher import launch_local

    if "--nproc" in sys.argv and "RANK" not in os.environ:
        i = sys.argv.index("--nproc")
        nproc, argv = int(sys.argv[i + 1]), sys.argv[1:i] + sys.argv[i + 2:]
        return launch_local(nproc, argv, command=[sys.executable, os.path.abspath(__file__)])
    real = trainer_module.Trainer.train_step

    def failing(self):
        if self.step == 1 and self.rank == 0:
            raise IndexError("index out of range in self (injected at step 2)")
        return real(self)

    trainer_module.Trainer.train_step = failing
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
