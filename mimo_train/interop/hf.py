"""Hugging Face interop: config.json and safetensors in the layout of the released MiMo-V2-Flash checkpoint.

The Hub checkpoint stores experts one by one (`mlp.experts.{e}.{gate,up,down}_proj.weight`), the SWA sink as
`self_attn.attention_sink_bias`, and the MTP blocks under `model.mtp.layers.{n}.*`; transformers fuses the experts
into `gate_up_proj`/`down_proj` and renames the sink to `sinks` on load. Our module uses transformers' internal
names, so importing accepts either layout and exporting writes the Hub's.
"""

from __future__ import annotations

import json
import shutil
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mimo_train.config import ModelConfig, MTPConfig
from mimo_train.model import MiMoForCausalLM
from parallel.kernels import get_spec

_SINK_HUB = "self_attn.attention_sink_bias"
_SINK_OURS = "self_attn.sinks"
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# --------------------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------------------


def to_hf_config(cfg: ModelConfig) -> dict:
    """Our model config as config.json: the Hub's field names, plus the explicit fields transformers reads
    (`rope_parameters`, `layer_types`), since transformers ignores `rope_theta`/`swa_rope_theta` in this model.
    Long by nature: one line per config.json field, in the Hub file's order."""
    if cfg.swa_kv_head_factor != 2:
        raise ValueError("hf-export: transformers' MiMo-V2-Flash requires model.swa_kv_head_factor == 2")
    window = cfg.window_keys - 1  # the Hub's sliding_window_size: keys before the query
    rope = {"rope_type": "default", "partial_rotary_factor": cfg.partial_rotary_factor}
    return {
        "architectures": ["MiMoV2FlashForCausalLM"],
        "model_type": "mimo_v2_flash",
        "torch_dtype": "float32",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "swa_num_key_value_heads": cfg.swa_num_key_value_heads,
        "swa_num_attention_heads": cfg.num_attention_heads,
        "head_dim": cfg.head_dim,
        "swa_head_dim": cfg.head_dim,
        "v_head_dim": cfg.v_head_dim,
        "swa_v_head_dim": cfg.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "layernorm_epsilon": cfg.rms_norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "partial_rotary_factor": cfg.partial_rotary_factor,
        "rope_theta": cfg.rope_theta,
        "swa_rope_theta": cfg.swa_rope_theta,
        "rope_parameters": {
            "full_attention": {**rope, "rope_theta": cfg.rope_theta},
            "sliding_attention": {**rope, "rope_theta": cfg.swa_rope_theta},
        },
        "sliding_window_size": window,
        "sliding_window": window,
        "layer_types": cfg.layer_types,
        "hybrid_layer_pattern": [0 if cfg.is_global_layer(i) else 1 for i in range(cfg.num_layers)],
        "mlp_layer_types": ["sparse" if cfg.is_moe_layer(i) else "dense" for i in range(cfg.num_layers)],
        "moe_layer_freq": [1 if cfg.is_moe_layer(i) else 0 for i in range(cfg.num_layers)],
        "add_swa_attention_sink_bias": True,
        "add_full_attention_sink_bias": False,
        "attention_value_scale": cfg.attention_value_scale,
        "n_routed_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "n_shared_experts": None,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "num_nextn_predict_layers": cfg.mtp.num_blocks,
        # Ours, so that a round trip is exact; transformers ignores unknown fields.
        "mimo_train": {
            "sliding_window_includes_query": cfg.sliding_window_includes_query,
            "mtp_hidden_input": cfg.mtp.hidden_input,
            "mtp_apply_value_scale": cfg.mtp.apply_value_scale,
        },
    }


def from_hf_config(hf: dict, num_mtp_blocks: int | None = None) -> ModelConfig:
    """Read a Hub or transformers config.json. The window follows transformers: `sliding_window_size` (Hub)
    means that many keys before the query; a bare `sliding_window` (as transformers saves it) counts the query."""
    ours = hf.get("mimo_train", {})
    if "sliding_window_size" in hf and hf["sliding_window_size"] is not None:
        keys = hf["sliding_window_size"] + 1
    else:
        keys = hf.get("sliding_window", 129)
    includes_query = bool(ours.get("sliding_window_includes_query", False))
    rope_params = hf.get("rope_parameters") or {}
    ga_theta = rope_params.get("full_attention", {}).get("rope_theta", hf.get("rope_theta", 5_000_000.0))
    swa_theta = rope_params.get("sliding_attention", {}).get("rope_theta", hf.get("swa_rope_theta", 10_000.0))
    partial = rope_params.get("full_attention", {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.334))
    n_layers = hf["num_hidden_layers"]
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=n_layers,
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf["num_key_value_heads"],
        swa_kv_head_factor=hf.get("swa_num_key_value_heads", 2 * hf["num_key_value_heads"]) // hf["num_key_value_heads"],
        head_dim=hf.get("head_dim", 192),
        v_head_dim=hf.get("v_head_dim", 128),
        partial_rotary_factor=partial,
        rope_theta=float(ga_theta),
        swa_rope_theta=float(swa_theta),
        sliding_window=keys if includes_query else keys - 1,
        sliding_window_includes_query=includes_query,
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        num_experts=hf.get("n_routed_experts", hf.get("num_local_experts", 256)),
        num_experts_per_tok=hf["num_experts_per_tok"],
        n_group=hf.get("n_group", 1) or 1,
        topk_group=hf.get("topk_group", 1) or 1,
        norm_topk_prob=hf.get("norm_topk_prob", True),
        routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
        attention_value_scale=float(hf.get("attention_value_scale") or 1.0),
        rms_norm_eps=hf.get("layernorm_epsilon", hf.get("rms_norm_eps", 1e-5)),
        init_std=hf.get("initializer_range", 0.006),
        max_position_embeddings=hf.get("max_position_embeddings", 262144),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id") if not isinstance(hf.get("eos_token_id"), list) else hf["eos_token_id"][0],
        mtp=MTPConfig(
            num_blocks=num_mtp_blocks if num_mtp_blocks is not None else hf.get("num_nextn_predict_layers", 0),
            hidden_input=ours.get("mtp_hidden_input", "final_norm"),
            apply_value_scale=ours.get("mtp_apply_value_scale", True),
        ),
    )
    _read_layer_types(hf, cfg)
    cfg.validate("config.json")
    return cfg


