"""Section 6: one full-width decoder layer of each type with routed experts (SWA + MoE: layer 1; GA + MoE: layer 5
of configs/model/mimo_v2_flash.yaml, 256 experts top-8), B=1, S=32k, forward + backward, bf16 and FP8
(parallel/kernels/fp8.py), activation recompute none and selective (parallel/recompute.py).

Reported: tokens/s, model TFLOP/s (the layer's training FLOPs from `mimo_train.model.info.model_report`, the window
counted as O(S W)), MFU against the H200's dense bf16 peak (mimo_train/hardware.py's GPU table; FP8 runs are held to
the same bf16 peak), and the peak memory above the layer's weights and gradients next to the planner's estimate of
the layer's saved activations plus its backward working memory (`memory.layer_bytes` + `memory.layer_transient`
for the same kernel, shape and recompute). A case that runs out of memory is reported as such and the rest go on.
"""

from __future__ import annotations

import torch

from bench.gpu.harness import Harness, relative_error
from parallel.kernels import get_spec

# The kernel backend of the layer and train sections (the fast path a Hopper user gets).
KERNEL_BACKEND = "fused"
LAYER_TYPES = {"swa_moe": 1, "ga_moe": 5}  # a layer index of each type (layer 0 is dense; GA every 6th from 0)
PRECISIONS = ("bf16", "fp8")
RECOMPUTE = ("none", "selective")


def full_width_config(smoke: bool):
    from mimo_train.config import CONFIG_ROOT, load_model_config

    if smoke:
        return load_model_config(CONFIG_ROOT / "model/mimo_tiny.yaml", [])
    return load_model_config(CONFIG_ROOT / "model/mimo_v2_flash.yaml", [])


def build_layer(cfg, index: int, precision: str, recompute: str, device, backend: str = KERNEL_BACKEND):
    """Decoder layer `index` in bf16 on `device` with the trainer's initialisation scale, FP8 and recompute applied
    from outside as build_parallel_model does."""
    from mimo_train.model.transformer import DecoderLayer
    from mimo_train.precision import PRECISIONS
    from parallel.recompute import apply_recompute

    from parallel.mixed_precision import cast_parameters

    with torch.device("meta"):  # no fp32 copy of 6.4B expert weights on the way
        layer = DecoderLayer(cfg, index, get_spec(backend))
    cast_parameters(layer, torch.bfloat16)  # parameters only: the expert bias buffer stays fp32
    layer.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(index)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, cfg.init_std, generator=gen)
        for b in layer.buffers():
            b.zero_()
    if PRECISIONS[precision].fp8_gemms:
        from parallel.kernels.fp8 import convert_to_fp8
        convert_to_fp8(layer)
    apply_recompute(layer, recompute)
    return layer


def rope_tables(cfg, layer_type: str, seq: int, device):
    from mimo_train.model.layers import RotaryEmbedding

    rope = RotaryEmbedding(cfg.rotary_dim, {"full_attention": cfg.rope_theta,
                                            "sliding_attention": cfg.swa_rope_theta}).to(device)
    positions = torch.arange(seq, device=device).view(1, seq)
    return rope(positions, layer_type, torch.bfloat16)


def planner_estimate_bytes(cfg, index: int, seq: int, recompute: str, backend: str) -> float:
    """The planner's saved activations + backward working memory of this layer (one micro-batch, no parallelism)."""
    from mimo_train.planning import geometry, memory

    shape = geometry.LayerShape(sliding=not cfg.is_global_layer(index), moe=cfg.is_moe_layer(index),
                               kv_heads=cfg.num_key_value_heads * (1 if cfg.is_global_layer(index)
                                                                   else cfg.swa_kv_head_factor))
    s = memory.ActShape(tokens=seq, sp_tokens=seq, seq=seq, cp=1, tp=1, mbs=1)
    A = geometry.Assumptions(kernel=geometry.kernel_of(backend), packed_documents=False)
    return memory.layer_bytes(cfg, shape, s, 2, A, recompute) + memory.layer_transient(cfg, shape, s, 2, A)


def layer_flops_per_token(cfg, index: int, seq: int) -> float:
    from mimo_train.model.info import model_report

    row = model_report(cfg, seq)["layers"][index]
    return row["attention_flops_per_token"] + row["dense_flops_per_token"]


