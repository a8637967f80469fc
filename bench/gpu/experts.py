"""Section 4: the routed experts (SwiGLU, hidden 4096, width 2048, 16k tokens), forward + backward: `fused`'s
grouped GEMM (`torch._grouped_mm`, device-side offsets) against the reference's per-expert loop, with skewed
routing and empty experts, for 256 experts top-8 (single process) and 32 local experts (one EP8 rank's share).

RESULT experts_<all|local>_<grouped|loop>: time, model TFLOP/s (6 H I per routed row and pass, x3 for fwd+bwd), peak memory;
RESULT experts_<case>_numerics: grouped vs loop (relative), and the largest gradient entry of an empty expert
(must be exactly 0).
"""

from __future__ import annotations

import torch

from bench.gpu.attention_common import attempt
from bench.gpu.harness import Harness, relative_error
from parallel.kernels import get_spec


def skewed_counts(h: Harness, experts: int, rows: int) -> torch.Tensor:
    """Rows per expert: Zipf-like loads, and every fourth expert empty."""
    weights = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 1.2
    weights[3::4] = 0
    counts = torch.floor(weights / weights.sum() * rows).long()
    counts[0] += rows - counts.sum()
    return counts.to(h.device)


def _pair(h: Harness, E: int, H: int, I: int, dtype):
    """The reference loop and the grouped experts with the same weights, made on the device (at full size the two
    modules hold 26 GB of bf16 weights: no host copy)."""
    made = []
    for name in ("torch", "fused"):
        with torch.device("meta"):
            experts = get_spec(name).experts(E, H, I)
        made.append(experts.to_empty(device=h.device).to(dtype))
    loop, grouped = made
    with torch.no_grad():
        g = torch.Generator(device=h.device).manual_seed(0)
        loop.gate_up_proj.normal_(0.0, H**-0.5, generator=g)
        loop.down_proj.normal_(0.0, I**-0.5, generator=g)
    grouped.load_state_dict(loop.state_dict())
    return loop, grouped


def _step(experts, x, counts, dout):
    experts.zero_grad(set_to_none=True)
    leaf = x.detach().clone().requires_grad_()
    y = experts(leaf, counts)
    y.backward(dout)
    return [y.detach(), leaf.grad, experts.gate_up_proj.grad, experts.down_proj.grad]


def run(h: Harness) -> None:
    H, I, tokens, top_k = h.pick(4096, 32), h.pick(2048, 16), h.pick(16384, 64), 8
    dtype = torch.bfloat16 if h.cuda else torch.float32  # the grouped GEMM: bf16 on a GPU, fp32 eager on a CPU
    # all: 256 experts top-8 on one process; local: the 32 experts of one EP8 rank, an eighth of the rows
    cases = {"all": (h.pick(256, 16), tokens * top_k), "local": (h.pick(32, 8), tokens * top_k // 8)}
    for case, (E, rows) in cases.items():
        loop, grouped = _pair(h, E, H, I, dtype)
        counts = skewed_counts(h, E, rows)
        g = torch.Generator(device=h.device).manual_seed(1)
        x = torch.randn(rows, H, device=h.device, dtype=dtype, generator=g)
        dout = torch.randn(rows, H, device=h.device, dtype=dtype, generator=g)
        flops = 3 * 6 * rows * H * I
        outputs = {}
        for kind, experts in (("grouped", grouped), ("loop", loop)):
            run_once = lambda: _step(experts, x, counts, dout)  # noqa: E731
            seconds, status = attempt(h, lambda: h.time(run_once, warmup=1, iters=3))
            peak = attempt(h, lambda: h.peak_memory(run_once))[0] if status == "ok" else None
            if status == "ok":
                outputs[kind] = run_once()
            h.result(f"experts_{case}_{kind}", experts=E, rows=rows, dtype=str(dtype).removeprefix("torch."),
                     status=status, ms=seconds * 1e3 if seconds else None,
                     model_tflops=flops / seconds / 1e12 if seconds and h.cuda else None,
                     peak_mib=peak / 2**20 if peak else None)
        if len(outputs) == 2:
            empty = counts == 0
            got, ref = outputs["grouped"], outputs["loop"]
            empty_grad = max(got[2][empty].abs().max().item(), got[3][empty].abs().max().item())
            names = ("err_out", "err_dx", "err_dgate_up", "err_ddown")
            errs = {n: f"{relative_error(a, b):.1e}" for n, a, b in zip(names, got, ref)}
            h.result(f"experts_{case}_numerics", empty_experts=int(empty.sum().item()), **errs,
                     empty_expert_grad_max=f"{empty_grad:.1e}")
            if h.smoke and (empty_grad != 0 or relative_error(got[0], ref[0]) > 1e-5):
                raise AssertionError(f"experts {case}: grouped differs from the loop or an empty expert has a gradient")
