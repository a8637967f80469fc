"""Measure one rank's peak memory over a training step (CPU), for the planner's validation.

    python tests/scripts/measure_peak.py --config CFG --out OUT.json [key=value ...]          # one process
    python -m torch.distributed.run --standalone --nproc_per_node=N tests/scripts/measure_peak.py ...   # N ranks

Builds a real `Trainer` (resume none) and runs two optimizer steps. The first is a warm-up: it allocates the Adam
state and touches every code path once. Before the second, the heap is trimmed (`malloc_trim`) and the kernel's
resident-set high-water mark is reset (`/proc/self/clear_refs` = 5), so the high-water mark read after the step is
the peak of that step alone. Each rank writes to OUT.json (one file per rank, `.rank<r>` inserted):

- ``persistent_bytes``: the bytes of the tensors that live across steps, counted from the real objects: this rank's
  parameters, buffers and the Adam state it owns (ZeRO-1), deduplicated by storage;
- ``step_growth_bytes``: peak RSS during the step minus the RSS right before it (gradients, activations, logits,
  communication buffers, allocator overhead);
- ``peak_bytes`` = persistent + step growth: the figure the planner's per-device estimate is compared with. What
  is not in it: the Python interpreter, torch's libraries, process groups, the data stream (all present before the
  step, in the RSS baseline that is subtracted).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _persistent_bytes(trainer) -> int:
    import torch

    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()

    for p in trainer.model.parameters():
        add(p)
    for b in trainer.model.buffers():
        add(b)
    for state in trainer.optimizer.inner.state.values():
        for v in state.values():
            add(v)
    return sum(seen.values())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    from mimo_train.config import load_config
    from mimo_train.training.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg, resume="none")
    trainer.train_step()  # warm-up: Adam state exists from here on
    if dist.is_initialized():
        dist.barrier()
    _trim()
    baseline_kib = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    trainer.train_step()
    peak_kib = _status_kib("VmHWM")
    persistent = _persistent_bytes(trainer)
    growth = (peak_kib - baseline_kib) * 1024
    rank = trainer.rank
    result = {"rank": rank, "world": trainer.world, "persistent_bytes": persistent, "step_growth_bytes": growth,
              "peak_bytes": persistent + growth, "baseline_rss_bytes": baseline_kib * 1024,
              "peak_rss_bytes": peak_kib * 1024}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.stem}.rank{rank}{out.suffix}").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