def run(h: Harness) -> None:
    from mimo_train.hardware import GPUS

    cfg = full_width_config(h.smoke)
    seq = h.pick(32768, 64)
    peak = GPUS["h200"].peak_tflops * 1e12
    gen = torch.Generator(device=h.device).manual_seed(0)
    x = torch.randn(1, seq, cfg.hidden_size, device=h.device, generator=gen).bfloat16()
    dy = torch.randn(1, seq, cfg.hidden_size, device=h.device, generator=gen).bfloat16()
    for kind, index in LAYER_TYPES.items():
        flops = layer_flops_per_token(cfg, index, seq) * seq
        outputs = {}
        for precision in PRECISIONS:
            for recompute in RECOMPUTE:
                outputs[(precision, recompute)] = _measure(h, cfg, kind, index, precision, recompute, x, dy, seq,
                                                           flops, peak)
        _check_numerics(h, kind, outputs)


def _measure(h, cfg, kind, index, precision, recompute, x, dy, seq, flops, peak):
    """Time one configuration; returns what its attention and FFN branches add to the output and to the input
    gradient (the residual path would hide their errors), or None when out of memory."""
    layer = None
    try:
        layer = build_layer(cfg, index, precision, recompute, h.device)
        cos, sin = rope_tables(cfg, layer.layer_type, seq, h.device)
        attn_meta = get_spec(KERNEL_BACKEND).metadata(None, 1, seq, h.device)  # one document: built once, as prepare() does
        xi = x.clone().requires_grad_()
        last = {}

        def step():  # weight gradients accumulate in place after the first call: the peak is activations only
            xi.grad = None
            out, aux, _ = layer(xi, cos, sin, attn_meta)
            (out * dy).sum().add(aux.float()).backward()
            last["out"] = out.detach()

        seconds = h.time(step, warmup=1, iters=2)
        mem = h.peak_memory(step)
        estimate = planner_estimate_bytes(cfg, index, seq, recompute, KERNEL_BACKEND)
        h.result("layer", type=kind, precision=precision, recompute=recompute, backend=KERNEL_BACKEND, seq=seq,
                 status="ok", ms=seconds * 1e3, tokens_per_s=seq / seconds, model_tflops=flops / seconds / 1e12,
                 mfu=flops / seconds / peak, peak_gib=None if mem is None else mem / 2**30,
                 planner_gib=estimate / 2**30)
        return last["out"] - x, xi.grad.detach() - dy  # the layer's own branches (without the residual path)
    except torch.OutOfMemoryError:
        h.result("layer", type=kind, precision=precision, recompute=recompute, backend=KERNEL_BACKEND, seq=seq,
                 status="oom")
        return None
    finally:
        del layer
        if h.cuda:
            torch.cuda.empty_cache()


def _check_numerics(h: Harness, kind: str, outputs: dict) -> None:
    """Recompute changes nothing (the same kernels run again); FP8 stays within its rounding of bf16."""
    ref = outputs.get(("bf16", "none"))
    if ref is None:
        return
    for (precision, recompute), got in outputs.items():
        if got is None or (precision, recompute) == ("bf16", "none"):
            continue
        err_out, err_dx = relative_error(got[0], ref[0]), relative_error(got[1], ref[1])
        # fp8: a chain of E4M3 GEMMs (q/k/v, then gate_up and down around the SwiGLU product), each ~2^-4 sqrt(2/3)
        # = 5 % relative, plus the tokens whose top-8 flips; 0.25 catches a wrong tile direction or scale layout
        # (errors of order 1). bf16 under recompute: the same kernels run again, only rounding order may change.
        bound = 0.25 if precision == "fp8" else 1e-2
        ok = err_out < bound and err_dx < bound
        h.result("layer_numerics", type=kind, precision=precision, recompute=recompute, err_out=f"{err_out:.2e}",
                 err_dx=f"{err_dx:.2e}", bound=bound, ok=ok)
        if h.smoke and not ok:
            raise AssertionError(f"layer {kind} {precision}/{recompute}: out {err_out:.2e} dx {err_dx:.2e} vs bf16")
