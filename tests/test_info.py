"""`mimo-train info`: parameter counts against the spec's independently derived figures (spec section 1.8),
meta-device counts against a real model, FLOPs against torch's own FLOP counter and the O(window) scaling of SWA."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mimo_train.config import load_model_config
from mimo_train.model.info import add_info_parser, format_report, model_report
from mimo_train.model import MiMoForCausalLM

FULL = "configs/model/mimo_v2_flash.yaml"
TINY = "configs/model/mimo_tiny.yaml"
B = 1e9


@pytest.fixture(scope="module")
def full_report():
    cfg = load_model_config(FULL)
    start = time.perf_counter()
    report = model_report(cfg)
    return report, time.perf_counter() - start


def test_full_model_matches_spec_figures(full_report):
    report, seconds = full_report
    assert seconds < 5, f"model_report on the 309B config took {seconds:.1f}s"
    p, a = report["params"], report["active_params"]
    # Spec 1.8: main model 308.78B (MTP excluded), 0.329B per MTP block, 3 blocks in the release.
    assert abs(p["total"] - 308.78 * B) < 0.05 * B
    assert abs(p["mtp_per_block"] - 0.329 * B) < 0.005 * B
    assert report["config"]["mtp_blocks"] == 3 and p["mtp_total"] == 3 * p["mtp_per_block"]
    assert abs(p["total_with_mtp"] - 309.77 * B) < 0.05 * B
    assert abs(p["embedding"] - 0.625 * B) < 0.001 * B and p["lm_head"] == p["embedding"]
    assert abs(p["attention"] - 4.483 * B) < 0.005 * B
    # Spec 1.8 / section 6 item 15: active per token.
    assert abs(a["excl_embedding_incl_head"] - 14.82 * B) < 0.02 * B
    assert abs(a["incl_embedding_and_head"] - 15.45 * B) < 0.02 * B
    assert abs(a["excl_embedding_and_head"] - 14.20 * B) < 0.02 * B
    # Spec 1.3: per-layer attention 89.13M (GA) and 94.37M + 64 sinks (SWA); 1.5: one MoE layer 6.444B.
    layers = report["layers"]
    assert [l["index"] for l in layers if l["attention"] == "GA"] == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    assert {l["attention_params"] for l in layers if l["attention"] == "GA"} == {89_128_960}
    assert {l["attention_params"] for l in layers if l["attention"] == "SWA"} == {94_371_840 + 64}
    assert [l["ffn"] for l in layers] == ["dense"] + ["MoE"] * 47
    assert all(abs(l["ffn_params"] - 6.444 * B) < 0.001 * B for l in layers[1:])


def test_full_model_text_report(full_report):
    text = format_report(full_report[0])
    assert "308.78B" in text and "329.27M" in text and "14.82B" in text and "15.45B" in text
    assert text.count("\n") > 48  # one row per layer


def test_tiny_meta_count_equals_real_model():
    cfg = load_model_config(TINY)
    report = model_report(cfg, seq_len=64)
    real = MiMoForCausalLM(cfg)  # on CPU, allocated
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    mtp_numel = numel(real.model.mtp) if real.model.mtp is not None else 0
    assert report["params"]["total"] + report["params"]["mtp_total"] == numel(real)
    assert report["params"]["total"] == numel(real) - mtp_numel
    assert report["params"]["mtp_per_block"] == numel(real.model.mtp.layers[0])
    assert report["params"]["embedding"] == real.model.embed_tokens.weight.numel()
    for row, layer in zip(report["layers"], real.decoder_layers(), strict=True):
        assert row["total_params"] == numel(layer)
        assert row["attention_params"] == numel(layer.self_attn)
    # Layer types: GA at i == 0 or (i + 1) % 6 == 0 (GA at 0, 5, 11 for 12 layers); only layer 0 is dense.
    assert [l["attention"] for l in report["layers"]] == [
        "GA" if i == 0 or (i + 1) % 6 == 0 else "SWA" for i in range(12)
    ]
    assert [l["index"] for l in report["layers"] if l["attention"] == "GA"] == [0, 5, 11]
    assert [l["ffn"] for l in report["layers"]] == ["dense"] + ["MoE"] * 11
    # SWA layers have twice the GA KV heads: k/v projections are larger by that many heads' worth.
    H, d, dv = cfg.hidden_size, cfg.head_dim, cfg.v_head_dim
    ga, swa = report["layers"][0]["attention_params"], report["layers"][1]["attention_params"]
    assert swa - ga == H * (d + dv) * (cfg.swa_num_key_value_heads - cfg.num_key_value_heads) + cfg.num_attention_heads


def test_dense_flops_match_torch_flop_counter():
    """The forward matmul FLOPs torch counts (aten.mm / addmm: every linear, router, expert and the LM head; the
    attention core uses bmm / SDPA and is left out) are 2 x active matmul params per token; dense = 3 x that."""
    cfg = load_model_config(TINY, ["model.mtp.num_blocks=0"])
    report = model_report(cfg, seq_len=96)
    model = MiMoForCausalLM(cfg)
    model.init_weights(seed=0)
    tokens = 2 * 96
    ids = torch.randint(0, cfg.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids)
    counts = counter.get_flop_counts()["Global"]
    matmul_flops = sum(v for op, v in counts.items() if op in (torch.ops.aten.mm, torch.ops.aten.addmm))
    assert matmul_flops == 2 * tokens * report["active_params"]["matmul"]
    assert report["flops_per_token"]["dense"] == 3 * matmul_flops / tokens
    # The active count: all but the unused experts and the embedding lookup are matmul or norm/sink params.
    moe = [l for l in report["layers"] if l["ffn"] == "MoE"]
    unused = sum(l["ffn_params"] - l["router_params"] for l in moe) * (cfg.num_experts - cfg.num_experts_per_tok) \
        // cfg.num_experts
    assert report["active_params"]["incl_embedding_and_head"] == report["params"]["total"] - unused


def test_full_dense_flops_are_six_times_active_matmul(full_report):
    f, a = full_report[0]["flops_per_token"], full_report[0]["active_params"]
    assert f["dense"] == 6 * a["matmul"]
    # The matmul params are the active params less norms, sinks (and the embedding lookup).
    assert 0 < a["excl_embedding_incl_head"] - a["matmul"] < 1e6
    assert f["total"] == pytest.approx(f["dense"] + f["attention_swa"] + f["attention_ga"] + f["mtp"])


def test_swa_flops_are_linear_in_window_not_sequence():
    cfg = load_model_config(FULL)
    f32 = model_report(cfg, seq_len=32768)["flops_per_token"]
    f256 = model_report(cfg, seq_len=262144)["flops_per_token"]
    assert 1.0 < f256["attention_swa"] / f32["attention_swa"] < 1.01
    assert 7.9 < f256["attention_ga"] / f32["attention_ga"] < 8.1
    assert 1.0 < f256["mtp"] / f32["mtp"] < 1.01  # MTP attention is SWA too
    assert f32["naive_total"] > f32["total"] and f256["naive_total"] / f256["total"] > f32["naive_total"] / f32["total"]
    # GA at 32k: 9 layers x (seq_len + 1) / 2 keys x 3 x 2 x 64 heads x (192 + 128).
    assert f32["attention_ga"] == 9 * (32768 + 1) / 2 * 3 * 2 * 64 * (192 + 128)
    # SWA: 129 keys (128 + the query) once past the first window, 39 layers.
    assert f256["attention_swa"] == pytest.approx(39 * 129 * 3 * 2 * 64 * (192 + 128), rel=1e-3)


@pytest.mark.parametrize("seq_len", [1, 5, 17, 300])
def test_swa_mean_keys_short_sequences(seq_len):
    cfg = load_model_config(TINY)  # window 16 + the query = 17 keys
    f = model_report(cfg, seq_len=seq_len)["flops_per_token"]
    assert f["swa_mean_keys"] == pytest.approx(sum(min(17, p + 1) for p in range(seq_len)) / seq_len)
    if seq_len <= 17:
        assert f["swa_mean_keys"] == f["ga_mean_keys"]


def _cli(argv):
    parser = argparse.ArgumentParser(prog="mimo-train")
    add_info_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_json_output(capsys):
    assert _cli(["info", "--config", TINY, "--json", "--seq-len", "128", "mtp.num_blocks=2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"config", "params", "active_params", "flops_per_token", "layers", "mtp"} <= set(report)
    assert {"total", "embedding", "lm_head", "mtp_per_block", "mtp_total"} <= set(report["params"])
    assert {"excl_embedding_incl_head", "incl_embedding_and_head", "excl_embedding_and_head"} <= set(
        report["active_params"])
    assert {"total", "dense", "attention_swa", "attention_ga", "mtp", "naive_total"} <= set(report["flops_per_token"])
    assert report["flops_per_token"]["seq_len"] == 128
    assert report["config"]["mtp_blocks"] == 2 and len(report["mtp"]) == 2
    assert {"index", "attention", "ffn", "attention_params", "ffn_params", "total_params"} <= set(report["layers"][0])


def test_cli_text_and_training_yaml(tmp_path, capsys):
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text("model: mimo_tiny\ntrain:\n  steps: 3\n")
    assert _cli(["info", "--config", str(train_yaml), "model.num_layers=6"]) == 0
    text = capsys.readouterr().out
    assert "Per layer" in text and "6 layers" in text
    assert _cli(["info", "--config", str(train_yaml), "model.num_layerz=6"]) == 2
    assert "num_layerz" in capsys.readouterr().err
