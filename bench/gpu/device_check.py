"""`python -m bench.gpu.device_check --out DIR`: what the GPU machine offers, checked before any test or benchmark
runs there, written to DIR/env.json and printed one line per check.

Checks: CUDA and the device (name, compute capability: sm90 for blockwise FP8 and the flash kernels used here),
free GPU memory (another process's allocations would turn the 32k cases into out-of-memory artefacts), and what
Triton needs at run time to build a kernel's launcher: a C compiler (`$CC`, else gcc, else clang, Triton's order)
and Python's headers (`Python.h`). Every flex_attention layer (the `fused` global core) is a Triton kernel, so
without them each of those fails. The proof is a tiny Triton kernel compiled and launched here. Exit status: 0
when everything needed is there, 1 when something is missing (named on stdout and in env.json), 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import torch

MIN_CAPABILITY = (9, 0)  # blockwise FP8 through cuBLAS and the kernels the `fused` spec picks are sm90 paths
MIN_FREE_GIB = 100.0  # the largest case (a 32k MoE layer, weights and activations) needs about 70 GiB


def c_compiler() -> str | None:
    """The compiler Triton would use to build a launcher (its own search order)."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")


def python_header() -> Path:
    """Where Triton looks for Python.h (the include directory of the running interpreter's install scheme)."""
    scheme = sysconfig.get_default_scheme()
    scheme = "posix_prefix" if scheme == "posix_local" else scheme
    return Path(sysconfig.get_paths(scheme=scheme)["include"]) / "Python.h"


def triton_probe(device: torch.device) -> str:
    """"ok" when a Triton kernel compiles, builds its launcher and computes the right answer, else the error."""
    try:
        import triton
        import triton.language as tl
    except ImportError as exc:
        return f"triton does not import: {exc}"

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1.0, mask=mask)

    try:
        x = torch.zeros(1000, device=device)
        add_one[(triton.cdiv(1000, 256),)](x, 1000, BLOCK=256)
        torch.cuda.synchronize(device)
        return "ok" if bool((x == 1).all()) else "wrong result"
    except Exception as exc:  # noqa: BLE001 - the reason is the report
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def checks() -> tuple[dict, list[str]]:
    """(everything found, what is missing)."""
    found = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
             "c_compiler": c_compiler(), "python_h": str(python_header()),
             "python_h_exists": python_header().is_file()}
    missing = []
    if not found["c_compiler"]:
        missing.append("a C compiler (CC, gcc or clang) for Triton's launchers: flex_attention cannot run")
    if not found["python_h_exists"]:
        missing.append(f"Python.h ({found['python_h']}) for Triton's launchers: flex_attention cannot run")
    if not torch.cuda.is_available():
        return found, [*missing, "CUDA"]
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    free, total = torch.cuda.mem_get_info(device)
    found.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                 free_gib=round(free / 2**30, 1), total_gib=round(total / 2**30, 1), triton=triton_probe(device))
    if (props.major, props.minor) < MIN_CAPABILITY:
        missing.append(f"compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (got {found['capability']})")
    if found["free_gib"] < MIN_FREE_GIB:
        missing.append(f"{MIN_FREE_GIB:.0f} GiB of free GPU memory (got {found['free_gib']} GiB)")
    if found["triton"] != "ok":
        missing.append(f"a working Triton kernel build: {found['triton']}")
    return found, missing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu.device_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for env.json")
    args = ap.parse_args(argv)
    found, missing = checks()
    for key, value in found.items():
        print(f"device_check: {key} = {value}", flush=True)
    for what in missing:
        print(f"device_check: MISSING {what}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "env.json").write_text(json.dumps({**found, "missing": missing}, indent=2))
    if not torch.cuda.is_available():
        return 2
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
