"""Section 1: the environment: torch, CUDA, cuDNN and Triton versions, the GPU and its SM count, and whether
blockwise FP8 runs and equals the recipe (parallel/kernels/fp8.py's probe: both blockwise recipes through cuBLAS on 256 x 256
operands whose tiles and blocks each have their own scale, against the emulated recipe)."""

from __future__ import annotations

import platform

import torch

from bench.gpu.harness import Harness
from parallel.kernels import fp8


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _torchao_version() -> str | None:
    try:
        import torchao
    except (ImportError, RuntimeError, OSError):
        return None
    return torchao.__version__


def run(h: Harness) -> None:
    fields = {
        "python": platform.python_version(),
        "torch": torch.__version__.replace(" ", ""),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _triton_version(),
        "torchao": _torchao_version(),
        "scaled_mm_api": "F.scaled_mm" if hasattr(torch.nn.functional, "scaled_mm") else "torch._scaled_mm",
    }
    if h.cuda:
        props = torch.cuda.get_device_properties(h.device)
        fields.update(gpu=props.name.replace(" ", "_"), sm=f"{props.major}.{props.minor}",
                      sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    else:
        fields.update(gpu="none", sm=None, sm_count=None, memory_gib=None)
    ok, why_not = fp8.blockwise_probe(h.device)
    fields["blockwise_fp8"] = ok
    h.result("env", **fields)
    if not ok:
        print(f"blockwise FP8: {why_not}", flush=True)
