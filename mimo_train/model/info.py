"""`mimo-train info`: parameter counts, active parameters and FLOPs per token of a model config.

Every parameter figure is counted from the real module tree: `MiMoForCausalLM(cfg)` is built on the meta device
(no memory, well under a second for the 309B model) and its `named_parameters()` are bucketed by the module that
owns them. Nothing is re-derived from the config formulas, so the report follows the code if the code changes.

Active parameters per token (spec section 1.8 and section 6 item 15) count, for each MoE layer, only the top-k
experts (each expert is one slice of the stacked expert tensors) plus the router. Three variants are reported:

- ``excl_embedding_incl_head``: the "14.82B incl. head" figure (the embedding is a lookup, not a matmul);
- ``incl_embedding_and_head``: the "15.45B" figure that matches the headline "15B";
- ``excl_embedding_and_head``: the "14.20B" figure.

FLOPs per token are training FLOPs (forward + backward = 3 x forward), with a matmul of m x k by k x n counted as
2·m·n·k:

- ``dense``: 6 x the active matmul parameters of the main model (every linear layer incl. router and LM head,
  the top-k experts; not the embedding lookup, norms or sinks);
- ``attention_swa`` / ``attention_ga``: the attention core (QK^T and PV) per token, 3 x (2·head_dim·heads +
  2·v_head_dim·heads) per attended key. An SWA query at position p attends min(window_keys, p + 1) keys, a GA
  query p + 1 keys; both are averaged over a sequence of ``seq_len`` tokens, so SWA is O(window) per token and
  GA is O(seq_len);
- ``mtp``: the MTP blocks (eh_proj, SWA attention with its core, dense FFN, and their use of the shared LM head);
- ``naive_total``: the same model with every attention layer (MTP included) counted as full causal attention,
  for comparison with the O(S^2) estimate.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
import torch.nn as nn

from mimo_train.config import Config, ConfigError, ModelConfig, load_config
from mimo_train.model.layers import Attention, Experts, MoE, TopKRouter
from mimo_train.model.transformer import MiMoForCausalLM

DEFAULT_SEQ_LEN = 32768


# --------------------------------------------------------------------------------------------------------------
# Counting from the module tree
# --------------------------------------------------------------------------------------------------------------


def _count(module: nn.Module) -> dict[str, int]:
    """Total, active-per-token and active-matmul parameters of `module`, from the parameters each submodule owns.

    Matmul parameters are nn.Linear weights, router weights and expert weights. An MoE's experts are stacked
    [num_experts, ...] tensors; a token uses `top_k` of those slices. Everything else (norms, sinks, embeddings)
    is active but not a matmul.
    """
    expert_top_k = {id(m.experts): m.top_k for m in module.modules() if isinstance(m, MoE)}
    total = active = matmul = 0
    for m in module.modules():
        for p in m.parameters(recurse=False):
            n = p.numel()
            total += n
            if isinstance(m, Experts):
                num_experts = p.shape[0]
                top_k = expert_top_k.get(id(m), num_experts)
                a = n // num_experts * top_k
                active += a
                matmul += a
            elif isinstance(m, (nn.Linear, TopKRouter)):
                active += n
                matmul += n
            else:  # RMSNorm weights, attention sinks, embedding tables
                active += n
    return {"total": total, "active": active, "matmul": matmul}


def _swa_mean_keys(window_keys: int, seq_len: int) -> float:
    """Mean over positions p = 0..seq_len-1 of min(window_keys, p + 1)."""
    w = min(window_keys, seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * window_keys) / seq_len


def _causal_mean_keys(seq_len: int) -> float:
    return (seq_len + 1) / 2


def _attention_core_flops_per_key(attn: Attention) -> int:
    """Forward + backward FLOPs of QK^T and PV for one (query, key) pair, summed over the heads."""
    return 3 * (2 * attn.head_dim * attn.num_heads + 2 * attn.v_head_dim * attn.num_heads)


def _attention_core_flops(attn: Attention, seq_len: int) -> tuple[float, float]:
    """(FLOPs per token as built, FLOPs per token if the layer were full causal)."""
    per_key = _attention_core_flops_per_key(attn)
    full = per_key * _causal_mean_keys(seq_len)
    if attn.sliding:
        return per_key * _swa_mean_keys(attn.window_keys, seq_len), full
    return full, full


def build_meta_model(cfg: ModelConfig) -> MiMoForCausalLM:
    with torch.device("meta"):
        return MiMoForCausalLM(cfg)


def model_report(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    """Parameter counts, active parameters and training FLOPs per token of `cfg`, counted on a meta-device model."""
    seq_len = DEFAULT_SEQ_LEN if seq_len is None else int(seq_len)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1 (got {seq_len})")
    model = build_meta_model(cfg)
    trunk = model.model
    parts = {"embedding": _count(trunk.embed_tokens), "head": _count(model.lm_head), "final_norm": _count(trunk.norm)}
    rows = [_layer_row(i, layer, seq_len) for i, layer in enumerate(model.decoder_layers())]
    layers = [row for row, _, _ in rows]
    # MTP blocks: their own parameters, plus a use of the shared LM head each (and the shared embedding lookup).
    blocks = ([_mtp_row(d, block, parts["head"], seq_len) for d, block in enumerate(trunk.mtp.layers)]
              if trunk.mtp is not None else [])
    mtp = [row for row, _ in blocks]
    main_total = (parts["embedding"]["total"] + sum(l["total_params"] for l in layers) + parts["final_norm"]["total"]
                  + parts["head"]["total"])
    mtp_total = sum(b["params"] for b in mtp)
    all_params = sum(p.numel() for p in model.parameters())
    if all_params != main_total + mtp_total:  # a parameter outside the buckets above: the report would be wrong
        raise RuntimeError(f"parameter buckets ({main_total + mtp_total}) do not add up to the model ({all_params})")
    active_matmul_main = sum(matmul for _, _, matmul in rows) + parts["head"]["matmul"]
    window_keys = trunk.layers["0"].self_attn.window_keys if layers else cfg.window_keys
    return {
        "config": _config_section(cfg, layers, len(mtp), window_keys),
        **_param_sections(parts, layers, mtp, main_total, mtp_total, active_matmul_main),
        "flops_per_token": _flops_section(rows, blocks, 6 * active_matmul_main, seq_len, window_keys),
        "layers": layers,
        "mtp": mtp,
    }


def _layer_row(i: int, layer: nn.Module, seq_len: int) -> tuple[dict[str, Any], float, int]:
    """A decoder layer's row of the report, its attention core's FLOPs over the whole causal sequence (the naive
    count) and its active matmul parameters."""
    attn, ffn, whole = _count(layer.self_attn), _count(layer.mlp), _count(layer)
    core, core_full = _attention_core_flops(layer.self_attn, seq_len)
    is_moe = isinstance(layer.mlp, MoE)
    row = {
        "index": i,
        "attention": "SWA" if layer.self_attn.sliding else "GA",
        "ffn": "MoE" if is_moe else "dense",
        "kv_heads": layer.self_attn.num_kv_heads,
        "attention_params": attn["total"],
        "ffn_params": ffn["total"],
        "norm_params": whole["total"] - attn["total"] - ffn["total"],
        "total_params": whole["total"],
        "active_params": whole["active"],
        "ffn_active_params": ffn["active"],
        "router_params": sum(p.numel() for p in layer.mlp.gate.parameters()) if is_moe else 0,
        "attention_flops_per_token": core,
        "dense_flops_per_token": 6 * whole["matmul"],
    }
    return row, core_full, whole["matmul"]


def _mtp_row(d: int, block: nn.Module, head: dict[str, int], seq_len: int) -> tuple[dict[str, Any], float]:
    """An MTP block's row of the report (its FLOPs include a use of the shared LM head), and its naive FLOPs."""
    c = _count(block)
    core, core_full = _attention_core_flops(block.self_attn, seq_len)
    dense = 6 * (c["matmul"] + head["matmul"])
    row = {
        "index": d,
        "params": c["total"],
        "attention_params": _count(block.self_attn)["total"],
        "ffn_params": _count(block.mlp)["total"],
        "eh_proj_params": _count(block.eh_proj)["total"],
        "active_matmul_params_with_head": c["matmul"] + head["matmul"],
        "dense_flops_per_token": dense,
        "attention_flops_per_token": core,
        "flops_per_token": dense + core,
    }
    return row, dense + core_full


