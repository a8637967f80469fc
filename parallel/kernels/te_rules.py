"""What the `te` layer spec asks of Transformer Engine, in one TE-free module (unit-tested on a CPU).

Everything the spec passes to TE is built here: the keyword arguments of every TE constructor and forward (`TE_CALLS`
names the TE signature each builder feeds; the conformance test checks them against TE's own sources), which
linears run inside TE's FP8 region, which context-parallel communication each layer type uses, how TE's parameter
names map to ours, and the rules a configuration must satisfy before a `te` run starts.

Facts from TE 2.17.1's sources (the version `pip install .[gpu]` pins):
- `DotProductAttention(window_size=(left, right))` counts keys on each side of the query, so a window of
  `window_keys` keys including the query is `(window_keys - 1, 0)`;
- the sink is TE's `softmax_type="learnable"` parameter `softmax_offset` (fp32, one per local head); sinks with the
  packed (`thd`) layout need TE >= 2.12 and cuDNN >= 9.18; QK head dim != V head dim under context parallelism
  needs TE >= 2.15; `GroupedLinear.forward(inp, m_splits)` takes the split sizes as a device tensor from 2.17;
- under context parallelism a sink is supported only with `cp_comm_type="a2a"` (TE refuses p2p, and the path once
  dropped the sink silently), which splits heads over the cp ranks: both the query and the KV heads of a rank must
  divide by cp;
- `Float8BlockScaling` covers Linear-type modules only and forbids FP8 attention.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from mimo_train.config import ConfigError
from parallel.kernels.fp8 import BF16_LINEARS
from parallel.sharding import kv_split, kv_splits

TE_PINNED = "2.17.1"  # the version the calls below are written against (megatron-core 0.19 pins it too)
TE_MIN = (2, 15)  # sinks with thd (2.12) and QK != V head dims under context parallelism (2.15)
TE_MIN_M_SPLITS_TENSOR = (2, 17)  # GroupedLinear.forward(inp, m_splits) with a device tensor (no host sync)
CUDNN_MIN = (9, 18, 0)  # sinks with the thd layout run on cuDNN's fused attention from 9.18
SLIDING, GLOBAL = "sliding_attention", "full_attention"
# Context parallelism per layer type: sinks only through all-to-all; global layers (no sink) through p2p.
CP_COMM_TYPE = {SLIDING: "a2a", GLOBAL: "p2p"}
# Environment TE needs for sink attention: cuDNN's fused attention with a sink has only nondeterministic kernels.
TE_ENVIRONMENT = {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "1"}


# ---- the calls (builders of keyword arguments; TE_CALLS says which TE signature each one feeds) -----------------
@dataclass(frozen=True)
class AttentionShape:
    """One attention layer's shape on this rank (heads already divided by tensor parallelism)."""
    layer_type: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    window_keys: int
    scale: float


def attention_init_kwargs(shape: AttentionShape) -> dict:
    """DotProductAttention's constructor: packed documents (thd), causal within each, the window on SWA layers,
    the learnable sink on SWA layers (TE's `softmax_offset`), our softmax scale."""
    sliding = shape.layer_type == SLIDING
    return {
        "num_attention_heads": shape.num_heads,
        "kv_channels": (shape.head_dim, shape.v_head_dim),
        "num_gqa_groups": shape.num_kv_heads,
        "qkv_format": "thd",
        "attn_mask_type": "padding_causal",
        "window_size": (shape.window_keys - 1, 0) if sliding else (-1, 0),
        "softmax_type": "learnable" if sliding else "vanilla",
        "softmax_scale": shape.scale,
        "attention_dropout": 0.0,
    }


def attention_cp_kwargs(layer_type: str, cp_group, cp_global_ranks: list[int], cp_stream) -> dict:
    """DotProductAttention.set_context_parallel_group: TE's own context parallelism, comm type per layer type."""
    return {"cp_group": cp_group, "cp_global_ranks": cp_global_ranks, "cp_stream": cp_stream,
            "cp_comm_type": CP_COMM_TYPE[layer_type]}


def attention_forward_kwargs(cu_q: torch.Tensor, cu_kv: torch.Tensor, max_q: int, max_kv: int) -> dict:
    """DotProductAttention.forward over packed documents with no padding between them (padded = real offsets)."""
    return {"cu_seqlens_q": cu_q, "cu_seqlens_kv": cu_kv, "cu_seqlens_q_padded": cu_q,
            "cu_seqlens_kv_padded": cu_kv, "max_seqlen_q": max_q, "max_seqlen_kv": max_kv}


