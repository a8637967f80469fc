"""Blockwise FP8 (`train.precision=fp8`, parallel/kernels/fp8.py), on the CPU: quantisation, the scaled matmuls torch runs
on a CPU, cuBLAS's block-scale layouts on the meta device, the FP8 linear and grouped GEMM against dequantised
references, the module swap, and training runs that track bf16.

Error bounds come from E4M3: 3 mantissa bits, so rounding a normal number to nearest errs by at most 2^-4 of it;
below the smallest normal (2^-6) the spacing is the subnormal step 2^-9, so the error is at most 2^-10 (times the
tile's scale).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from parallel.kernels import fp8
from parallel.kernels.fp8 import (
    E4M3,
    block_scale_layout,
    convert_to_fp8,
    dequantize_blocks,
    fp8_grouped_mm,
    fp8_linear,
    quantize_blocks,
    quantize_rows,
    quantize_weight,
    round_trip,
    tile_scale_layout,
)

HALF_ULP = 2.0 ** -4  # relative, normal numbers
SUBNORMAL_HALF_STEP = 2.0 ** -10  # absolute, in units of the tile's scale


def _heavy_tailed(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) ** 3  # a wide dynamic range inside each tile


@pytest.mark.parametrize("pow2", [True, False])
@pytest.mark.parametrize("block_rows", [1, 128])
def test_round_trip_within_e4m3_rounding(pow2, block_rows):
    x = _heavy_tailed(300, 200)  # neither dimension a multiple of 128: partial tiles at the edges
    values, scale = quantize_blocks(x, block_rows, pow2=pow2)
    assert values.dtype == E4M3 and values.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (-(-300 // block_rows), 2)
    back = dequantize_blocks(values, scale, block_rows)
    per_element_scale = scale.repeat_interleave(block_rows, 0).repeat_interleave(128, 1)[:300, :200]
    bound = torch.maximum(HALF_ULP * x.abs(), SUBNORMAL_HALF_STEP * per_element_scale)
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    assert (values.float().abs() <= 448).all()
    # each tile's largest element uses the top of E4M3's range (above 224 with power-of-2 scales)
    first_tiles = values.float().abs()[:block_rows * 2, :128].reshape(2, block_rows * 128)
    assert (first_tiles.amax(dim=1) > (224 if pow2 else 440)).all()
    if pow2:
        assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)  # exact powers of 2


def test_power_of_2_scales_make_exact_values_exact():
    """Numbers with at most 4 significant bits (E4M3's 1 + 3) survive quantisation exactly: a power-of-2 scale adds
    no rounding of its own. A tile of zeros has scale 1 and stays zero."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-15, 16, (4, 256), generator=g).float() * torch.exp2(torch.randint(-3, 4, (4, 256), generator=g).float())
    x[2:] = 0.0
    x[1, 128:] = 0.0
    values, scale = quantize_rows(x)
    assert torch.equal(dequantize_blocks(values, scale, 1), x)
    assert scale[2:].eq(1).all() and scale[1, 1] == 1  # the all-zero tiles
    assert values[2:].float().eq(0).all()
    _, scale_nonpow2 = quantize_rows(x, pow2=False)
    assert not torch.equal(torch.exp2(torch.log2(scale_nonpow2).round()), scale_nonpow2)  # the option matters


def test_weight_blocks_are_128x128_and_transpose_invariant():
    w = _heavy_tailed(256, 384, seed=1)
    values, scale = quantize_weight(w)
    assert scale.shape == (2, 3)
    t_values, t_scale = quantize_weight(w.t())
    assert torch.equal(t_scale, scale.t())
    assert torch.equal(t_values.float(), values.float().t())  # one quantised copy serves forward and dgrad
    block = w[128:256, 256:384]
    assert scale[1, 2] == torch.exp2(torch.ceil(torch.log2(block.abs().max() / 448)))


def test_bad_shapes_are_rejected_clearly():
    with pytest.raises(ValueError, match="expects a 2-D tensor"):
        quantize_rows(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="offs must be int32"):
        fp8_grouped_mm(torch.zeros(4, 8), torch.zeros(2, 8, 8), torch.tensor([2, 4]))


def test_tensorwise_and_rowwise_scaled_mm_on_cpu_equal_dequantised_matmuls():
    """torch._scaled_mm runs tensorwise and rowwise scaling on a CPU: it equals the matmul of the dequantised
    operands (fp32 out: the same products, summed in a different order)."""
    a, b = _heavy_tailed(64, 256, seed=2), _heavy_tailed(96, 256, seed=3)
    a_amax, b_amax = a.abs().max(), b.abs().max()
    sa, sb = (a_amax / 448).reshape(()), (b_amax / 448).reshape(())
    qa, qb = (a / sa).to(E4M3), (b / sb).to(E4M3)
    out = torch._scaled_mm(qa, qb.t(), sa.float(), sb.float(), out_dtype=torch.float32)
    ref = (qa.float() * sa) @ (qb.float() * sb).t()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    ra, rb = a.abs().amax(1, keepdim=True) / 448, b.abs().amax(1, keepdim=True) / 448
    qa, qb = (a / ra).to(E4M3), (b / rb).to(E4M3)
    out = torch._scaled_mm(qa, qb.t(), ra.float(), rb.t().float().contiguous(), out_dtype=torch.float32)
    ref = (qa.float() * ra) @ (qb.float() * rb).t()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("M,K,N", [(256, 768, 512), (128, 4096, 1024), (512, 1024, 768)])
def test_block_scale_layouts_accepted_on_meta(M, K, N):
    """The scales of the forward (1x128 x 128x128), dgrad (same, K and N swapped) and wgrad (1x128 x 1x128 along
    the tokens) GEMMs, in parallel/kernels/fp8.py's layouts, pass F.scaled_mm's checks; K/128 = 6 needs the L4 padding."""
    import torch.nn.functional as F
    from torch.nn.functional import ScalingType as S

    def e4m3(*shape):
        return torch.empty(*shape, device="meta", dtype=E4M3)

    def scales(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.float32)

    x, w, dy = e4m3(M, K), e4m3(N, K), e4m3(M, N)
    sa, sb = tile_scale_layout(scales(M, K // 128)), block_scale_layout(scales(N // 128, K // 128))
    assert sa.stride() == (1, M) and sb.stride() == (1, sb.shape[0]) and sb.shape[0] % 4 == 0
    y = F.scaled_mm(x, w.t(), sa, S.BlockWise1x128, sb, S.BlockWise128x128, output_dtype=torch.bfloat16)
    assert y.shape == (M, N)
    wt = e4m3(K, N)  # W^T's values, for dgrad: dy [M, N] @ W [N, K]
    dx = F.scaled_mm(dy, wt.t(), tile_scale_layout(scales(M, N // 128)), S.BlockWise1x128,
                     block_scale_layout(scales(K // 128, N // 128)), S.BlockWise128x128, output_dtype=torch.bfloat16)
    assert dx.shape == (M, K)
    dyt, xt = e4m3(N, M), e4m3(K, M)  # wgrad: dy^T [N, M] @ x [M, K], tiles along M
    dw = F.scaled_mm(dyt, xt.t(), tile_scale_layout(scales(N, M // 128)), S.BlockWise1x128,
                     tile_scale_layout(scales(K, M // 128)), S.BlockWise1x128, output_dtype=torch.bfloat16)
    assert dw.shape == (N, K)
    if (K // 128) % 4:  # without the L4 padding the weight scales are refused
        with pytest.raises(RuntimeError, match="blockwise scaling"):
            F.scaled_mm(x, w.t(), sa, S.BlockWise1x128, scales(N // 128, K // 128).t(), S.BlockWise128x128,
                        output_dtype=torch.bfloat16)
    if hasattr(torch, "_scaled_mm"):  # the older entry point infers the recipe from [K/128, N/128] scales
        assert torch._scaled_mm(x, w.t(), sa, sb[: K // 128], out_dtype=torch.bfloat16).shape == (M, N)


def _reference_linear(x, w, dy):
    """The recipe by hand: each GEMM of dequantised operands, tiles as parallel/kernels/fp8.py's docstring says."""
    x2, dy2 = x.reshape(-1, x.shape[-1]).float(), dy.reshape(-1, dy.shape[-1]).float()
    y = round_trip(x2, 1) @ round_trip(w.float(), 128).t()
    dx = round_trip(dy2, 1) @ round_trip(w.float().t(), 128).t()
    dw = round_trip(dy2.t(), 1) @ round_trip(x2.t(), 1).t()
    return y, dx, dw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_forward_backward_equals_dequantised_reference(dtype):
    x = _heavy_tailed(2, 100, 256, seed=4).to(dtype).requires_grad_()  # 200 tokens: a partial token tile
    w = (0.05 * _heavy_tailed(384, 256, seed=5)).to(dtype).requires_grad_()
    dy = _heavy_tailed(2, 100, 384, seed=6).to(dtype)
    y = fp8_linear(x, w)
    y.backward(dy)
    ref_y, ref_dx, ref_dw = _reference_linear(x.detach(), w.detach(), dy)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-2)
    torch.testing.assert_close(y.float().reshape(-1, 384), ref_y.to(dtype).float(), **tol)
    torch.testing.assert_close(x.grad.float().reshape(-1, 256), ref_dx.to(dtype).float(), **tol)
    torch.testing.assert_close(w.grad.float(), ref_dw.to(dtype).float(), **tol)
    exact = x.detach().float() @ w.detach().float().t()
    err = ((y.float() - exact).norm() / exact.norm()).item()
    assert 1e-3 < err < 0.05, err  # FP8 really rounds, and only by E4M3's few percent


def _grouped_case(seed=7):
    counts = [5, 0, 130, 1, 0, 40]  # uneven groups, empty experts (one at the start of a tile run)
    E, K, N_out = len(counts), 192, 160
    x = _heavy_tailed(sum(counts) + 3, K, seed=seed)  # 3 rows past the last offset
    w = 0.05 * _heavy_tailed(E, N_out, K, seed=seed + 1)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    return counts, x, w, offs


def test_fp8_grouped_mm_equals_per_expert_fp8_linears():
    counts, x, w, offs = _grouped_case()
    x.requires_grad_(), w.requires_grad_()
    out = fp8_grouped_mm(x, w, offs)
    dy = _heavy_tailed(*out.shape, seed=9)
    out.backward(dy)
    assert out.shape == (x.shape[0], w.shape[1])
    assert out[offs[-1]:].eq(0).all() and x.grad[offs[-1]:].eq(0).all()  # rows past the last offset
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            assert w.grad[e].eq(0).all()  # an empty expert's gradient is exactly zero
            continue
        xe = x.detach()[start:start + n].requires_grad_()
        we = w.detach()[e].clone().requires_grad_()
        ye = fp8_linear(xe, we)
        ye.backward(dy[start:start + n])
        torch.testing.assert_close(out[start:start + n], ye, rtol=0, atol=0)
        torch.testing.assert_close(x.grad[start:start + n], xe.grad, rtol=0, atol=0)
        torch.testing.assert_close(w.grad[e], we.grad, rtol=0, atol=0)
        start += n


def test_fp8_grouped_mm_with_no_rows_keeps_the_graph():
    x = torch.zeros(0, 128, requires_grad=True)
    w = torch.randn(3, 64, 128, requires_grad=True)
    out = fp8_grouped_mm(x, w, torch.zeros(3, dtype=torch.int32))
    assert out.shape == (0, 64)
    out.sum().backward()
    assert x.grad.shape == (0, 128)


def test_convert_to_fp8_swaps_the_recipes_gemms_and_keeps_names():
    from mimo_train.config import load_config
    from mimo_train.model import MiMoForCausalLM

    cfg = load_config("configs/train/tiny_cpu.yaml", [])
    torch.manual_seed(0)
    model = MiMoForCausalLM(cfg.model)
    names = [n for n, _ in model.named_parameters()]
    before = {n: p for n, p in model.named_parameters()}
    converted = convert_to_fp8(model)
    assert [n for n, _ in model.named_parameters()] == names
    assert all(p is before[n] for n, p in model.named_parameters())  # the same Parameters
    suffixes = {c.rsplit(".", 1)[-1] for c in converted}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "eh_proj", "experts"}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("o_proj", "lm_head"):
            assert type(module) is nn.Linear, name
        if leaf == "gate" and hasattr(module, "weight"):  # the router keeps its own fp32 matmul
            assert not isinstance(module, fp8.Fp8Linear), name
    assert len([c for c in converted if c.endswith("experts")]) == sum(cfg.model.is_moe_layer(i)
                                                                        for i in range(cfg.model.num_layers))
    assert convert_to_fp8(model) == []  # idempotent: nothing left to convert


def test_tensor_parallel_wrappers_keep_the_fp8_matmul():
    from parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    lin = fp8.Fp8Linear.from_linear(nn.Linear(256, 128, bias=False))
    assert ColumnParallelLinear(lin, slice(0, 64), None, False).linear_function is fp8.fp8_linear
    assert RowParallelLinear(lin, slice(0, 128), None, False).linear_function is fp8.fp8_linear
    assert ColumnParallelLinear(nn.Linear(4, 4), slice(0, 2), None, False).linear_function is torch.nn.functional.linear


def test_precision_fp8_is_accepted_and_others_rejected():
    from mimo_train.config import ConfigError, load_config

    assert load_config("configs/train/tiny_cpu.yaml", ["train.precision=fp8"]).train.precision == "fp8"
    with pytest.raises(ConfigError, match="train.precision.*fp32, bf16, fp8"):
        load_config("configs/train/tiny_cpu.yaml", ["train.precision=fp4"])


def test_fp8_training_tracks_bf16_over_30_steps(tmp_path, capsys, monkeypatch):
    """The tiny model trained 30 steps with train.precision=fp8 (emulated on the CPU: every dense and expert GEMM
    with the recipe's rounding) and with bf16, the settings of tests/test_precision.py's bf16-vs-fp32 run. FP8
    perturbs each GEMM by ~2^-4 sqrt(2/3) = 5 % relative, but a loss averages its 256 tokens and Adam's normalised
    updates do not amplify it: measured max relative gap 5.2e-3 (step 29), 3.3e-5 at step 30, about the size of
    bf16's own gap to fp32 on the same run (5.7e-3). The bound 1.5e-2 is ~3x the measurement."""
    import json

    from mimo_train.config import load_config
    from mimo_train.training.trainer import Trainer

    common = ["train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=4", "train.steps=30",
              "train.lr=1.5e-3", "train.warmup_steps=5", "run.wandb_mode=disabled", "train.async_save=false",
              "data.num_workers=0"]
    losses = {}
    monkeypatch.setattr(fp8, "_emulation_reported", False)
    for precision in ("bf16", "fp8"):
        cfg = load_config("configs/train/tiny_cpu.yaml", [*common, f"train.precision={precision}",
                                                          f"run.dir={tmp_path / precision}"])
        trainer = Trainer(cfg, resume="none")
        trainer.fit()
        trainer.data.close()
        if precision == "fp8":  # fp8 outside the GEMMs is bf16: bf16 parameters, fp32 main gradients and masters
            assert all(p.dtype == torch.bfloat16 and p.main_grad.dtype == torch.float32
                       for p in trainer.model.parameters())
            assert isinstance(trainer.model.model.layers["1"].self_attn.q_proj, fp8.Fp8Linear)
        rows = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
        losses[precision] = [json.loads(r)["lm_loss"] for r in rows]
    assert capsys.readouterr().out.count("emulating the recipe") == 1  # said once in the log
    bf16, f8 = losses["bf16"], losses["fp8"]
    assert f8 != bf16 and f8[-1] < f8[0] - 1.0
    gaps = [abs(a - b) / b for a, b in zip(f8, bf16)]
    print(f"fp8 vs bf16 LM loss over 30 steps: max relative gap {max(gaps):.2e}, last {gaps[-1]:.2e}")
    assert max(gaps) < 1.5e-2


@pytest.mark.parametrize("M,K,N", [(256, 768, 512), (200, 1024, 768)])
def test_cublas_path_builds_valid_calls_on_meta(M, K, N):
    """The GPU code path itself (pad, quantise, lay out the scales, call F.scaled_mm) on meta tensors, for the three
    GEMMs of fp8_linear as its forward and backward form them (200 tokens: the wgrad contraction is padded to whole
    tiles, the output rows to 16): every call passes torch's checks."""
    x, w, dy = (torch.empty(*s, device="meta", dtype=torch.bfloat16) for s in ((M, K), (N, K), (M, N)))
    cases = [(x, w, fp8.TILE, (M, N)), (dy, w.t(), fp8.TILE, (M, K)), (dy.t(), x.t(), 1, (N, K))]
    for a, b, b_rows, shape in cases:
        pa, pb = fp8.cublas_operands(a, b, b_rows)
        qa, sa = quantize_rows(pa)
        qb, sb = quantize_blocks(pb, b_rows)
        out = fp8._scaled_mm_blockwise(qa, sa, qb, sb, torch.bfloat16, b_rows=b_rows)[: a.shape[0]]
        assert out.shape == shape and out.dtype == torch.bfloat16
    assert fp8.cublas_operands(x[:, :100], w[:, :100], fp8.TILE) is None  # K not whole tiles: emulated instead


def test_zero_padding_of_the_token_tiles_changes_nothing():
    """What cublas_operands does to a wgrad contraction, checked with the emulation: identical results."""
    dyt, xt = _heavy_tailed(64, 200, seed=10), _heavy_tailed(96, 200, seed=11)
    pa, pb = fp8.cublas_operands(dyt, xt, 1)
    assert pa.shape == (64, 256) and pb.shape == (96, 256)
    for padded, original in ((pa, dyt), (pb, xt)):  # the same quantised values, zeros after them
        q = round_trip(padded, 1)
        assert torch.equal(q[:, :200], round_trip(original, 1)) and q[:, 200:].eq(0).all()