def _read_layer_types(hf: dict, cfg: ModelConfig) -> None:
    """Check config.json's attention layer types against the GA rule, and take its leading dense FFN layers."""
    layer_types = hf.get("layer_types")
    if layer_types is None and hf.get("hybrid_layer_pattern") is not None:
        layer_types = ["full_attention" if p == 0 else "sliding_attention" for p in hf["hybrid_layer_pattern"]]
    if layer_types is not None and layer_types != cfg.layer_types:
        raise ValueError(f"config.json: layer_types {layer_types} do not follow the GA rule this framework builds")
    mlp_types = hf.get("mlp_layer_types")
    if mlp_types is None and hf.get("moe_layer_freq") is not None:
        mlp_types = ["sparse" if f else "dense" for f in hf["moe_layer_freq"]]
    if mlp_types is not None:
        dense = [i for i, t in enumerate(mlp_types) if t == "dense"]
        if dense != list(range(len(dense))):
            raise ValueError(f"config.json: dense FFN layers {dense} must be the leading layers")
        cfg.first_dense_layers = len(dense)


# --------------------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------------------


def to_hub_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (= transformers') names -> the released checkpoint's names: experts one by one, sinks renamed."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len(".gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = t[e, :inter].contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = t[e, inter:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = t[e].contiguous()
        elif name.endswith(_SINK_OURS):
            out[name[: -len(_SINK_OURS)] + _SINK_HUB] = t.contiguous()
        else:
            out[name] = t.contiguous()
    return out


def from_hub_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released checkpoint's names (or transformers' fused ones) -> ours."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in state.items():
        m = _EXPERT_RE.match(name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        elif name.endswith(_SINK_HUB):
            out[name[: -len(_SINK_HUB)] + _SINK_OURS] = t
        elif name.endswith("weight_scale_inv"):
            raise ValueError(f"{name}: FP8 block-quantised checkpoints must be dequantised to bf16/fp32 first")
        else:
            out[name] = t
    for prefix, per_expert in experts.items():
        ids = sorted(per_expert)
        if ids != list(range(len(ids))):
            raise ValueError(f"{prefix}: expert ids {ids[:5]}... are not contiguous from 0")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[e]["gate_proj"], per_expert[e]["up_proj"]], dim=0) for e in ids]
        )
        out[f"{prefix}.down_proj"] = torch.stack([per_expert[e]["down_proj"] for e in ids])
    return out


def save_hf(model, out_dir: str | Path, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write config.json, safetensors shards and their index in the released checkpoint's layout."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = to_hub_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (out_dir / "config.json").write_text(json.dumps(to_hf_config(model.cfg), indent=1))


def save_tokenizer(tokenizer_path: str | Path, out_dir: str | Path, model_max_length: int) -> None:
    """The run's tokenizer beside the weights (tokenizer.json and the tokenizer_config.json transformers' AutoTokenizer
    reads), so the exported directory is usable on its own."""
    from tokenizers import Tokenizer

    out_dir = Path(out_dir)
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.json")
    tok = Tokenizer.from_file(str(tokenizer_path))
    special = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length}
    eos = next((t for t in special if "end" in t or "eos" in t), special[0] if special else None)
    if eos is not None:
        config["eos_token"] = eos
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def make_readable(out_dir: str | Path) -> None:
    """World-readable files (0644) and directory (0755), whatever the umask of the exporting process: an exported
    model is read by other users and services."""
    out_dir = Path(out_dir)
    out_dir.chmod(0o755)
    for p in out_dir.iterdir():
        if p.is_file():
            p.chmod(0o644)


def read_hf_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(hf_dir / f)))
    return state


def load_pretrained(path: str | Path, backend: str = "torch"):
    """Build our model from a Hugging Face directory (the released layout or transformers' own)."""
    path = Path(path)
    hf_cfg = json.loads((path / "config.json").read_text())
    state = from_hub_state_dict(read_hf_weights(path))
    n_mtp = len({m.group(1) for k in state if (m := re.match(r"^model\.mtp\.layers\.(\d+)\.", k))})
    cfg = from_hf_config(hf_cfg, num_mtp_blocks=n_mtp)
    model = MiMoForCausalLM(cfg, spec=get_spec(backend))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model.eval()