def linear_init_kwargs(dtype: torch.dtype, device) -> dict:
    """Linear / GroupedLinear's constructor: no bias, no TE-side parallelism (our tensor- and expert-parallel
    wrappers communicate), built on the meta device: its own weights are replaced by ours before any call."""
    return {"bias": False, "parallel_mode": None, "params_dtype": dtype, "device": device}


def autocast_kwargs(fp8: bool, recipe) -> dict:
    """te.pytorch.autocast around one TE module call: on with the blockwise recipe for FP8 linears, explicitly off
    for the others, so an excluded linear stays bf16 even inside an outer FP8 region."""
    return {"enabled": fp8, "recipe": recipe if fp8 else None}


def recipe_kwargs() -> dict:
    """Float8BlockScaling: TE's defaults are the report's recipe (E4M3, 1x128 activations and gradients, 128x128
    weights, power-of-2 scales); nothing to override."""
    return {}


# builder -> (TE source file under transformer_engine/, class or function, its method (None: a function),
# positional arguments passed)
TE_CALLS = {
    "attention_init_kwargs": ("pytorch/attention/dot_product_attention/dot_product_attention.py",
                              "DotProductAttention", "__init__", 0),
    "attention_cp_kwargs": ("pytorch/attention/dot_product_attention/dot_product_attention.py",
                            "DotProductAttention", "set_context_parallel_group", 0),
    "attention_forward_kwargs": ("pytorch/attention/dot_product_attention/dot_product_attention.py",
                                 "DotProductAttention", "forward", 3),
    "linear_init_kwargs": ("pytorch/module/linear.py", "Linear", "__init__", 2),
    "grouped_linear_init_kwargs": ("pytorch/module/grouped_linear.py", "GroupedLinear", "__init__", 3),
    "linear_forward_kwargs": ("pytorch/module/linear.py", "Linear", "forward", 1),
    "grouped_linear_forward_kwargs": ("pytorch/module/grouped_linear.py", "GroupedLinear", "forward", 2),
    "autocast_kwargs": ("pytorch/quantization.py", "autocast", "__init__", 0),
    "recipe_kwargs": ("common/recipe/__init__.py", "Float8BlockScaling", "__init__", 0),
    "cudnn_version_kwargs": ("pytorch/utils.py", "get_cudnn_version", None, 0),  # a function, not a method
    "fp8_available_kwargs": ("pytorch/quantization.py", "is_fp8_block_scaling_available", None, 0),
    "padding_init_kwargs": ("pytorch/module/fp8_padding.py", "Fp8Padding", "__init__", 1),
    "padding_forward_kwargs": ("pytorch/module/fp8_padding.py", "Fp8Padding", "forward", 2),
    "unpadding_init_kwargs": ("pytorch/module/fp8_unpadding.py", "Fp8Unpadding", "__init__", 1),
    "unpadding_forward_kwargs": ("pytorch/module/fp8_unpadding.py", "Fp8Unpadding", "forward", 2),
}
# What `transformer_engine.pytorch` (and `transformer_engine.common.recipe`) must export for the spec.
TE_EXPORTS = {"pytorch/__init__.py": ("DotProductAttention", "Linear", "GroupedLinear", "autocast",
                                      "get_cudnn_version", "Fp8Padding", "Fp8Unpadding",
                                      "is_fp8_block_scaling_available"),
              "common/recipe/__init__.py": ("Float8BlockScaling",)}


def grouped_linear_init_kwargs(dtype: torch.dtype, device) -> dict:
    return linear_init_kwargs(dtype, device)


# FP8 GEMMs of GroupedLinear take groups of a multiple of 16 rows (get_align_size_for_quantization: 16 for the
# blockwise recipe); Fp8Padding / Fp8Unpadding pad each expert's rows to it and back.
FP8_ALIGN = 16


def padding_init_kwargs() -> dict:
    """Fp8Padding / Fp8Unpadding(num_gemms): the alignment given, not read from the recipe in force."""
    return {"align_size": FP8_ALIGN}


def unpadding_init_kwargs() -> dict:
    return padding_init_kwargs()


def padding_forward_kwargs() -> dict:
    return {}


def unpadding_forward_kwargs() -> dict:
    return {}


def fp8_available_kwargs() -> dict:
    """is_fp8_block_scaling_available: with the reason when it is not."""
    return {"return_reason": True}


def cudnn_version_kwargs() -> dict:
    """get_cudnn_version(): the cuDNN TE's fused attention loads (not necessarily torch's)."""
    return {}


def linear_forward_kwargs() -> dict:
    return {}


def grouped_linear_forward_kwargs() -> dict:
    return {}