def _config_section(cfg: ModelConfig, layers: list[dict], mtp_blocks: int, window_keys: int) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_layers": len(layers),
        "ga_layers": [l["index"] for l in layers if l["attention"] == "GA"],
        "num_swa_layers": sum(l["attention"] == "SWA" for l in layers),
        "num_moe_layers": sum(l["ffn"] == "MoE" for l in layers),
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "window_keys": window_keys,
        "mtp_blocks": mtp_blocks,
    }


def _param_sections(parts: dict, layers: list[dict], mtp: list[dict], main_total: int, mtp_total: int,
                    active_matmul_main: int) -> dict[str, Any]:
    """The report's "params" and "active_params"."""
    embedding, head, final_norm = parts["embedding"], parts["head"], parts["final_norm"]
    active_body = sum(l["active_params"] for l in layers) + final_norm["active"]  # layers + final norm
    return {
        "params": {
            "total": main_total,  # main model, MTP excluded
            "embedding": embedding["total"],
            "lm_head": head["total"],
            "final_norm": final_norm["total"],
            "attention": sum(l["attention_params"] for l in layers),
            "ffn": sum(l["ffn_params"] for l in layers),
            "layer_norms": sum(l["norm_params"] for l in layers),
            "mtp_per_block": mtp[0]["params"] if mtp else 0,
            "mtp_total": mtp_total,
            "total_with_mtp": main_total + mtp_total,
        },
        "active_params": {
            "excl_embedding_incl_head": active_body + head["active"],  # spec 1.8 "14.82B incl. head"
            "incl_embedding_and_head": active_body + head["active"] + embedding["active"],  # "15.45B"
            "excl_embedding_and_head": active_body,  # "14.20B"
            "matmul": active_matmul_main,  # linear layers incl. router and LM head, top-k experts
        },
    }


