"""`mimo-train plan --verify`: the plan of a layout held to what `mimo-train simulate` builds with the real code,
rank class by rank class."""

from __future__ import annotations

from typing import Any

from mimo_train.config import ModelConfig
from mimo_train.planning.communication import rank_comm
from mimo_train.planning.estimator import Estimate, runnable_config
from mimo_train.planning.geometry import GB, Assumptions, ModelGeometry, geometry, rank_units
from mimo_train.planning.memory import ActShape, layer_bytes, state_bytes
from mimo_train.precision import PRECISIONS, Precision


# --------------------------------------------------------------------------------------------------------------
# Held to the code: verification by simulation, and where a layout fits when none does here
# --------------------------------------------------------------------------------------------------------------

# `--verify` holds the plan to what `mimo-train simulate` builds, rank by rank: parameters and gradients to the
# byte, the optimizer state within its row padding (ceil(rows / n) row blocks: a few hundred bytes), the bytes sent
# per kind and the activations per layer type within these fractions.
MEMORY_TOLERANCE = 0.10  # kept for callers: a rank's state may exceed the plan by this fraction of the total
OPTIMIZER_SLACK_BYTES = 4096
COMM_TOLERANCE = 0.10
ACTIVATION_TOLERANCE = 0.10
ACTIVATION_FLOOR_BYTES = 4 * 2**20  # a fully recomputed layer keeps ~17 MB; its checkpoint's few MB are not planned


def _off(sim: float, planned: float, rel: float, floor: float = 1e6) -> bool:
    return abs(sim - planned) > max(rel * abs(planned), floor)


def _rank_differences(geo: ModelGeometry, e: Estimate, r: dict, s: "ActShape", prec: Precision) -> list[str]:
    """What one simulated rank holds and sends that the plan of the same rank (pipeline and CP position) does not."""
    L = e.layout
    planned = state_bytes(rank_units(geo, L, r["pp_rank"]), L, prec)
    out = []
    if r["param_bytes"] + r["buffer_bytes"] != planned["params"]:
        out.append(f"rank {r['rank']} parameters {r['param_bytes'] + r['buffer_bytes']:,} B, planned "
                   f"{planned['params']:,.0f}")
    if r["grad_bytes"] != planned["grads"]:
        out.append(f"rank {r['rank']} gradients {r['grad_bytes']:,} B, planned {planned['grads']:,.0f}")
    if abs(r["optimizer_bytes"] - planned["optimizer"]) > OPTIMIZER_SLACK_BYTES:
        out.append(f"rank {r['rank']} optimizer state {r['optimizer_bytes']:,} B, planned {planned['optimizer']:,.0f}")
    comm = rank_comm(geo, L, r["pp_rank"], s, e.micro_batches, prec, cp_rank=r["cp_rank"])
    for kind, v in comm.items():
        if _off(r["comm"].get(kind, 0.0), v, COMM_TOLERANCE):
            out.append(f"rank {r['rank']} {kind} {r['comm'].get(kind, 0.0) / GB:.2f} GB/step, planned {v / GB:.2f}")
    return out


def verify(cfg: ModelConfig, e: Estimate, seq: int, global_batch: int, precision: str = "bf16",
           progress=None, assumptions: Assumptions | None = None) -> dict[str, Any]:
    """Build every rank class of `e`'s layout with `mimo-train simulate` (with the plan's kernel backend) and hold
    the plan of each rank to it (see the tolerances above), and each layer type's activations under the layout's
    recompute mode to the planned ones."""
    from mimo_train.planning.simulate import layer_activations, memory_total, simulate

    A = assumptions or Assumptions()
    p = runnable_config(e.layout, A.kernel)
    sim = simulate(cfg, p, seq, global_batch, precision, activations=False, progress=progress)
    geo, prec, L = geometry(cfg), PRECISIONS[precision], e.layout
    s = ActShape(tokens=A.micro_batch_size * seq / L.cp, sp_tokens=A.micro_batch_size * seq / L.cp / L.tp, seq=seq,
                 cp=L.cp, tp=L.tp, mbs=A.micro_batch_size)
    problems = [d for r in sim["ranks"] for d in _rank_differences(geo, e, r, s, prec)]
    shapes = {("swa" if sh.sliding else "ga") + ("_moe" if sh.moe else "_dense"): sh for sh in reversed(geo.shapes)}
    activations = {}
    for kind, run in layer_activations(cfg, p, seq, precision, (L.recompute,))[L.recompute].items():
        planned = layer_bytes(cfg, shapes[kind], s, prec.act_bytes, A, L.recompute)
        activations[kind] = {"simulated": run["saved_bytes"], "planned": planned}
        if _off(run["saved_bytes"], planned, ACTIVATION_TOLERANCE, ACTIVATION_FLOOR_BYTES):
            problems.append(f"{kind} layer activations {run['saved_bytes'] / GB:.3f} GB, planned {planned / GB:.3f}")
    busiest = max(sim["ranks"], key=lambda r: sum(r["comm"].values()))
    record = {"ranks_built": len(sim["ranks"]), "state_bytes": max(memory_total(r) for r in sim["ranks"]),
              "optimizer_balance": sim["optimizer_balance"], "total_params": sim["total_params"],
              "busiest_rank": busiest["rank"], "comm": busiest["comm"],
              "planned_comm": rank_comm(geo, L, busiest["pp_rank"], s, e.micro_batches, prec,
                                        cp_rank=busiest["cp_rank"]),
              "activations": activations, "problems": problems, "within_tolerance": not problems}
    e.simulated = record
    return record


def format_verification(e: Estimate) -> str:
    v = e.simulated
    kinds = ", ".join(f"{k} {v['comm'].get(k, 0.0) / GB:.1f}/{v['planned_comm'][k] / GB:.1f}"
                      for k in ("tp", "ep", "cp", "pp", "dp"))
    acts = ", ".join(f"{k} {a['simulated'] / 1e6:.0f}/{a['planned'] / 1e6:.0f} MB" for k, a in v["activations"].items())
    verdict = ("every rank as planned" if v["within_tolerance"] else
               f"OUTSIDE the tolerances: {'; '.join(v['problems'][:4])}")
    return (f"built by simulate: {e.layout.describe()} ({v['ranks_built']} rank classes, each against its own plan: "
            f"state to the byte, communication per kind and activations per layer within "
            f"{COMM_TOLERANCE:.0%}): {verdict}; optimizer state balance within a stage {v['optimizer_balance']:.1%}; "
            f"busiest rank {v['busiest_rank']}, GB/step simulated/planned: {kinds}; activations per layer "
            f"({e.layout.recompute} recompute), simulated/planned: {acts}")
