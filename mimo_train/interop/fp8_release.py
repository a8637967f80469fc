"""The released MiMo-V2-Flash checkpoint's FP8 format: which tensors it quantises, how, and how it says so.

The release stores most linear weights as E4M3 values with one fp32 `<name>_scale_inv` per 128x128 block (the
blocks at the right and bottom edges are partial), DeepSeek-V3's convention: the weight is `value * scale_inv`
of its block. `config.json` declares it with `quantization_config` (`quant_method: fp8`, `weight_block_size`).

What stays in bf16 follows the model report's FP8 recipe (attention output projection, embedding and output head
in bf16, the router in fp32) and what inference stacks do with the released files (they find no scale for
`o_proj`, which the release lists as not converted): every `o_proj`, the embedding, `lm_head`, the router
`mlp.gate`, the norms, the correction biases and the sinks. The q/k/v projections, the dense FFN and every
expert's gate/up/down, and the MTP blocks' projections carry scales.
"""

from __future__ import annotations

import math
import re

import torch

from parallel.kernels.fp8 import E4M3, dequantize_blocks, quantize_blocks

BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"  # `x.weight` -> `x.weight_scale_inv`
# Hub names of the weights the release quantises (everything else is bf16 without a scale).
_QUANTISED = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj|down_proj|eh_proj)\.weight$")


class Fp8FormatError(ValueError):
    """A checkpoint's FP8 declaration or tensors this reader does not understand (the message says which)."""


def quantised_in_release(hub_name: str) -> bool:
    return bool(_QUANTISED.search(hub_name))


def check_quantization_config(qc: dict | None, where: str) -> tuple[int, int] | None:
    """The block size of a `quantization_config` this importer reads (None when the checkpoint is not quantised);
    anything else is one clear error naming the field."""
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "fp8":
        raise Fp8FormatError(f"{where}: quantization_config.quant_method {method!r} is not supported (only 'fp8', "
                             f"E4M3 with 128x128 block scales; dequantise it to bf16 first)")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise Fp8FormatError(f"{where}: quantization_config.fmt {fmt!r} is not supported (only 'e4m3')")
    block = qc.get("weight_block_size")
    if block is None or list(block) != list(BLOCK):
        raise Fp8FormatError(f"{where}: quantization_config.weight_block_size {block!r} is not supported "
                             f"(only {list(BLOCK)}: one scale per 128x128 block)")
    if qc.get("scale_fmt", "float") != "float":
        raise Fp8FormatError(f"{where}: quantization_config.scale_fmt {qc['scale_fmt']!r} is not supported "
                             f"(only 'float': fp32 scales)")
    return tuple(block)


def release_quantization_config(not_converted: list[str]) -> dict:
    """What an fp8 export declares: the release's fields, with the bf16 linears named (the list inference
    engines read as `ignored_layers`; transformers reads the same key as `modules_to_not_convert`)."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(BLOCK), "ignored_layers": sorted(not_converted)}


def scale_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    rows, cols = shape
    return math.ceil(rows / BLOCK[0]), math.ceil(cols / BLOCK[1])


def dequantize(values: torch.Tensor, scale_inv: torch.Tensor, name: str) -> torch.Tensor:
    """fp32 `value * scale_inv` of each block; the shapes are checked so that a wrong file fails by name."""
    if values.dtype != E4M3:
        raise Fp8FormatError(f"{name}: has a {name}{SCALE_SUFFIX} but dtype {values.dtype} (expected float8_e4m3fn)")
    if values.dim() != 2 or tuple(scale_inv.shape) != scale_shape(values.shape):
        raise Fp8FormatError(f"{name}: scale shape {tuple(scale_inv.shape)} does not match 128x128 blocks of "
                             f"{tuple(values.shape)} (expected {scale_shape(values.shape) if values.dim() == 2 else '2-D'})")
    return dequantize_blocks(values, scale_inv.float(), *BLOCK)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 values, fp32 scale_inv) with each block's |max| mapped to 448 (the scale is amax / 448, not rounded to
    a power of two: the release's scales are arbitrary fp32)."""
    return quantize_blocks(weight, *BLOCK, pow2=False)