# ---- FP8: which linears run inside TE's FP8 region --------------------------------------------------------------
def fp8_linear(name: str) -> bool:
    """The report's recipe: every projection and expert GEMM in FP8 but the attention output projection and the
    output head (the embedding and the router are not linears: they stay bf16 / fp32 outside any TE module)."""
    return name.rsplit(".", 1)[-1] not in BF16_LINEARS


# ---- names: TE's parameters are bound to ours, so checkpoints do not see the backend ----------------------------
# Our module's parameter -> the TE module's parameter it is bound to before each call (the TE modules sit outside
# the model's module tree: the state dict, the optimizer and the sharding rules see our names only).
TE_PARAMETER_OF = {"sinks": "softmax_offset", "weight": "weight", "gate_up_proj": "weight{i}", "down_proj": "weight{i}"}


def bind(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make `module.<name>` read `tensor` (a Parameter of ours, or a view of one: an expert's slice). Written
    into `_parameters` directly because nn.Module refuses to assign a non-Parameter view to a parameter slot."""
    if module._parameters.get(name) is not tensor:
        module._parameters[name] = tensor


def bind_experts(module: nn.Module, stacked: torch.Tensor) -> None:
    """GroupedLinear keeps one weight per GEMM, `weight0..weight{E-1}` ([out, in] each); ours are stacked
    [E, out, in]: bind expert e's slice (a view, so gradients flow into the stacked parameter)."""
    for e in range(stacked.shape[0]):
        module._parameters[TE_PARAMETER_OF["gate_up_proj"].format(i=e)] = stacked[e]


# TE-native names (a TE module tree, as megatron-core builds it) of our parameters.
_TE_SINK, _OUR_SINK = "self_attn.core_attention.softmax_offset", "self_attn.sinks"
_FC_OF = {"linear_fc1": "gate_up_proj", "linear_fc2": "down_proj"}
_OURS_OF = {v: k for k, v in _FC_OF.items()}


def te_native_to_ours(state: dict) -> dict:
    """A state dict whose TE modules own their weights under TE's names (`core_attention.softmax_offset`,
    `experts.linear_fc1.weight{e}`) -> ours. TE's `_extra_state` entries are dropped: with blockwise scaling every
    scale is computed per tensor per call, nothing persists."""
    out, experts = {}, {}
    for key, value in state.items():
        if key.endswith("._extra_state"):
            continue
        if key.endswith(_TE_SINK):
            key = key[: -len(_TE_SINK)] + _OUR_SINK
        head, fc, leaf = (key.rsplit(".", 2) + ["", ""])[:3]
        if fc in _FC_OF and leaf.startswith("weight") and leaf[6:].isdigit():
            experts.setdefault(f"{head}.{_FC_OF[fc]}", {})[int(leaf[6:])] = value
        else:
            out[key] = value
    for key, per_expert in experts.items():
        out[key] = torch.stack([per_expert[e] for e in range(len(per_expert))])
    return out


def ours_to_te_native(state: dict) -> dict:
    """The inverse of `te_native_to_ours` (without `_extra_state`, which TE recreates)."""
    out = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        if key.endswith(_OUR_SINK):
            out[key[: -len(_OUR_SINK)] + _TE_SINK] = value
        elif leaf in _OURS_OF and head.endswith("experts"):
            for e in range(value.shape[0]):
                out[f"{head}.{_OURS_OF[leaf]}.weight{e}"] = value[e]
        else:
            out[key] = value
    return out


# ---- validation before launch -------------------------------------------------------------------------------------
def parse_version(text: str | None) -> tuple[int, ...] | None:
    """'2.17.1+cu13' or '2.17.1.dev0' -> (2, 17, 1); None (or no leading number) -> None."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text)) if text is not None else None
    return tuple(int(g) for g in match.groups() if g is not None) if match else None


def _dotted(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def check_environment(device_type: str, te_version: str | None, cudnn_version: tuple[int, ...] | None,
                      te_error: str = "") -> None:
    """The machine can run the `te` spec: a CUDA device, TE importable and new enough, cuDNN new enough (the
    version TE's fused attention loads). One ConfigError line naming the rule."""
    if device_type != "cuda":
        raise ConfigError(f"parallel.backend=te: needs a CUDA device, and this run's device is {device_type} "
                          "(CPU device: Transformer Engine runs only on NVIDIA GPUs); use parallel.backend=fused or "
                          "torch here")
    if te_version is None:
        raise ConfigError(f"parallel.backend=te: Transformer Engine is missing (import transformer_engine.pytorch "
                          f"failed{': ' + te_error if te_error else ''}); install it with pip install '.[gpu]' on a "
                          f"CUDA machine, or use parallel.backend=fused")
    version = parse_version(te_version)
    if version is None or version[:2] < TE_MIN:
        raise ConfigError(f"parallel.backend=te: Transformer Engine {te_version} is older than {_dotted(TE_MIN)} "
                          f"(sinks with packed documents, QK != V head dims under context parallelism); install "
                          f"transformer-engine=={TE_PINNED} (pip install '.[gpu]')")
    if cudnn_version is None or tuple(cudnn_version) < CUDNN_MIN:
        found = _dotted(tuple(cudnn_version)) if cudnn_version else "none"
        raise ConfigError(f"parallel.backend=te: cuDNN {found} is older than {_dotted(CUDNN_MIN)} (TE runs sink "
                          f"attention over packed documents on cuDNN's fused attention from 9.18); install a newer "
                          f"nvidia-cudnn-cu12/cu13")


def check_layout(tp: int, cp: int, num_heads: int, swa_kv_heads: int, ga_kv_heads: int) -> None:
    """The layout suits TE's attention: heads split evenly over tensor parallelism, and under context parallelism
    TE's all-to-all on SWA layers (the only comm type with a sink) splits each rank's query and KV heads over cp."""
    if num_heads % tp:
        raise ConfigError(f"parallel.tp={tp}: must divide model.num_attention_heads ({num_heads}) "
                          "(parallel.backend=te gives each rank whole heads)")
    for name, kv in (("SWA", swa_kv_heads), ("GA", ga_kv_heads)):
        if not kv_splits(kv, tp):
            raise ConfigError(f"parallel.tp={tp}: must divide the {name} KV heads ({kv}) or be a multiple of them "
                              "(parallel.backend=te)")
    if cp == 1:
        return
    per_rank_q, per_rank_kv = num_heads // tp, kv_split(swa_kv_heads, tp)[0]
    if per_rank_q % cp or per_rank_kv % cp:
        raise ConfigError(f"parallel.tp x parallel.cp = {tp}x{cp} = {tp * cp} on SWA layers: TE's context "
                          f"parallelism with a sink is all-to-all only, which splits each rank's {per_rank_q} query "
                          f"and {per_rank_kv} KV heads over cp, so tp x cp must divide the {swa_kv_heads} SWA KV "
                          f"heads (tp x cp <= {swa_kv_heads}); lower cp or tp, or use parallel.backend=fused")
    raise ConfigError(f"parallel.cp={cp} with parallel.backend=te: not supported yet: TE's thd context parallelism "
                      "splits every packed document into 2 x cp chunks of its own, parallel.cp splits each row, so "
                      "documents would attend across their boundaries; use parallel.cp=1 or parallel.backend=fused")


def uses_te(parallels) -> bool:
    """Whether some stage's `parallel` section runs the `te` spec."""
    return any(p.backend == "te" for p in parallels)


def check_machine(parallels, device_type: str, probe=None, *, fp8: bool = False, fp8_probe=None) -> None:
    """Where a run with `parallel.backend=te` in some stage starts (not where it is submitted from): the device
    (`device_type`, "cuda" or "cpu": the type of the device `train.device` resolves to on this machine), TE and
    cuDNN, and with `fp8` (train.precision=fp8) TE's blockwise FP8 on this GPU. `probe() -> (TE version, cuDNN
    version, import error)`, `fp8_probe() -> (available, reason)`: the caller hands them in (`te.probe_te`,
    `te.probe_blockwise_fp8` ask the installed TE), as it hands in the device, so these rules import neither the
    module that loads TE nor the one that picks devices."""
    if not uses_te(parallels):
        return
    if device_type != "cuda":
        check_environment(device_type, None, None)
    if probe is None or (fp8 and fp8_probe is None):
        raise ValueError("check_machine: pass probe (and fp8_probe with fp8), e.g. te.probe_te, te.probe_blockwise_fp8")
    check_environment(device_type, *probe())
    if fp8:
        available, reason = fp8_probe()
        if not available:
            raise ConfigError(f"train.precision=fp8 with parallel.backend=te: this GPU has no blockwise FP8 (TE: "
                              f"{reason}; Float8BlockScaling needs sm >= 9.0 and CUDA >= 12.9); use "
                              f"train.precision=bf16")


def check_layouts(model, parallels) -> None:
    """Every stage with `parallel.backend=te` suits TE's attention (checked wherever the config is, submit too)."""
    for p in parallels:
        if p.backend == "te":
            check_layout(p.tp, p.cp, model.num_attention_heads, model.swa_num_key_value_heads,
                         model.num_key_value_heads)
