"""Optimizer-state bytes per rank of the real sharded optimizer at a large layout, without a cluster: each rank's
shards are built by the real code on the meta device, in one process, under torch's fake process group.

    python tests/scripts/optimizer_balance.py [--ranks 0,1,...] [--precision bf16] [key=value ...]

Prints, for the ranks measured, the largest and smallest optimizer-state bytes (Adam moments, and fp32 masters
under bf16) and their relative difference. Default layout: the README's 512-GPU recommendation at 32k
(TP2 PP16 DualPipeV CP4 DP4 EP8) of the 309B model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LAYOUT_512 = ["parallel.tp=2", "parallel.pp=16", "parallel.pp_schedule=dualpipev", "parallel.pp_virtual=2",
              "parallel.cp=4", "parallel.dp=4", "parallel.ep=8", "train.seq_len=32768"]


def state_bytes_of_rank(rank: int, world: int, cfg) -> int:
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import parallel.parallelize as parallelize_module
    from mimo_train.model import MiMoForCausalLM
    from parallel.data_parallel import ShardedAdamW
    from parallel.parallelize import build_parallel_model
    from parallel.topology import build_topology

    # megatron-core's parallel state (only the vocab-parallel loss reads it) creates gloo groups, which the fake
    # process group cannot host; nothing here computes a loss.
    parallelize_module._init_megatron_tp_state = lambda topo: None
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        topo = build_topology(cfg.parallel, cfg.model, cfg.train.seq_len)
        with torch.device("meta"):
            model = MiMoForCausalLM(cfg.model)
        layouts, _ = build_parallel_model(model, topo, cfg.parallel)
        opt = ShardedAdamW(model, layouts, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                           master_weights=cfg.train.precision == "bf16")
        per_element = 8 + (4 if opt.masters is not None else 0)  # two fp32 moments (+ the fp32 master)
        return sum(opt.shard_param(n).numel() for n in opt.owned) * per_element
    finally:
        dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="", help="comma-separated ranks (default: all)")
    ap.add_argument("--json", default="")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from mimo_train.config import load_config

    cfg = load_config(REPO / "configs/train/mimo_v2_flash_pretrain.yaml",
                      ["train.stages=[]", "train.precision=bf16", *LAYOUT_512, *args.overrides])
    world = cfg.parallel.world_size
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else list(range(world))
    start = time.time()
    per_rank = {r: state_bytes_of_rank(r, world, cfg) for r in ranks}
    hi, lo = max(per_rank.values()), min(per_rank.values())
    result = {"world": world, "ranks_measured": len(ranks), "max_bytes": hi, "min_bytes": lo,
              "max_rank": max(per_rank, key=per_rank.get), "min_rank": min(per_rank, key=per_rank.get),
              "relative_difference": (hi - lo) / hi, "seconds": time.time() - start}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": result, "per_rank": per_rank}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