def _flops_section(rows: list[tuple], blocks: list[tuple], dense_flops: int, seq_len: int,
                   window_keys: int) -> dict[str, Any]:
    """The report's "flops_per_token". Sums are accumulated in layer order with `+=` (not `sum()`, whose float
    rounding differs between Python versions), so the figures are the same everywhere."""
    attn = {"SWA": 0.0, "GA": 0.0}
    naive_attention = mtp_flops = mtp_naive = 0.0
    for row, core_full, _ in rows:
        attn[row["attention"]] += row["attention_flops_per_token"]
        naive_attention += core_full
    for row, naive in blocks:
        mtp_flops += row["flops_per_token"]
        mtp_naive += naive
    total = dense_flops + attn["SWA"] + attn["GA"] + mtp_flops
    naive_total = dense_flops + naive_attention + mtp_naive
    return {
        "seq_len": seq_len,
        "total": total,
        "dense": dense_flops,
        "attention_swa": attn["SWA"],
        "attention_ga": attn["GA"],
        "mtp": mtp_flops,
        "forward_total": total / 3,
        "naive_total": naive_total,
        "naive_attention": naive_attention,
        "naive_over_actual": naive_total / total,
        "swa_mean_keys": _swa_mean_keys(window_keys, seq_len),
        "ga_mean_keys": _causal_mean_keys(seq_len),
    }


# --------------------------------------------------------------------------------------------------------------
# Text output
# --------------------------------------------------------------------------------------------------------------


