"""FP8 training GEMMs with DeepSeek-V3-style blockwise scaling (`train.precision: fp8`).

The recipe (MiMo-V2-Flash's report, DeepSeek-V3 section 3.3, Transformer Engine's `Float8BlockScaling`):
- E4M3 for every operand, forward and backward;
- activations and gradients are scaled per 1x128 tile along the contraction dimension of the GEMM they feed;
- weights are scaled per 128x128 block (transpose-invariant, so one quantised copy serves forward and dgrad);
- scales are fp32, by default powers of 2 (TE's default), so scaling itself adds no rounding;
- accumulation in fp32, output in the activation dtype (bf16).

The three GEMMs of `y = x W^T` and the direction of their tiles:
    forward  y  = x  @ W^T   x: 1x128 along K,      W: 128x128
    dgrad    dx = dy @ W     dy: 1x128 along N,     W: 128x128
    wgrad    dW = dy^T @ x   dy and x: 128x1 along the tokens M (1x128 tiles of their transposes)

On a CUDA device whose cuBLAS runs blockwise FP8 (sm90, CUDA >= 12.9 builds) the GEMMs are `F.scaled_mm` with
block scales in cuBLAS's layouts (`block_scale_layout`). Everywhere else they are EMULATED:
quantise, dequantise and multiply in fp32, which reproduces the recipe's rounding of every operand (only the order of
the fp32 accumulation differs from the GPU kernel), so a CPU run trains with the recipe's numerics.

FP8 is applied from outside the model by `convert_to_fp8` (a module swap, as torchao's
`convert_to_float8_training`): the dense GEMMs (q/k/v projections, dense SwiGLU, MTP `eh_proj`) and the routed
experts. The attention output projection, the embedding and the output head stay bf16; the router stays fp32.
Parameters keep their names and stay bf16 with fp32 main gradients and masters: outside these GEMMs fp8 is bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.functional import ScalingType  # torch >= 2.10, with F.scaled_mm

from mimo_train.precision import PRECISIONS

from mimo_train.model.layers import Experts
from parallel.kernels.grouped_experts import GroupedExperts

TILE = 128
E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
# The linears that stay bf16: the fp8 precision's exclusions.
BF16_LINEARS = PRECISIONS["fp8"].fp8_exclusions


# ---- quantisation (plain torch: runs on any device) --------------------------------------------------------------
def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0]))


def _scales_from_amax(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    """Decode scales (fp32) mapping each tile's |max| to at most E4M3's largest value; 1 for a tile of zeros."""
    amax = amax.float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    if pow2:  # round the scale up to a power of 2 so that amax / scale stays <= 448
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def quantize_blocks(x: torch.Tensor, block_rows: int, block_cols: int = TILE, *, pow2: bool = True):
    """Quantise a 2-D tensor to E4M3 in blocks of `block_rows` x `block_cols` (1x128 tiles or 128x128 blocks).

    Returns (values E4M3 [R, C], decode scales fp32 [ceil(R / block_rows), ceil(C / block_cols)]) with
    x ~= values * scale of its block. Shapes that are not multiples of the block are padded with zeros for the
    statistics (a partial tile is scaled by its own elements)."""
    if x.dim() != 2:
        raise ValueError(f"quantize_blocks: expects a 2-D tensor, got shape {tuple(x.shape)}")
    R, C = x.shape
    nr, nc = math.ceil(R / block_rows), math.ceil(C / block_cols)
    # Row-major whatever the input's strides (a transposed operand stays transposed through elementwise ops):
    # cuBLAS takes the values row-major as they are returned here.
    padded = _pad_to(x.float(), nr * block_rows, nc * block_cols).contiguous()
    blocks = padded.view(nr, block_rows, nc, block_cols)
    scale = _scales_from_amax(blocks.abs().amax(dim=(1, 3)), pow2)
    values = (blocks / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return values.view(nr * block_rows, nc * block_cols)[:R, :C].contiguous(), scale


def dequantize_blocks(values: torch.Tensor, scale: torch.Tensor, block_rows: int, block_cols: int = TILE) -> torch.Tensor:
    """The fp32 tensor that (values, scale) encode."""
    R, C = values.shape
    full = scale.repeat_interleave(block_rows, dim=0).repeat_interleave(block_cols, dim=1)[:R, :C]
    return values.float() * full


def quantize_rows(x: torch.Tensor, *, pow2: bool = True):
    """1x128 tiles along the last dimension (activations and gradients)."""
    return quantize_blocks(x, 1, TILE, pow2=pow2)


def quantize_weight(w: torch.Tensor, *, pow2: bool = True):
    """128x128 blocks (weights)."""
    return quantize_blocks(w, TILE, TILE, pow2=pow2)


def round_trip(x: torch.Tensor, block_rows: int, *, pow2: bool = True) -> torch.Tensor:
    """x as the recipe sees it: quantised to E4M3 in blocks and dequantised (fp32)."""
    values, scale = quantize_blocks(x, block_rows, TILE, pow2=pow2)
    return dequantize_blocks(values, scale, block_rows)


# ---- cuBLAS's block-scale layouts ---------------------------------------------------------------------------------
def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def tile_scale_layout(scale: torch.Tensor) -> torch.Tensor:
    """1x128 scales [M, K/128] of the left (or right, for 1x128 x 1x128) operand as cuBLAS reads them: outer-dim
    major, stride (1, M)."""
    return scale.t().contiguous().t()


def block_scale_layout(scale: torch.Tensor) -> torch.Tensor:
    """128x128 scales [N/128, K/128] of the right operand (W, used as W^T [K, N]) as cuBLAS reads them:
    [L4, N/128] with stride (1, L4), L4 = K/128 rounded up to a multiple of 4 (the padding rows are 1)."""
    nb, kb = scale.shape
    padded = torch.ones(nb, _round_up(kb, 4), dtype=torch.float32, device=scale.device)
    padded[:, :kb] = scale
    return padded.t()


# ---- the GEMM: cuBLAS blockwise on sm90, emulated elsewhere -------------------------------------------------------
_blockwise_probe: dict[str, tuple[bool, str]] = {}
_emulation_reported = False


def magnitude_tiles(rows: int, cols: int, *, block_rows: int, device, seed: int) -> torch.Tensor:
    """bf16 Gaussian values scaled by 2^e, e drawn in [-6, 6] for each 1x128 tile (block_rows=1) or 128x128 block
    (block_rows=128): every tile or block gets its own scale, so a scale applied to the wrong one (a wrong layout,
    a transposed or misaligned scale tensor) changes the product by O(1). (All-ones operands, where every tile has
    the same scale, cannot tell.)"""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, device=device)
    e = torch.randint(-6, 7, (math.ceil(rows / block_rows), math.ceil(cols / TILE)), generator=g, device=device)
    factor = torch.exp2(e.float()).repeat_interleave(block_rows, 0).repeat_interleave(TILE, 1)[:rows, :cols]
    return (x * factor).to(torch.bfloat16)


def emulated_mm(a: torch.Tensor, b: torch.Tensor, *, b_rows: int, out_dtype: torch.dtype,
                pow2: bool = True) -> torch.Tensor:
    """The recipe's a @ b^T without an FP8 GEMM: both operands quantised and dequantised, multiplied in fp32."""
    return (round_trip(a, 1, pow2=pow2) @ round_trip(b, b_rows, pow2=pow2).t()).to(out_dtype)


