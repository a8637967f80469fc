"""`mimo-train simulate`: the README's recommended 309B layouts built with the real code on a fake process group,
and the planner held to what they hold and send."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mimo_train.planning.communication import rank_comm
from mimo_train.planning.estimator import plan
from mimo_train.planning.geometry import Assumptions, Layout, geometry, rank_units
from mimo_train.planning.memory import ActShape, layer_bytes, state_bytes
from mimo_train.planning.verification import MEMORY_TOLERANCE
from mimo_train.precision import PRECISIONS
from mimo_train.config import load_config
from mimo_train.model.info import model_report
from mimo_train.planning.plan_table import readme_layouts
from mimo_train.planning.simulate import layer_activations, parallel_config, parse_layout, simulate, simulate_rank

REPO = Path(__file__).resolve().parents[1]
BIG = REPO / "configs/model/mimo_v2_flash.yaml"
# The README's recommendations ("Choosing a layout"): (GPUs, GPU, seq) -> layout, read from its generated table
# (`tests/test_planner.py` holds that table to `mimo-train plan --readme-table`).
README_LAYOUTS = readme_layouts((REPO / "README.md").read_text())
PREC = PRECISIONS["bf16"]
WHERE_IDS = [f"{g}x{t}-{s // 1024}k" for g, t, s in README_LAYOUTS]


@pytest.fixture(scope="module")
def big():
    cfg = load_config(BIG, ["model.mtp.num_blocks=1"]).model
    return cfg, geometry(cfg)


_SIMULATED: dict = {}


def _simulated(cfg, where):
    """Every rank class of a README layout (built once per test session) and the plan's estimate of it."""
    if where not in _SIMULATED:
        gpus, gpu, seq = where
        p = parallel_config(parse_layout(README_LAYOUTS[where]), gpus)
        sim = simulate(cfg, p, seq, comm=False, activations=False)
        _SIMULATED[where] = (p, sim, plan(cfg, gpus, gpu, seq, layouts=[_layout(p)])["results"][0])
    return _SIMULATED[where]


def _layout(p) -> Layout:
    return Layout(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep, pp_schedule=p.pp_schedule, pp_virtual=p.pp_virtual,
                    recompute=p.recompute)


@pytest.mark.parametrize("where", list(README_LAYOUTS), ids=WHERE_IDS)
def test_readme_layout_builds_with_the_planned_parameters(big, where):
    """Every rank class builds; its parameters and gradients equal the plan's to the byte; the shards add up to the
    whole model (308.78B + one MTP block, as `mimo-train info` counts it) exactly."""
    cfg, geo = big
    p, sim, planned = _simulated(cfg, where)
    counts = model_report(cfg)["params"]
    assert sim["total_params"] == geo.total_params == counts["total_with_mtp"] == counts["total"] + counts["mtp_total"]
    L = _layout(p)
    for r in sim["ranks"]:
        state = state_bytes(rank_units(geo, L, r["pp_rank"]), L, PREC)
        assert r["param_bytes"] + r["buffer_bytes"] == state["params"], r["rank"]
        assert r["grad_bytes"] == state["grads"], r["rank"]
        assert r["optimizer_bytes"] > 0
    assert planned.fits


