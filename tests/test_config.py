"""Config loading: YAML files, dotted overrides, and errors that name the field and the rule."""

from __future__ import annotations

import pytest

from mimo_train.config import ConfigError, load_config, load_model_config


def test_released_model_config_is_exact():
    m = load_model_config("configs/model/mimo_v2_flash.yaml")
    ga = [i for i, t in enumerate(m.layer_types) if t == "full_attention"]
    assert ga == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    assert (m.num_key_value_heads, m.swa_num_key_value_heads) == (4, 8)
    assert (m.head_dim, m.v_head_dim, m.rotary_dim) == (192, 128, 64)
    assert m.window_keys == 129  # as transformers reads the Hub's sliding_window_size=128
    assert [m.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert (m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size, m.intermediate_size) == (256, 8, 2048, 16384)


def test_tiny_config_has_the_same_structure():
    m = load_model_config("configs/model/mimo_tiny.yaml")
    assert m.num_layers >= 12 and m.num_experts >= 8 and m.mtp.num_blocks == 1
    assert [i for i, t in enumerate(m.layer_types) if t == "full_attention"] == [0, 5, 11]


def test_train_config_and_overrides():
    cfg = load_config("configs/train/tiny_cpu.yaml", ["train.steps=3", "model.num_layers=6", "train.lr=1e-2",
                                                      "run.dir=/tmp/x", "parallel.tp=1"])
    assert cfg.train.steps == 3 and cfg.model.num_layers == 6 and cfg.train.lr == 1e-2
    assert cfg.model.hidden_size == 128  # the rest comes from configs/model/mimo_tiny.yaml


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.num_key_value_heads=3", "model.num_attention_heads: must be divisible by num_key_value_heads (3)"),
        ("model.sliding_window=0", "model.sliding_window: window must be >= 1"),
        ("model.num_experts_per_tok=9", "model.num_experts_per_tok: top-k must be <= num_experts (8)"),
        ("model.nonsense=1", "model.nonsense: unknown key"),
        ("train.steps=ten", "train.steps: must be an integer"),
        ("train.global_batch_size=6", "train.global_batch_size: must be a multiple of micro_batch_size (4)"),
        ("parallel.tp=0", "parallel.tp: must be >= 1"),
        ("data.sources[0]=x", "data.sources[0]: unknown key"),
        ("model.mtp.hidden_input=middle", "model.mtp.hidden_input: must be 'final_norm' or 'pre_norm'"),
        ("parallel.grad_bucket_mb=0", "parallel.grad_bucket_mb: must be a number of megabytes > 0"),
        ("parallel.grad_bucket_mb=-4", "parallel.grad_bucket_mb: must be a number of megabytes > 0"),
        ("parallel.overlap_grad_reduce=sometimes", "parallel.overlap_grad_reduce: must be"),
        ("parallel.sequence_parallel=false", "parallel.sequence_parallel: removed; tensor parallelism always shards"),
    ],
)
def test_invalid_values_name_the_field_and_rule(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/train/tiny_cpu.yaml", [override])
    assert message in str(e.value)


def test_data_section_errors_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: mimo_tiny\ndata:\n  sources:\n    - {name: a, path: /x, weight: 0}\n")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight: must be > 0"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("model: mimo_tiny\ndata:\n  sources: []\n")
    with pytest.raises(ConfigError, match="data.sources"):
        load_config(empty)


def test_missing_file_and_unknown_model_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    f = tmp_path / "t.yaml"
    f.write_text("model: no_such_model\n")
    with pytest.raises(ConfigError, match="model.from: no model config named 'no_such_model'"):
        load_config(f)


def test_help_documents_every_subcommand_and_option():
    """`mimo-train --help` and each subcommand's --help: every subcommand has a summary and a description, every
    option and positional argument a help text."""
    import argparse

    from mimo_train.launch.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {c.dest: c.help for c in sub._choices_actions}
    assert set(sub.choices) >= {"train", "info", "plan", "submit", "prepare-data", "hf-import", "hf-export"}
    undocumented = []
    for name, command in sub.choices.items():
        if not summaries.get(name) or not command.description:
            undocumented.append(name)
        undocumented += [f"{name} {a.option_strings or a.dest}" for a in command._actions
                         if not isinstance(a, argparse._HelpAction) and not a.help]
        assert command.format_help()  # renders
    assert not undocumented, undocumented


def test_a_resolved_parallel_section_gives_the_layout_the_topology_and_planner_share():
    """`ParallelConfig.layout()`: every field of `Layout` is a `parallel:` key with the same default (but dp, "auto"
    until the world size is known), the resolved section carries each into the layout, and the topology's degrees
    are its layout's."""
    import dataclasses

    from mimo_train.config import Layout, ParallelConfig
    from parallel.topology import Topology

    section = {f.name: f.default for f in dataclasses.fields(ParallelConfig)}
    for f in dataclasses.fields(Layout):
        assert f.name in section and (f.default == section[f.name] or f.name == "dp"), f.name
    assert section["dp"] == "auto"
    p = load_config("configs/train/tiny_cpu.yaml", ["parallel.tp=2", "parallel.pp=2", "parallel.cp=2", "parallel.ep=4",
                             "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual=2",
                             "parallel.recompute=full"]).parallel
    with pytest.raises(ConfigError, match="parallel.dp is 'auto': resolve it"):
        p.layout()
    layout = p.resolve_dp(16).layout()
    assert layout == Layout(tp=2, pp=2, dp=2, cp=2, ep=4, etp=1, pp_schedule="interleaved_1f1b", pp_virtual=2,
                            recompute="full")
    assert (layout.world, layout.edp) == (16, 2)  # edp = dp x cp x tp / (ep x etp)
    topo = Topology(rank=3, layout=layout)
    degrees = (topo.tp, topo.pp, topo.dp, topo.cp, topo.ep, topo.etp, topo.edp, topo.world_size)
    assert degrees == (2, 2, 2, 2, 4, 1, 2, 16)
    assert {layout: "cached"}[p.resolve_dp(16).layout()] == "cached"  # frozen: estimates are cached by layout
