"""The sharding plan (parallel/sharding.py) is the one statement of where parameters live: every rank of a real
topology (torch's fake backend, one process) holds exactly the plan's slice of the single-process model's
parameters, the ranks of a replicated KV head hold the same head, and every layout check refuses exactly the KV
head counts the plan cannot place."""

from __future__ import annotations

import pytest
import torch

from mimo_train.config import ConfigError, ParallelConfig
from parallel.fake_group import fake_world
from parallel.kernels import te_rules
from parallel.parallelize import parallelize
from parallel.sharding import kv_split, kv_splits, place, rule_of
from parallel.topology import build_topology, validate_layout
from tests.helpers import randomised_model, tiny_model_config


def test_kv_split_splits_or_replicates():
    assert [kv_split(kv, tp) for kv, tp in ((8, 4), (4, 4), (2, 8), (1, 4), (4, 1))] == [
        (2, 1), (1, 1), (1, 4), (1, 4), (4, 1)]
    with pytest.raises(ValueError, match="3 KV heads cannot be placed on 2 tensor-parallel ranks"):
        kv_split(3, 2)
    replicated = place(rule_of("model.layers.0.self_attn.k_proj.weight"), tp=8, tp_rank=5, kv_heads=2)
    assert (replicated.index, replicated.num_slices, replicated.replicas, replicated.grad_kind) == (1, 2, 4, "kv2")


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 6, 8, 12])
def test_layout_checks_refuse_what_the_plan_cannot_place(tp):
    """topology's and TE's layout rules accept a tp exactly when the plan can place both KV head counts."""
    cfg = tiny_model_config(num_attention_heads=24, num_key_value_heads=4, swa_kv_head_factor=3)  # GA 4, SWA 12
    placeable = kv_splits(4, tp) and kv_splits(12, tp)
    for check in (lambda: validate_layout(ParallelConfig(tp=tp, dp=1), cfg, tp),
                  lambda: te_rules.check_layout(tp, 1, 24, 12, 4)):
        if placeable:
            check()
        else:
            with pytest.raises(ConfigError, match=f"parallel.tp={tp}: must divide the (GA|SWA) KV heads"):
                check()


@pytest.mark.parametrize("overrides, world, tp, ep", [
    ({}, 4, 4, 1),  # GA: 1 KV head on 4 ranks, SWA: 2 heads, each on 2 ranks
    ({}, 4, 2, 4),  # TP2 x DP2 x EP4: GA replicated, SWA split, experts over 4 ranks
    ({"num_attention_heads": 8, "num_key_value_heads": 4}, 2, 2, 1),  # both split
])
def test_every_rank_holds_the_plans_slice_of_the_single_process_model(overrides, world, tp, ep):
    cfg = tiny_model_config(**overrides)
    full = dict(randomised_model(cfg).named_parameters())
    for rank in range(world):
        with fake_world(rank, world):
            topo = build_topology(ParallelConfig(tp=tp, dp=world // tp, ep=ep), cfg)
            model = randomised_model(cfg)
            layouts = parallelize(model, topo)
            for name, p in model.named_parameters():
                placement = layouts[name].placement
                if placement.dim is None:
                    assert torch.equal(p, full[name]), name
                    continue
                size = p.shape[placement.dim]
                assert size * placement.num_slices == full[name].shape[placement.dim], name
                expect = full[name].narrow(placement.dim, placement.index * size, size)
                assert torch.equal(p, expect), (name, rank)
                if placement.replicas > 1:  # a replicated head is held by `replicas` consecutive tp ranks
                    assert topo.rank_in("tp") // placement.replicas == placement.index, (name, rank)
                    assert placement.grad_kind == f"kv{placement.num_slices}"