@pytest.mark.parametrize("where", list(README_LAYOUTS), ids=WHERE_IDS)
def test_no_rank_exceeds_the_planned_memory(big, where):
    """Each rank's simulated parameters + gradients + optimizer state exceed the plan's for its pipeline rank by
    at most MEMORY_TOLERANCE of the planned total (measured: 0 at all six)."""
    cfg, geo = big
    p, sim, planned = _simulated(cfg, where)
    L = _layout(p)
    for r in sim["ranks"]:
        state = state_bytes(rank_units(geo, L, r["pp_rank"]), L, PREC)
        held = r["param_bytes"] + r["buffer_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]
        excess = held - (state["params"] + state["grads"] + state["optimizer"])
        assert excess <= planned.memory["total"] * MEMORY_TOLERANCE, (r["rank"], excess / 1e9)


@pytest.mark.parametrize("where", list(README_LAYOUTS), ids=WHERE_IDS)
def test_optimizer_state_is_balanced_within_2_percent(big, where):
    """Within every pipeline stage, the largest and smallest optimizer state per rank differ by at most 2 %."""
    cfg, _ = big
    _, sim, _ = _simulated(cfg, where)
    assert sim["optimizer_balance"] <= 0.02, f"{sim['optimizer_balance']:.1%}"


def test_communication_per_kind_matches_the_plan(big):
    """The collectives of one step, counted on the fake process group, against the planner's bytes per kind: the
    first stage (embedding, head and MTP in the V) at the first, a middle and the last context-parallel rank (one,
    two and one SWA halo on the wire) and the second stage of the 512-GPU 256k layout, and the first rank of a
    full-recompute layout (its forward traffic repeats)."""
    cfg, geo = big
    for where, full_recompute in (((512, "h100", 262144), False), ((64, "h200", 262144), True)):
        seq = where[2]
        p = parallel_config(parse_layout(README_LAYOUTS[where]), where[0])
        assert (p.recompute == "full") == full_recompute and p.cp > 2
        per_stage = p.dp * p.cp * p.tp
        # the first, a middle and the last context-parallel rank of the first stage, and the second stage
        ranks = (0, p.tp, per_stage - 1, per_stage) if not full_recompute else (0,)
        L, m = _layout(p), 2**26 // seq // p.dp
        s = ActShape(tokens=seq / p.cp, sp_tokens=seq / p.cp / p.tp, seq=seq, cp=p.cp, tp=p.tp, mbs=1)
        runs: dict = {}
        for rank in ranks:
            sim = simulate_rank(cfg, p, rank, seq, m, "bf16", runs)
            planned = rank_comm(geo, L, sim["pp_rank"], s, m, PREC, cp_rank=sim["cp_rank"])
            assert sim["cp_rank"] == (rank // p.tp) % p.cp
            for kind, v in planned.items():
                assert sim["comm"].get(kind, 0.0) == pytest.approx(v, rel=0.10), (where, rank, kind)
            assert all(sim["comm"][k] > 0 for k in ("tp", "ep", "cp", "pp", "dp"))


def test_activations_per_layer_match_the_plan(big):
    """Bytes each layer type holds after its forward, on the meta device with torch's MemTracker, against the
    planner's model of the torch kernel backend (the one the code has), for every recompute mode implemented."""
    cfg, geo = big
    seq = 262144
    p = parallel_config(parse_layout(README_LAYOUTS[(512, "h100", seq)]), 512)
    A = Assumptions(kernel="torch", packed_documents=False)
    s = ActShape(tokens=seq / p.cp, sp_tokens=seq / p.cp / p.tp, seq=seq, cp=p.cp, tp=p.tp, mbs=1)
    shapes = {}
    for sh in geo.shapes:
        shapes.setdefault(("swa" if sh.sliding else "ga") + ("_moe" if sh.moe else "_dense"), sh)
    measured = layer_activations(cfg, p, seq, "bf16")
    for mode, runs in measured.items():
        assert set(runs) == set(shapes)
        for kind, run in runs.items():
            planned = layer_bytes(cfg, shapes[kind], s, PREC.act_bytes, A, mode)
            # Within 10 %; under full recompute a layer keeps 17 MB (its input) and the checkpoint about 2 MB more
            # that the plan leaves out, hence the 4 MiB floor.
            assert planned == pytest.approx(run["saved_bytes"], rel=0.10, abs=4 * 2**20), (mode, kind)
            assert run["peak_bytes"] >= run["saved_bytes"]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mimo_train.launch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_simulate_cli_and_bad_layout():
    tiny = "configs/model/mimo_tiny.yaml"
    r = _cli("simulate", "--config", tiny, "--gpus", "8", "--layout", "tp=2,pp=2,dp=2,ep=2", "--seq", "256",
             "--json", "--no-activations")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    cfg = load_config(REPO / tiny, ["model.mtp.num_blocks=1"]).model
    assert out["total_params"] == model_report(cfg)["params"]["total_with_mtp"]
    assert {r["pp_rank"] for r in out["ranks"]} == {0, 1}
    assert all(r["comm"]["tp"] > 0 and r["comm"]["ep"] > 0 for r in out["ranks"])
    bad = _cli("simulate", "--config", tiny, "--layout", "tp=2,bogus=3")
    assert bad.returncode == 2 and "--layout: 'bogus=3' must be key=value" in bad.stderr
    wrong = _cli("simulate", "--config", tiny, "--gpus", "4", "--layout", "tp=2,pp=4")  # dp auto
    assert wrong.returncode == 2 and "needs the world size 4 to be a multiple of tp x pp x cp" in wrong.stderr
    explicit = _cli("simulate", "--config", tiny, "--gpus", "4", "--layout", "tp=2,pp=1,dp=4")
    assert explicit.returncode == 2 and "must equal --gpus 4" in explicit.stderr, explicit.stderr


def test_plan_verify_and_calibrate(tmp_path):
    """`plan --verify` builds the top pick and marks it; `--calibrate` replaces assumptions by measured values."""
    tiny = "configs/model/mimo_tiny.yaml"
    cal = tmp_path / "gpu.json"
    cal.write_text(json.dumps({"gpu": "h100", "measured": {"compute_efficiency": 0.25, "ib_gbs": 20}}))
    args = ("plan", "--config", tiny, "--gpus", "4", "--seq", "1024", "--global-batch", "8", "--top", "2")
    base = _cli(*args, "--json")
    r = _cli(*args, "--json", "--verify", "--calibrate", str(cal))
    assert base.returncode == 0 and r.returncode == 0, r.stderr[-3000:]
    b, out = json.loads(base.stdout), json.loads(r.stdout)
    assert out["measured"] == {"compute_efficiency": 0.25, "ib_gbs": 20.0}
    assert out["assumptions"]["compute_efficiency"] == 0.25 and out["gpu"]["ib_gbs"] == 20.0
    assert out["results"][0]["step_time"] > b["results"][0]["step_time"]
    top = out["results"][0]["simulated"]
    assert top["within_tolerance"] and top["ranks_built"] >= 1
    assert out["results"][1]["simulated"] is None
    text = _cli(*args, "--verify")
    assert text.returncode == 0 and "built by simulate:" in text.stdout and " built" in text.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"measured": {"flops": 3}}))
    r = _cli(*args, "--calibrate", str(bad))
    assert r.returncode == 2 and "unknown measured fields ['flops']" in r.stderr


