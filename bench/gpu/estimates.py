"""How long each part of the device run should take on one H200, printed before the part starts and used to
budget the run (bench/gpu/device_run.py). Estimates, not measurements: no part has been timed on a GPU yet.

Each estimate is `fixed + compiles x COMPILE_S + TFLOP / (ASSUMED_EFFICIENCY x PEAK)`:
- PEAK: the H200's dense bf16 datasheet rate (mimo_train/hardware.py); ASSUMED_EFFICIENCY 25 %, half the planner's assumed
  50 %, since none of these kernels has been measured (the reference kernels are slower than the fused ones).
- COMPILE_S per torch.compile'd flex_attention graph (forward + backward, Inductor and Triton from a cold cache
  on 16 cores); the only compiled code of the run.
- fixed: a new Python process (torch import, CUDA context, cuBLAS handles: PROCESS_S), building weights on the
  device, Python-side loops; a conservative round figure per part.
- TFLOP: the model FLOPs of every call a section makes (timed, warm-up, peak-memory and numerics calls),
  counted from the shapes in each section's module (comments below).
"""

from __future__ import annotations

from mimo_train.hardware import GPUS

PEAK_TFLOPS = GPUS["h200"].peak_tflops
ASSUMED_EFFICIENCY = 0.25
COMPILE_S = 20.0
PROCESS_S = 15.0


def seconds(*, fixed: float, compiles: int = 0, tflop: float = 0.0) -> int:
    return round(fixed + compiles * COMPILE_S + tflop / (ASSUMED_EFFICIENCY * PEAK_TFLOPS))


# Per section of `python -m bench.gpu` (a process of its own adds PROCESS_S).
BENCH_SECTION_SECONDS = {
    # a 128-element blockwise FP8 probe: nothing to count
    "env": seconds(fixed=5),
    # S = 32k: the SDPA band-mask baseline computes all S^2 scores, 3*2*64*32768^2*320 = 132 TFLOP per fwd+bwd,
    # 6 calls; the windowed candidates are 0.5 TFLOP per call
    "swa": seconds(fixed=10, tflop=6 * 132 + 30),
    # S = 32k: the reference (full S^2 with a mask) 132 TFLOP per call, four causal candidates 66 TFLOP, 6 calls
    # each; flex compiled for S = 4k and 32k
    "global_attention": seconds(fixed=10, compiles=2, tflop=6 * 132 + 4 * 6 * 66),
    # 3*6*131072*4096*2048 = 19.8 TFLOP per call of the 256-expert case, 2 kinds x 6 calls, the local case 1/8
    "experts": seconds(fixed=15, tflop=2 * 6 * 19.8 * 1.125),
    # sum of N*K over the 11 GEMMs = 359M; 6*16384*359M = 35 TFLOP per candidate and pass; 2 candidates x 8 calls;
    # the FP8 quantisation is memory-bound eager code (in `fixed`)
    "gemm": seconds(fixed=20, tflop=2 * 8 * 35),
    # per fwd+bwd: GA+MoE 116 TFLOP (attention 66, experts 40, projections 10), SWA+MoE 50; 4 cases x 4 calls
    # each, selective recompute adds a third; flex compiled for the 32k GA layer
    "layer": seconds(fixed=15, compiles=1, tflop=4 * 4 * (116 + 50) * 1.17),
    # ~20 TFLOP per step (head and MTP head 2 x 7.7 over the 152k vocabulary, 4 layers), 2 x 20 steps; flex
    # compiled for the GA layer at 4k
    "train": seconds(fixed=15, compiles=1, tflop=40 * 20),
}

# The parts of the device run, in order.
PART_SECONDS = {
    # a process, and one tiny Triton kernel compiled and launched (its launcher is built with the C compiler)
    "env": seconds(fixed=PROCESS_S + 5),
    # small shapes; flex compiled for the whole micro-batch and a chunk, for the core and the flex candidate
    "tests_kernels": seconds(fixed=PROCESS_S + 10, compiles=4),
    # tiny-model runs of 2 steps: the CPU fp32 reference, bf16, fused (flex compiled for its GA layers, twice:
    # bf16 and fp8 runs), two fake-process-group layouts
    "tests_training": seconds(fixed=PROCESS_S + 20, compiles=2),
    "bench": round(PROCESS_S + sum(BENCH_SECTION_SECONDS.values())),
}