# A blockwise FP8 GEMM and `emulated_mm` multiply the same E4M3 values by the same power-of-2 scales: they differ
# only in accumulation and output rounding. Hopper's FP8 MMA accumulates each 128-element K block with ~14
# significant bits before the fp32 promotion at the block's scale (DeepSeek-V3 section 3.3.2), ~2^-14 sqrt(128) =
# 7e-4 relative on a block sum at worst for random signs, and the bf16 output then rounds a few elements whose fp32
# values straddle a rounding boundary to the neighbouring bf16 value (2^-8 apart). 2e-3 (relative Frobenius) covers
# both; FP8's own quantisation error (E4M3: 2^-4 per element) is ~3e-2, and a scale on the wrong tile is O(1).
EMULATION_REL_TOLERANCE = 2e-3


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in fp32."""
    ref = ref.float()
    return ((got.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def probe_errors(mm, device) -> dict[str, float]:
    """`mm(a, a_scale, b, b_scale, out_dtype, b_rows=...)` (a blockwise GEMM of quantised operands) against
    `emulated_mm`, for both recipes (activation x weight, 1x128 x 128x128; activation x activation, 1x128 x 1x128)
    on 256 x 256 operands whose tiles and blocks have different scales (K/128 = 2 also needs cuBLAS's padded
    128x128 scale layout). Relative errors, to compare with EMULATION_REL_TOLERANCE."""
    a = magnitude_tiles(256, 256, block_rows=1, device=device, seed=0)
    errors = {}
    for name, b_rows in (("1x128_128x128", TILE), ("1x128_1x128", 1)):
        b = magnitude_tiles(256, 256, block_rows=b_rows, device=device, seed=b_rows)
        got = mm(*quantize_rows(a), *quantize_blocks(b, b_rows, TILE), torch.bfloat16, b_rows=b_rows)
        errors[name] = relative_error(got, emulated_mm(a, b, b_rows=b_rows, out_dtype=torch.bfloat16))
    return errors


def blockwise_probe(device: torch.device) -> tuple[bool, str]:
    """(whether this device runs blockwise-scaled FP8 GEMMs that equal the recipe, why not): tried once per device
    (`probe_errors` through cuBLAS)."""
    if device.type != "cuda":
        return False, f"no blockwise FP8 GEMM on {device.type}"
    key = str(device)
    if key not in _blockwise_probe:
        try:
            errors = probe_errors(_scaled_mm_blockwise, device)
            wrong = {k: f"{v:.1e}" for k, v in errors.items() if not v < EMULATION_REL_TOLERANCE}
            _blockwise_probe[key] = (not wrong, "" if not wrong else
                                     f"blockwise scaled_mm differs from the emulated recipe (relative error {wrong}, "
                                     f"bound {EMULATION_REL_TOLERANCE})")
        except (RuntimeError, NotImplementedError, TypeError, AttributeError, ImportError) as exc:
            _blockwise_probe[key] = (False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return _blockwise_probe[key]


def blockwise_supported(device: torch.device) -> bool:
    return blockwise_probe(device)[0]


def _scaled_mm_blockwise(a, a_scale, b, b_scale, out_dtype, *, b_rows: int = TILE) -> torch.Tensor:
    """a [M, K] E4M3 with 1x128 scales [M, K/128]; b [N, K] E4M3 with 128x128 scales [N/128, K/128] (b_rows=128)
    or 1x128 scales [N, K/128] (b_rows=1). Returns a @ b^T in `out_dtype` through cuBLAS."""
    sa = tile_scale_layout(a_scale)
    sb = block_scale_layout(b_scale) if b_rows == TILE else tile_scale_layout(b_scale)
    mat_b = b.t()  # [K, N], column-major as cuBLAS wants
    recipe_b = ScalingType.BlockWise128x128 if b_rows == TILE else ScalingType.BlockWise1x128
    return F.scaled_mm(a, mat_b, sa, ScalingType.BlockWise1x128, sb, recipe_b, output_dtype=out_dtype)


def _note_emulation(device: torch.device) -> None:
    global _emulation_reported
    if not _emulation_reported:
        _emulation_reported = True
        why = "a GEMM shape cuBLAS's blockwise kernel does not take" if device.type == "cuda" else "this device"
        print(f"train.precision=fp8: no blockwise FP8 GEMM for {why} ({device}): emulating the recipe (quantise, "
              "dequantise, multiply in fp32)", flush=True)


def cublas_operands(a: torch.Tensor, b: torch.Tensor, b_rows: int):
    """(a, b) zero-padded to the shapes cuBLAS's blockwise GEMM takes, or None where it cannot run them.

    The contraction dimension must be whole 128-tiles: model dimensions are; token counts (the wgrad contraction)
    are padded with zero rows, which leave every real tile's scale and every product unchanged (a tile of zeros
    has scale 1). Output rows are padded to a multiple of 16 and cut off again by the caller."""
    (M, K), N = a.shape, b.shape[0]
    Kp = _round_up(K, TILE) if b_rows == 1 else K
    if Kp % TILE or N % (TILE if b_rows == TILE else 16):
        return None
    Mp = _round_up(M, 16)
    if (Mp, Kp) != (M, K):
        a = F.pad(a, (0, Kp - K, 0, Mp - M))
    if Kp != K:
        b = F.pad(b, (0, Kp - K))
    return a, b


def blockwise_mm(a: torch.Tensor, b: torch.Tensor, *, b_rows: int, out_dtype: torch.dtype,
                 pow2: bool = True) -> torch.Tensor:
    """a @ b^T with the recipe: a [M, K] in 1x128 tiles along K, b [N, K] in 128x128 blocks (b_rows=128, a weight)
    or 1x128 tiles along K (b_rows=1, an activation). fp32 accumulation, `out_dtype` result."""
    operands = cublas_operands(a, b, b_rows) if blockwise_supported(a.device) else None
    if operands is not None:
        pa, pb = operands
        out = _scaled_mm_blockwise(*quantize_rows(pa, pow2=pow2), *quantize_blocks(pb, b_rows, TILE, pow2=pow2),
                                   out_dtype, b_rows=b_rows)
        return out[: a.shape[0]]
    _note_emulation(a.device)
    return emulated_mm(a, b, b_rows=b_rows, out_dtype=out_dtype, pow2=pow2)


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T with all three GEMMs in FP8 (forward, dgrad, wgrad), tiles as in the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        shape = x.shape
        y = blockwise_mm(x.reshape(-1, shape[-1]), weight, b_rows=TILE, out_dtype=x.dtype)
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x.dtype)
        dx = wgrad = None
        if ctx.needs_input_grad[0]:  # dgrad: dy [M, N] (1x128 along N) @ W [N, K] (the same 128x128 blocks)
            dx = blockwise_mm(dy2, weight.t(), b_rows=TILE, out_dtype=x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:  # wgrad: dy^T [N, M] @ x [M, K], both in 1x128 tiles along the tokens M
            wgrad = blockwise_mm(dy2.t(), x2.t(), b_rows=1, out_dtype=weight.dtype)
        return dx, wgrad


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias) with the blockwise FP8 recipe in forward and backward."""
    return _Fp8Linear.apply(x, weight)


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped `x @ w[e]^T` in FP8: x [N, K] rows grouped by expert, w [E, N_out, K] (the stored expert layout),
    offs int32 [E] cumulative row ends. Returns [N, N_out]; rows past offs[-1] are zeros, and an expert with no
    rows gets an exactly-zero weight gradient.

    Each group is one blockwise GEMM (its token tiles start at the group's first row, as a grouped kernel's
    would): cuBLAS has no blockwise grouped GEMM on sm90 (`_scaled_grouped_mm` scales rowwise or MX only), so this
    loops over the experts with one host read of the offsets."""
    if offs.dtype != torch.int32 or offs.dim() != 1 or offs.shape[0] != w.shape[0]:
        raise ValueError(f"fp8_grouped_mm: offs must be int32 [{w.shape[0]}] cumulative row ends, "
                         f"got {offs.dtype} {tuple(offs.shape)}")
    ends = offs.tolist()
    outputs, start = [], 0
    for e, end in enumerate(ends):
        if end > start:
            outputs.append(fp8_linear(x[start:end], w[e]))
        start = end
    tail = x.shape[0] - start
    outputs.append(x.new_zeros(tail, w.shape[1]) + 0 * x.sum())  # keeps x in the graph even with no rows at all
    return torch.cat(outputs, dim=0)


# ---- applying the recipe to a model -------------------------------------------------------------------------------
class Fp8Linear(nn.Linear):
    """An nn.Linear whose GEMMs are blockwise FP8 (same parameter `weight`). Wrappers that take a linear
    (tensor-parallel layers) read `linear_function` to keep its matmul."""

    linear_function = staticmethod(fp8_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            return fp8_linear(x, self.weight) + self.bias
        return fp8_linear(x, self.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight  # the same Parameter: names, initialisation and optimizer state are unchanged
        new.bias = linear.bias
        return new


def fp8_experts(experts: nn.Module) -> nn.Module:
    """The routed experts of any layer spec as grouped experts whose two GEMMs are `fp8_grouped_mm`; the same
    Parameters (names, initialisation and optimizer state unchanged)."""
    new = GroupedExperts.__new__(GroupedExperts)
    nn.Module.__init__(new)
    new.gate_up_proj, new.down_proj = experts.gate_up_proj, experts.down_proj
    new.gemm = fp8_grouped_mm
    return new


def fp8_linear_filter(name: str, module: nn.Module) -> bool:
    """Which linears get FP8: every nn.Linear but the attention output projection and the output head (the
    router is not an nn.Linear: it keeps its fp32 matmul)."""
    return type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in BF16_LINEARS


def convert_to_fp8(model: nn.Module, *, experts: bool = True) -> list[str]:
    """Swap the chosen linears for `Fp8Linear` and the routed experts for FP8 grouped experts, in place (before
    tensor/expert parallelism wraps them). Returns the names of the converted modules."""
    converted = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if fp8_linear_filter(full, child):
                setattr(parent, child_name, Fp8Linear.from_linear(child))
                converted.append(full)
            elif experts and isinstance(child, Experts) and getattr(child, "gemm", None) is not fp8_grouped_mm:
                setattr(parent, child_name, fp8_experts(child))
                converted.append(full)
    return converted