def test_fused_activations_per_layer_match_the_plan(big):
    """The `fused` backend's GPU path (flash varlen with the sink fold) run on the meta device: what each layer
    type holds after its forward, against the planner's fused model, for every recompute mode, at the recipe's
    32k layout (CP16, TP2: halos, all-gathered GA keys, sequence parallelism)."""
    cfg, geo = big
    recipe = load_config(REPO / "configs/train/mimo_v2_flash_pretrain.yaml")
    p, seq = recipe.parallel, recipe.train.seq_len
    assert p.backend == "fused"
    A = Assumptions(kernel="fused")
    s = ActShape(tokens=seq / p.cp, sp_tokens=seq / p.cp / p.tp, seq=seq, cp=p.cp, tp=p.tp, mbs=1)
    shapes = {}
    for sh in geo.shapes:
        shapes.setdefault(("swa" if sh.sliding else "ga") + ("_moe" if sh.moe else "_dense"), sh)
    for mode, runs in layer_activations(cfg, p, seq, "bf16").items():
        assert set(runs) == set(shapes)
        for kind, run in runs.items():
            planned = layer_bytes(cfg, shapes[kind], s, PREC.act_bytes, A, mode)
            assert planned == pytest.approx(run["saved_bytes"], rel=0.10, abs=4 * 2**20), (mode, kind)


def test_simulate_gives_a_fit_verdict():
    """TP8 x PP2 on 16 GPUs holds about 350 GB of state per rank: simulate says so and exits 1."""
    r = _cli("simulate", "--config", str(BIG), "--gpus", "16", "--layout", "tp=8,pp=2,dp=1,ep=8", "--seq", "4096",
             "--no-activations")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "does NOT fit in the 72.0 GB usable" in r.stdout


def test_a_group_serving_two_roles_labels_each_collective_by_its_caller(monkeypatch):
    """When ep == tp the expert group has the tensor-parallel group's ranks, and torch may hand back one group for
    both: the traffic per kind must be the same as with two groups (each collective labelled by the module that
    issued it, not by whichever name the group got last)."""
    import mimo_train.training.engine as engine_module
    from parallel.topology import build_topology

    cfg = load_config(REPO / "configs/model/mimo_tiny.yaml", ["model.mtp.num_blocks=1"]).model
    p = parallel_config(parse_layout("tp=2,pp=1,dp=2,ep=2"), 4)
    apart = simulate_rank(cfg, p, 0, 256, 2, "bf16", {})["comm"]

    def one_group(*args, **kwargs):
        topo = build_topology(*args, **kwargs)
        topo.groups["ep"] = topo.groups["tp"]  # the same ranks: one group for both roles
        return topo

    monkeypatch.setattr(engine_module, "build_topology", one_group)
    shared = simulate_rank(cfg, p, 0, 256, 2, "bf16", {})["comm"]
    assert apart["tp"] > 0 and apart["ep"] > 0
    assert shared == pytest.approx(apart, rel=1e-9)
