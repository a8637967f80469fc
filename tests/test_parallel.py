"""Every parallel layout trains exactly like the single process: `mimo-train train --nproc N` end to end (gloo),
5 optimizer steps of the tiny model with MTP on; losses, gradient norms, batch digests from metrics.jsonl, and
the final parameters and Adam moments read back from each layout's checkpoint into one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from mimo_train.training import checkpoint as ckpt
from mimo_train.config import load_config
from mimo_train.model import MiMoForCausalLM
from parallel.data_parallel import ShardedAdamW
from parallel.parallelize import parallelize
from parallel.state_dict import optimizer_state
from parallel.topology import Topology

STEPS = 5
BASE = ["train.seq_len=128", "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=2",
        f"train.steps={STEPS}", "run.wandb_mode=disabled", "train.lr=3.2e-4", "train.min_lr=1e-4",  # the MiMo recipe's peak LR
        "parallel.grad_bucket_mb=0.25"]  # ~10 gradient buckets per group, reduced while the backward runs

# name -> (processes, overrides)
LAYOUTS = {
    "TP2": (2, ["parallel.tp=2"]),
    "EP2": (2, ["parallel.dp=2", "parallel.ep=2", "train.micro_batch_size=1"]),
    "EP2xTP2": (2, ["parallel.tp=2", "parallel.ep=2"]),
    "DP2-accumulation": (2, ["parallel.dp=2", "train.micro_batch_size=1"]),
    "TP4-kv-replication": (4, ["parallel.tp=4"]),
    "EP4": (4, ["parallel.dp=4", "parallel.ep=4", "train.micro_batch_size=1"]),
    "DP2xEP2": (4, ["parallel.dp=4", "parallel.ep=2", "train.micro_batch_size=1"]),
    "TP2xDP2xEP4": (4, ["parallel.tp=2", "parallel.dp=2", "parallel.ep=4", "train.micro_batch_size=1"]),
}


def _train(run_dir, nproc, overrides):
    cmd = [sys.executable, "-m", "mimo_train.launch.cli", "train", "--config", "configs/train/tiny_cpu.yaml", "--nproc",
           str(nproc), *BASE, f"run.dir={run_dir}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_state(run_dir):
    """The final checkpoint loaded into a single process (DCP reshards whatever layout wrote it)."""
    cfg = load_config(run_dir / "config.yaml")
    model = MiMoForCausalLM(cfg.model)
    opt = ShardedAdamW(model, parallelize(model, Topology()), lr=1.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    state = {"model": model.state_dict(), "optimizer": optimizer_state(opt, parallelize(model, Topology()),
                                                                       Topology(), create=True)}
    dcp.load(state, checkpoint_id=str(ckpt.find_latest(run_dir / "checkpoints")))
    return {**state["model"], **state["optimizer"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    return _train(run_dir, 1, []), _final_state(run_dir)


# Context and pipeline layouts train on many short packed documents (3 to 40 tokens, so every window holds
# several document boundaries) at a sequence length that is not a multiple of the window (136 = 8.5 x 16):
# under CP4 each chunk is 17 tokens, so windows straddle rank boundaries everywhere.
# (The seed is one whose reference run routes every token with a margin above float rounding, see _check_layout;
# the default seed meets a near-tie in this data. Seed 1 suits the corpus-wide document order.)
PACKED = ["train.seq_len=136", "train.micro_batch_size=1", "train.seed=1"]
LAYOUTS_CP_PP = {
    "CP2": (2, ["parallel.cp=2"]),
    "CP4": (4, ["parallel.cp=4"]),
    "CP2xTP2": (4, ["parallel.cp=2", "parallel.tp=2"]),
    "CP2xEP2": (2, ["parallel.cp=2", "parallel.ep=2"]),
    "PP2-1F1B": (2, ["parallel.pp=2"]),
    "PP2-interleaved-virtual": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual=2",
                                    "parallel.pp_layout=[2,4,3,3]"]),
    "PP2-ZBV": (2, ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual=2"]),
    "PP2-DualPipeV": (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipev", "parallel.pp_virtual=2"]),
    "PP2xEP2": (4, ["parallel.pp=2", "parallel.dp=2", "parallel.ep=2"]),
    "PP2xDP2": (4, ["parallel.pp=2", "parallel.dp=2"]),
}


@pytest.fixture(scope="module")
def packed_data(tmp_path_factory):
    from tests.data_helpers import write_source

    root = tmp_path_factory.mktemp("packed")
    write_source(root / "docs", shards=2, docs_per_shard=40, first_token=1, min_len=3, max_len=40)
    return [f"data.sources=[{{name: docs, path: '{root / 'docs'}', weight: 1.0}}]", f"data.cache_dir={root / 'cache'}"]


@pytest.fixture(scope="module")
def packed_reference(tmp_path_factory, packed_data):
    run_dir = tmp_path_factory.mktemp("single_packed")
    records = _train(run_dir, 1, [*PACKED, *packed_data])
    return records, _final_state(run_dir)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, tmp_path):
    _check_layout(name, *LAYOUTS[name], reference, tmp_path)


@pytest.mark.parametrize("name", list(LAYOUTS_CP_PP))
def test_context_and_pipeline_layouts_match_single_process(name, packed_reference, packed_data, tmp_path):
    nproc, overrides = LAYOUTS_CP_PP[name]
    _check_layout(name, nproc, [*PACKED, *packed_data, *overrides], packed_reference, tmp_path)


def test_packed_reference_really_packs_documents(packed_data, tmp_path):
    """The packed data gives every sequence several document starts (position ids restarting at 0)."""
    from data_pipeline import GlobalSampleStream
    from mimo_train.config import load_config

    cfg = load_config("configs/train/tiny_cpu.yaml", [*BASE, *PACKED, *packed_data])
    stream = GlobalSampleStream(cfg.data)
    stream.set_stage(cfg.train.seq_len)
    for mb in stream.micro_batches(0, 4, 4):
        starts = (mb["position_ids"] == 0).sum(dim=1)
        assert (starts >= 3).all(), starts


def _check_layout(name, nproc, overrides, reference, tmp_path):
    ref_records, ref_state = reference
    # MoE top-k routing is discontinuous: a token whose k-th and (k+1)-th scores differ by less than float
    # rounding (~1e-7) may be routed differently by any two layouts. The comparison is only meaningful when the
    # reference routes every token with a clear margin.
    margin = min(r["router/min_margin"] for r in ref_records)
    assert margin > 1e-6, f"ill-conditioned reference: a routing margin of {margin:.1e}; pick another train.seed"
    records = _train(tmp_path / name, nproc, overrides)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["batch_digest"] for r in records] == [r["batch_digest"] for r in ref_records]
    worst = 0.0
    for r, ref in zip(records, ref_records):
        for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm"):
            worst = max(worst, _rel(r[key], ref[key]))
    state = _final_state(tmp_path / name)
    # Per tensor, the relative L2 difference ||ours - ref|| / ||ref||. (Elementwise ratios are meaningless for
    # entries whose gradients are float noise: Adam's normalised update moves those by ~lr either way.)
    worst_param = worst_moment = 0.0
    for key, t in ref_state.items():
        diff = (state[key].double() - t.double()).norm().item() / max(t.double().norm().item(), 1e-30)
        if key.startswith("optim."):
            worst_moment = max(worst_moment, diff)
        else:
            worst_param = max(worst_param, diff)
    print(f"{name}: max relative difference: metrics {worst:.2e}, parameters {worst_param:.2e}, "
          f"Adam moments {worst_moment:.2e}")
    assert worst <= 1e-5
    assert worst_param <= 1e-5
    # Second moments square the gradients' rounding noise, most for experts that saw few tokens.
    assert worst_moment <= 1e-4


# (seed 3: its reference routes every token with a margin of 5.6e-6, see _check_layout)
ONE_LOCAL_EXPERT = ["model.num_experts=2", "model.num_experts_per_tok=1", "train.micro_batch_size=1", "train.seed=3"]


def test_one_local_expert_shared_by_two_ranks_matches_single_process(tmp_path):
    """EP2 over 4 ranks with 2 experts: each rank holds a stack of one expert (`[1, 2I, H]`) replicated over
    edp = 2, so the optimizer splits it along its second dimension (the first has one row). Losses, parameters and
    Adam moments, read back through DCP from those row blocks, equal one process."""
    reference = _train(tmp_path / "single", 1, ONE_LOCAL_EXPERT), _final_state(tmp_path / "single")
    _check_layout("EP2-edp2-one-local-expert", 4, [*ONE_LOCAL_EXPERT, "parallel.dp=4", "parallel.ep=2"], reference,
                  tmp_path)


def test_fully_imbalanced_routing_with_idle_expert_ranks(tmp_path):
    """All tokens go to experts 0 and 1: under EP4 three of four ranks receive no token. No crash, no NaN, and
    the same numbers as one process."""
    common = [*BASE, "train.steps=2", "train.micro_batch_size=1"]
    script = "tests/scripts/forced_routing.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, script, str(tmp_path / "single"), *common], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ep4 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                          script, str(tmp_path / "ep4"), *common, "parallel.dp=4", "parallel.ep=4"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert ep4.returncode == 0, ep4.stderr[-3000:]
    ref = [json.loads(l) for l in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(l) for l in (tmp_path / "ep4" / "metrics.jsonl").read_text().splitlines()]
    assert len(got) == 2
    for r, g in zip(ref, got):
        assert g["expert_load/dead_experts"] == 6 * 11  # 6 idle experts in each of the 11 MoE layers
        for key in ("loss", "grad_norm", "aux_loss"):
            assert torch.isfinite(torch.tensor(g[key])) and _rel(g[key], r[key]) <= 1e-5, key


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["parallel.tp=2"], 4, "parallel: tp x pp x dp x cp = 2x1x1x1 = 2 must equal the world size 4"),
        (["parallel.tp=3", "parallel.dp=1"], 3, "parallel.tp=3: must divide model.num_attention_heads (4)"),
        (["parallel.dp=3", "parallel.ep=3"], 3, "parallel.ep=3: must divide model.num_experts (8)"),
        (["parallel.tp=2", "parallel.ep=4"], 2, "parallel.ep x etp = 4 must divide dp x cp x tp = 2"),
        (["parallel.cp=8"], 8, "with parallel.cp=8 a chunk has 8 tokens, fewer than the sliding window (16)"),
        (["parallel.cp=3"], 3, "must be divisible by 2 x parallel.cp = 6"),
        (["parallel.pp=2", "parallel.pp_layout=[5,5]"], 2, "parallel.pp_layout: the stages hold 10 layers"),
        (["parallel.etp=2", "parallel.tp=2", "parallel.ep=1"], 2, "parallel.etp=2: expert-tensor parallelism"),
    ],
)
def test_invalid_layouts_are_rejected_naming_the_rule(overrides, world, message):
    from mimo_train.config import ConfigError
    from parallel.topology import validate_layout

    cfg = load_config("configs/train/tiny_cpu.yaml", [*BASE, *overrides])
    with pytest.raises(ConfigError) as e:
        validate_layout(cfg.parallel.resolve_dp(None), cfg.model, world, cfg.train.seq_len)
    assert message in str(e.value)


def test_pipeline_config_rules():
    from mimo_train.config import ConfigError

    with pytest.raises(ConfigError, match="parallel.pp_virtual: zbv places exactly 2 stages per rank"):
        load_config("configs/train/tiny_cpu.yaml", ["parallel.pp=2", "parallel.pp_schedule=zbv"])
    with pytest.raises(ConfigError, match="parallel.pp_schedule: must be one of"):
        load_config("configs/train/tiny_cpu.yaml", ["parallel.pp_schedule=gpipe"])
