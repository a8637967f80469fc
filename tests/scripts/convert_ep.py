"""Conversion under expert parallelism, in one launch of 4 ranks (each rank runs this script):

1. an EP4 engine (DP4 x EP4, each rank 2 of the 8 experts) saves its weights as a layout-free checkpoint;
2. `hf-export` of it by the 4 ranks (each writes every 4th shard), in fp32;
3. `hf-import` of that export by the 4 ranks (each converts a quarter of the tensors);
4. an EP2 engine (DP4 x EP2) starts from the re-import, and again from the export itself (`train.init_from`),
   and every rank compares every tensor it holds, experts included, with the EP4 checkpoint's.

    python tests/scripts/convert_ep.py OUT_DIR          # starts the 4 ranks; OUT_DIR/result.json when done
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _engine(cfg, ep: int):
    import dataclasses

    from mimo_train.training.engine import AdamSettings, build_engine

    p = dataclasses.replace(cfg.parallel, dp=4, ep=ep, tp=1)
    return build_engine(cfg.model, p, 64, precision="fp32", adam=AdamSettings(lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                                                                            weight_decay=0.0),
                        seed=11, device="cpu")


def _compare(engine, reference) -> list[str]:
    """Names of the tensors this rank holds that differ from the EP4 checkpoint's (its part of each)."""
    from torch.distributed.tensor import DTensor

    from mimo_train.interop.init_from import full_part
    from parallel.state_dict import model_state

    wrong = []
    for name, t in model_state(engine.model, engine.layouts, engine.topo).items():
        local = t.to_local() if isinstance(t, DTensor) else t
        if not (local.shape == full_part(t, reference.get(name)).shape and
                bool((local == full_part(t, reference.get(name))).all())):
            wrong.append(name)
    return wrong


def rank_main(out: Path) -> int:
    import torch.distributed as dist

    from mimo_train.training import checkpoint as ckpt
    from mimo_train.launch import cli
    from mimo_train.config import Config, load_config, save_config
    from mimo_train.interop.hf_stream import CheckpointTensors
    from mimo_train.interop.init_from import load_initial_weights
    from parallel.state_dict import model_state
    from parallel.topology import init_distributed

    rank, world = init_distributed(timeout_s=120, device="cpu")
    cfg = load_config("configs/train/tiny_cpu.yaml", ["run.wandb_mode=disabled"])
    ep4 = _engine(cfg, 4)
    saved = ckpt.save_checkpoint(out / "ep4", 0, {"model": model_state(ep4.model, ep4.layouts, ep4.topo)},
                                 {"model_only": True}, rank=rank)
    if rank == 0:
        save_config(Config(model=cfg.model), out / "ep4" / "config.yaml")
    dist.barrier()
    assert cli.main(["hf-export", str(saved), str(out / "hf4"), "--dtype", "fp32", "--shard-mb", "1"]) == 0
    dist.barrier()
    assert cli.main(["hf-import", str(out / "hf4"), str(out / "imported4")]) == 0
    reference = CheckpointTensors(saved)
    result = {"local_experts_ep4": ep4.model.model.layers["1"].mlp.experts.gate_up_proj.shape[0]}
    for source in ("imported4", "hf4"):
        ep2 = _engine(cfg, 2)
        cfg.train.init_from = str(out / source)
        load_initial_weights(SimpleNamespace(cfg=cfg, model=ep2.model, layouts=ep2.layouts, topo=ep2.topo,
                                             optimizer=ep2.optimizer, is_logger=rank == 0))
        result[source] = {"wrong": _compare(ep2, reference),
                          "checked": len(model_state(ep2.model, ep2.layouts, ep2.topo)),
                          "local_experts_ep2": ep2.model.model.layers["1"].mlp.experts.gate_up_proj.shape[0]}
    every = [None] * world
    dist.all_gather_object(every, result)
    if rank == 0:
        (out / "result.json").write_text(json.dumps(every))
    dist.destroy_process_group()
    return 0


def main() -> int:
    out = Path(sys.argv[1]).resolve()
    if "RANK" in os.environ:
        return rank_main(out)
    from mimo_train.launch.launcher import launch_local

    return launch_local(4, [str(out)], command=[sys.executable, os.path.abspath(__file__)])


if __name__ == "__main__":
    sys.exit(main())