def human(n: float, digits: int = 2) -> str:
    """308_780_000_000 -> '308.78B'."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.{digits}f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.{digits}f}"


def human_flops(n: float) -> str:
    for div, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}FLOP"
    return f"{n:.0f} FLOP"


def startup_banner(cfg: Config, plan, stage, world: int, checkpoint_dir, step: int) -> str:
    """What a run is about to do, printed once at start-up: the model's size, every stage's layout and tokens per
    step, the process count and where the checkpoints go."""
    report = model_report(cfg.model, stage.seq_len)
    params, active = report["params"], report["active_params"]
    lines = [f"mimo-train: model {human(params['total_with_mtp'])} parameters ({human(params['total'])} without "
             f"MTP), {human(active['incl_embedding_and_head'])} active per token; {world} process"
             f"{'es' if world != 1 else ''}; {'resuming at step ' + str(step) if step else 'starting at step 0'}"]
    for s in plan.stages:
        where = " (current)" if s.index == stage.index and plan.staged else ""
        lines.append(f"  stage {s.name}{where}: layout {s.layout_str()}, {s.global_batch_size} x {s.seq_len} = "
                     f"{s.global_batch_size * s.seq_len:,} tokens per step (micro-batch {s.micro_batch_size})")
    lines.append(f"  checkpoints: {checkpoint_dir}")
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    c, p, a, f = report["config"], report["params"], report["active_params"], report["flops_per_token"]
    lines = [
        f"Model: {c['num_layers']} layers ({len(c['ga_layers'])} GA at {c['ga_layers']}, {c['num_swa_layers']} SWA), "
        f"hidden {c['hidden_size']}, vocab {c['vocab_size']}, {c['num_moe_layers']} MoE layers "
        f"({c['num_experts']} experts, top-{c['num_experts_per_tok']}), SWA window {c['window_keys']} keys, "
        f"{c['mtp_blocks']} MTP block(s)",
        "",
        "Parameters",
        f"  main model total (excl. MTP)   {human(p['total']):>10}   ({p['total']:,})",
        f"    embedding                    {human(p['embedding']):>10}",
        f"    LM head                      {human(p['lm_head']):>10}",
        f"    attention (all layers)       {human(p['attention']):>10}",
        f"    FFN (all layers)             {human(p['ffn']):>10}",
        f"    norms                        {human(p['layer_norms'] + p['final_norm']):>10}",
        f"  MTP per block                  {human(p['mtp_per_block']):>10}   ({p['mtp_per_block']:,})",
        f"  MTP total                      {human(p['mtp_total']):>10}",
        f"  main + MTP                     {human(p['total_with_mtp']):>10}",
        "",
        "Active parameters per token (top-k experts + router)",
        f"  excl. embedding, incl. head    {human(a['excl_embedding_incl_head']):>10}",
        f"  incl. embedding and head       {human(a['incl_embedding_and_head']):>10}",
        f"  excl. embedding and head       {human(a['excl_embedding_and_head']):>10}",
        f"  matmul (incl. router, head)    {human(a['matmul']):>10}",
        "",
        f"Training FLOPs per token (fwd+bwd = 3x fwd) at seq_len {f['seq_len']:,}",
        f"  total                          {human_flops(f['total']):>14}",
        f"    dense (6 x active matmul)    {human_flops(f['dense']):>14}",
        f"    attention SWA                {human_flops(f['attention_swa']):>14}"
        f"   ({f['swa_mean_keys']:.2f} keys/query)",
        f"    attention GA                 {human_flops(f['attention_ga']):>14}"
        f"   ({f['ga_mean_keys']:.1f} keys/query)",
        f"    MTP ({c['mtp_blocks']} block(s))             {human_flops(f['mtp']):>14}",
        f"  naive (all attention full)     {human_flops(f['naive_total']):>14}"
        f"   ({f['naive_over_actual']:.2f}x the total)",
        "",
        "Per layer",
    ]
    header = f"  {'idx':>3}  {'attn':<4} {'kv':>3}  {'ffn':<5} {'attn params':>11} {'ffn params':>11} " \
             f"{'total':>9} {'active':>9} {'attn FLOP/tok':>15}"
    lines += [header, "  " + "-" * (len(header) - 2)]
    for l in report["layers"]:
        lines.append(
            f"  {l['index']:>3}  {l['attention']:<4} {l['kv_heads']:>3}  {l['ffn']:<5} "
            f"{human(l['attention_params']):>11} {human(l['ffn_params']):>11} {human(l['total_params']):>9} "
            f"{human(l['active_params']):>9} {human_flops(l['attention_flops_per_token']):>15}"
        )
    for b in report["mtp"]:
        lines.append(
            f"  mtp{b['index']}  SWA, dense FFN, eh_proj {human(b['eh_proj_params'])}: "
            f"{human(b['params'])} params, {human_flops(b['flops_per_token'])}/token incl. the shared LM head"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

_SECTIONS = set(Config.__dataclass_fields__)


def _normalise_override(item: str) -> str:
    """Allow `mtp.num_blocks=1` as short for `model.mtp.num_blocks=1` (info only looks at the model)."""
    key = item.split("=", 1)[0].strip()
    if "=" in item and key.split(".")[0] not in _SECTIONS:
        return f"model.{item.strip()}"
    return item


def run_info(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, [_normalise_override(o) for o in args.overrides]).model
        report = model_report(cfg, seq_len=args.seq_len)
    except (ConfigError, ValueError) as e:
        print(f"mimo-train info: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


def add_info_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "info",
        help="parameter counts, active parameters and FLOPs per token of a model config",
        description="Count parameters (total, MTP, active per token) and training FLOPs per token of a model, "
                    "from the module tree built on the meta device (no memory is allocated).",
    )
    p.add_argument("--config", required=True, help="a model YAML (configs/model/*.yaml) or a training YAML")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                   help=f"sequence length for the attention FLOPs (default {DEFAULT_SEQ_LEN})")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. model.mtp.num_blocks=1 (the model. prefix may be left out)")
    p.set_defaults(func=run_info)
    return p
