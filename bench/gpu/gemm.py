"""Section 5: the model's GEMMs (configs/model/mimo_v2_flash.yaml) in training form, forward + dgrad + wgrad of
`y = x W^T`: bf16 (`F.linear`) vs blockwise FP8 (parallel/kernels/fp8.py: cuBLAS 1x128 / 128x128 scaling on sm90, emulated
elsewhere) vs torchao's float8 training (tensorwise and rowwise, when torchao imports).

For each: TFLOP/s (3 x 2 M N K per fwd+bwd, quantisation included) and the relative error (Frobenius) of y and of
dx against an fp32 reference of the same bf16 operands. The FP8 error bound checked here is E4M3's: each operand
element rounds by at most 2^-4 relative (half an ulp with 3 mantissa bits), so a product of two rounded operands
errs by well under 2 x 2^-4 in norm; random operands give about 2^-4 x sqrt(2/3) (uniform rounding errors of both).
The operands' 1x128 tiles and 128x128 blocks each have their own scale (fp8.magnitude_tiles), and for every shape the
blockwise GEMM is checked against the emulated recipe (`gemm_blockwise_vs_emulation`, both recipes; bound
fp8.EMULATION_REL_TOLERANCE): a mismatch fails the section once every shape has reported.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bench.gpu.harness import Harness, relative_error
from parallel.kernels import fp8

FP8_ERROR_BOUND = 2.0 ** -4  # relative Frobenius error of an FP8 GEMM of random operands (see above)
BF16_ERROR_BOUND = 2.0 ** -7  # bf16 operands are exact; only the bf16 output rounds (u = 2^-8), with slack


def model_gemms(cfg) -> list[tuple[str, int, int]]:
    """(name, N out, K in) of every GEMM of a decoder layer, as parallel/kernels/fp8.py applies FP8 (o_proj stays bf16 and
    is measured for comparison)."""
    h, hd, vd = cfg.hidden_size, cfg.head_dim, cfg.v_head_dim
    swa_kv = cfg.num_key_value_heads * cfg.swa_kv_head_factor
    return [
        ("q_proj", cfg.num_attention_heads * hd, h),
        ("k_proj_swa", swa_kv * hd, h), ("v_proj_swa", swa_kv * vd, h),
        ("k_proj_ga", cfg.num_key_value_heads * hd, h), ("v_proj_ga", cfg.num_key_value_heads * vd, h),
        ("o_proj", h, cfg.num_attention_heads * vd),
        ("dense_gate_up", 2 * cfg.intermediate_size, h), ("dense_down", h, cfg.intermediate_size),
        ("expert_gate_up", 2 * cfg.moe_intermediate_size, h), ("expert_down", h, cfg.moe_intermediate_size),
        ("mtp_eh_proj", h, 2 * h),
    ]


def _torchao_linear(weight: torch.Tensor, recipe: str):
    """torchao's Float8Linear over a copy of `weight`, or None when torchao does not import."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except (ImportError, RuntimeError, OSError):
        return None
    module = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                                     dtype=weight.dtype))
    with torch.no_grad():
        module[0].weight.copy_(weight)
    convert_to_float8_training(module, config=Float8LinearConfig.from_recipe_name(recipe))
    return module


def _candidates(weight: torch.Tensor):
    w = weight.detach().clone().requires_grad_()
    yield "bf16", lambda x: torch.nn.functional.linear(x, w), w
    w8 = weight.detach().clone().requires_grad_()
    yield "fp8_blockwise", lambda x: fp8.fp8_linear(x, w8), w8
    for recipe in ("tensorwise", "rowwise"):
        module = _torchao_linear(weight.detach(), recipe)
        if module is not None:
            yield f"torchao_{recipe}", module, module[0].weight


def run(h: Harness) -> None:
    from mimo_train.config import CONFIG_ROOT, load_model_config

    cfg = load_model_config(CONFIG_ROOT / "model/mimo_v2_flash.yaml", [])
    tokens = h.pick(16384, 256)
    gemms = model_gemms(cfg)
    if h.smoke:  # tiny shapes with the same structure: 128-multiples and a K/128 that needs the L4 padding
        gemms = [("q_proj", 384, 256), ("k_proj_ga", 128, 256), ("expert_down", 256, 768)]
    blockwise = fp8.blockwise_supported(h.device)
    mismatched = []
    for index, (name, n, k) in enumerate(gemms):
        # every 1x128 tile (activations, gradients) and 128x128 block (weights) at its own scale, 2^-6 .. 2^6
        x = fp8.magnitude_tiles(tokens, k, block_rows=1, device=h.device, seed=3 * index)
        weight = (fp8.magnitude_tiles(n, k, block_rows=fp8.TILE, device=h.device, seed=3 * index + 1).float()
                  * k ** -0.5).bfloat16()
        dy = fp8.magnitude_tiles(tokens, n, block_rows=1, device=h.device, seed=3 * index + 2)
        ref_y = x.float() @ weight.float().t()
        ref_dx = dy.float() @ weight.float()
        flops = 3 * 2 * tokens * n * k
        for label, fn, w in _candidates(weight):
            xi = x.clone().requires_grad_()

            def step():
                xi.grad, w.grad = None, None
                fn(xi).backward(dy)

            seconds = h.time(step)
            xi.grad = None
            y = fn(xi)
            y.backward(dy)
            err_y, err_dx = relative_error(y, ref_y), relative_error(xi.grad, ref_dx)
            bound = BF16_ERROR_BOUND if label == "bf16" else FP8_ERROR_BOUND
            h.result("gemm", shape=name, m=tokens, n=n, k=k, kind=label,
                     path=("cublas" if blockwise else "emulated") if label == "fp8_blockwise" else "native",
                     tflops=flops / seconds / 1e12, err_y=f"{err_y:.2e}", err_dx=f"{err_dx:.2e}",
                     within_bound=err_y < bound and err_dx < bound)
            if h.smoke and label in ("bf16", "fp8_blockwise") and not (err_y < bound and err_dx < bound):
                raise AssertionError(f"gemm {name} {label}: error y {err_y:.2e} dx {err_dx:.2e} above {bound:.2e}")
        mismatched += _check_against_emulation(h, name, x, weight, dy, "cublas" if blockwise else "emulated")
    if mismatched:  # after every shape has reported: the section fails, its results are kept
        raise AssertionError(f"blockwise FP8 GEMM differs from the emulated recipe: {', '.join(mismatched)}")


def _check_against_emulation(h: Harness, name: str, x, weight, dy, path: str) -> list[str]:
    """The blockwise GEMM (cuBLAS on sm90, else the emulation itself) against `fp8.emulated_mm` on the same
    operands, for the forward recipe (1x128 x 128x128) and the wgrad one (1x128 x 1x128); the bound is
    fp8.EMULATION_REL_TOLERANCE (accumulation and output rounding only: the quantised values are the same)."""
    failed = []
    for recipe, a, b, b_rows in (("fwd", x, weight, fp8.TILE), ("wgrad", dy.t(), x.t(), 1)):
        got = fp8.blockwise_mm(a, b, b_rows=b_rows, out_dtype=torch.bfloat16)
        err = fp8.relative_error(got, fp8.emulated_mm(a, b, b_rows=b_rows, out_dtype=torch.bfloat16))
        ok = err < fp8.EMULATION_REL_TOLERANCE
        h.result("gemm_blockwise_vs_emulation", shape=name, recipe=recipe, path=path, rel_diff=f"{err:.2e}",
                 bound=fp8.EMULATION_REL_TOLERANCE, ok=ok)
        if not ok:
            failed.append(f"{name} {recipe} ({err:.1e})")
    return failed
