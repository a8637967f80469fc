"""Which kernels run, decided here and nowhere else.

- Before sharding, by `parallel.backend` and `train.precision`: the module swaps (`swap_modules`: TE's modules
  for `te`, with FP8 through TE's autocast; the FP8 linears and experts of `fp8.py` otherwise). The layer spec
  itself is named by `parallel.backend` (`parallel.kernels.get_spec`).
- At call time, by the tensors an attention core of the `fused` spec is given (device and dtype): `sliding_kernel`
  and `global_kernel` name the kernel, and the core runs it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

# Which kernel the global core uses on a GPU; "flex" until bench/gpu/global_attention has measured the others.
GPU_GLOBAL_KERNEL = "flex"
HALF = (torch.bfloat16, torch.float16)
# `mimo-train simulate` runs the GPU path on fake host tensors (the flash / efficient ops have meta kernels):
# while set, every tensor counts as a GPU one. Flex cannot run there (its eager backward refuses host tensors, its
# compiled one needs a GPU), so the global core takes the flash kernel instead.
_SIMULATED_GPU = False


@contextlib.contextmanager
def simulated_gpu():
    global _SIMULATED_GPU
    before, _SIMULATED_GPU = _SIMULATED_GPU, True
    try:
        yield
    finally:
        _SIMULATED_GPU = before


def on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda or _SIMULATED_GPU


def sliding_kernel(q: torch.Tensor) -> str:
    """The kernel of a `fused` sliding-window core for queries `q`: "flash_varlen" (GPU, bf16/fp16), "reference"
    (fp32 on a GPU: the flash kernel has no fp32 path) or "cpu_blocked" (the CPU flash kernel on query blocks)."""
    if on_gpu(q):
        return "flash_varlen" if q.dtype in HALF else "reference"
    return "cpu_blocked"


def global_kernel(q: torch.Tensor) -> str:
    """The kernel of a `fused` global core for queries `q`: on a GPU, GPU_GLOBAL_KERNEL ("flex"), or
    "flash_varlen" where it is chosen (or simulated) and `q` is bf16/fp16; "cpu_flash" on a CPU."""
    if not on_gpu(q):
        return "cpu_flash"
    if (GPU_GLOBAL_KERNEL == "flash" or _SIMULATED_GPU) and q.dtype in HALF:
        return "flash_varlen"
    return "flex"


def swap_modules(model: nn.Module, backend: str, fp8: bool) -> None:
    """The module swaps of `backend` and FP8, in place, before sharding (the tensor-parallel wrappers keep the
    matmul of the linears they wrap). The Parameters stay the same: names, initialisation and optimizer state."""
    if backend == "te":  # TE's linears (FP8 through TE's autocast)
        from parallel.kernels.te import convert_to_te  # imports Transformer Engine only when chosen
        convert_to_te(model, fp8=fp8)
    elif fp8:
        from parallel.kernels.fp8 import convert_to_fp8
        convert_to_fp8(model)
