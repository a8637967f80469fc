"""The GPU fast paths against the references on the same GPU, same weights and inputs: the `fused` spec's SWA + sink
core (flash varlen with a window, V padded to 192, the sink folded into the lse), every global-attention candidate,
the grouped experts and the blockwise FP8 GEMMs against their emulation (training runs: test_gpu_training.py).

Deselected without CUDA (tests/gpu/conftest.py). Nothing here has run on a GPU yet: no GPU was lent to the
session that wrote it.

Tolerances. A fused bf16 kernel against the fp32 reference on the same bf16 inputs differs by the kernel's own
roundings: bf16 keeps 8 significant bits (unit roundoff u = 2^-8 = 3.9e-3); flash/efficient/flex round the
probabilities to bf16 before P @ V, the output to bf16, and in the backward dP and dS; a SwiGLU expert rounds its
two GEMM outputs and the gated product. Each rounding is a relative error <= u per element and ~u / sqrt(3) = 2.3e-3
in relative Frobenius norm, random in sign, so a handful of them in sequence stay ~5e-3; 2e-2 (`BF16_REL`) leaves
~4x while an indexing or masking error (a key of another document, a mis-paired document, a lost sink) gives
O(1e-1) or more. Measured on the CPU at the SWA test's shapes: the CPU flash kernel in bf16 is 2.5e-3 (out, dq) to
4.9e-3 (dk, dv) from the fp32 reference, and a window one key too wide or too narrow moves out/dq/dk/dv of the fp32
reference by 4.2e-2 to 4.5e-2, so the bound also catches an off-by-one window. FP8 on the GPU against its emulation (the same quantised operands multiplied
in fp32): see `FP8_REL`.
"""

from __future__ import annotations

import math

import pytest
import torch

from parallel.kernels import fp8
from parallel.kernels import choice, get_spec
from parallel.kernels.flex import flex_sink_attention
from parallel.kernels.grouped_experts import GroupedExperts, group_offsets, grouped_mm
from mimo_train.model.kernels.metadata import AttentionMetadata, document_ids
from parallel.kernels.sink_attention import efficient_varlen_attention, flash_varlen_attention

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
BF16_REL = 2e-2
# The GPU's blockwise FP8 GEMM against its emulation (the same quantised operands multiplied in fp32): they differ
# only in accumulation and output rounding (parallel/kernels/fp8.py: EMULATION_REL_TOLERANCE says why 2e-3).
FP8_REL = fp8.EMULATION_REL_TOLERANCE
REFERENCE, FUSED = get_spec("torch"), get_spec("fused")
SWA, GLOBAL = "sliding_attention", "full_attention"


@pytest.fixture(autouse=True)
def exact_fp32_references():
    """The fp32 references must be fp32, not TF32 (10 significant bits), whatever another test set."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against the reference b (in fp32)."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _assert_rel(got, ref, names, what, bound):
    for name, a, b in zip(names, got, ref):
        assert a.shape == b.shape, (what, name, a.shape, b.shape)
        assert torch.isfinite(a).all(), (what, name, "non-finite values")
        err = _rel(a, b)
        print(f"{what} {name}: relative Frobenius error {err:.2e}")
        assert err < bound, (what, name, err)


# ---- attention ------------------------------------------------------------------------------------------------
def _positions(rows: list[list[tuple[int, int]]]) -> torch.Tensor:
    """Rows of packed documents, each (first position, length): first position 0 starts a document, > 0 continues
    one that began before the row (a row that starts mid-document)."""
    return torch.stack([torch.cat([torch.arange(p0, p0 + n) for p0, n in row]) for row in rows])


# S = 512. Row 0: documents of 200, 60 (shorter than the window) and 252 tokens; the second and third start
# mid-window of the one before (window 128). Row 1 starts mid-document (positions 300..399), then 300 and 112.
POSITIONS = _positions([[(0, 200), (0, 60), (0, 252)], [(300, 100), (0, 300), (0, 112)]])
HQ, QK_DIM, V_DIM, WINDOW = 8, 192, 128, 128
SCALE = QK_DIM ** -0.5


def _metadata(spec, positions: torch.Tensor) -> AttentionMetadata:
    """The micro-batch's metadata with the tight document bound the data stream hands the model (the largest
    document id + 1, tests/test_fused_kernels.py checks the stream gives it)."""
    docs = document_ids(positions).to(CUDA)
    B, S = docs.shape
    return spec.metadata(docs, B, S, CUDA, max_documents=int(docs.max()) + 1)


def _inputs(B, S, Hkv, *, sink: bool, seed: int):
    """bf16 q, k, v (and a sink, shifted up so that it takes a real share of the softmax) and an output gradient."""
    g = torch.Generator(device=CUDA).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=CUDA).to(torch.bfloat16)

    q, k, v = randn(B, S, HQ, QK_DIM), randn(B, S, Hkv, QK_DIM), randn(B, S, Hkv, V_DIM)
    dout = randn(B, S, HQ, V_DIM)
    s = (randn(HQ).float() + 2.0).to(torch.bfloat16) if sink else None
    return q, k, v, s, dout


def _forward_backward(call, q, k, v, sink, dout, dtype):
    """call(q, k, v, sink) on leaves of `dtype` (copies of the same bf16 values); [out, dq, dk, dv(, dsink)]."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    s = sink.detach().to(dtype).requires_grad_() if sink is not None else None
    out = call(*leaves, s)
    (out.float() * dout.float()).sum().backward()
    return [out, *(t.grad for t in leaves), *([s.grad] if s is not None else [])]


def test_swa_sink_core_flash_varlen_matches_fp32_reference_whole_and_chunk(monkeypatch):
    """The fused SWA + sink core in bf16 (the flash varlen kernel: it must be the one that runs) against the torch
    spec's core in fp32 on the same bf16 values, forward and backward, on the whole micro-batch and on a
    context-parallel chunk [start - W, end) whose metadata is a slice of the micro-batch's."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return flash_varlen_attention(*args, **kwargs)

    monkeypatch.setattr(fused, "flash_varlen_attention", spy)
    B, S = POSITIONS.shape
    q, k, v, sink, dout = _inputs(B, S, 2, sink=True, seed=0)
    fused_meta, ref_meta = _metadata(FUSED, POSITIONS), _metadata(REFERENCE, POSITIONS)
    fused_core, ref_core = (spec.attention_core(SWA, window_keys=WINDOW, scale=SCALE) for spec in (FUSED, REFERENCE))
    names = ["out", "dq", "dk", "dv", "dsink"]

    got = _forward_backward(lambda *t: fused_core(*t[:3], fused_meta, sink=t[3]), q, k, v, sink, dout,
                            torch.bfloat16)
    ref = _forward_backward(lambda *t: ref_core(*t[:3], ref_meta, sink=t[3]), q, k, v, sink, dout, torch.float32)
    assert calls, "the fused SWA core did not run the flash varlen kernel"
    assert got[0].dtype == torch.bfloat16 and got[4].dtype == torch.bfloat16
    _assert_rel(got, ref, names, "swa whole", BF16_REL)
    assert ref[4].abs().min() > 0  # the sink gradient is really exercised

    W = WINDOW - 1
    start, end = 256, 384
    chunk = [t[:, start - W:end] for t in (q, k, v)]
    chunk_dout = dout[:, start - W:end]
    f_slice, r_slice = fused_meta.slice(start - W, end), ref_meta.slice(start - W, end)
    got = _forward_backward(lambda *t: fused_core(*t[:3], f_slice, sink=t[3]), *chunk, sink, chunk_dout,
                            torch.bfloat16)
    ref_chunk = _forward_backward(lambda *t: ref_core(*t[:3], r_slice, sink=t[3]), *chunk, sink, chunk_dout,
                                  torch.float32)
    _assert_rel(got, ref_chunk, names, "swa chunk", BF16_REL)
    # the chunk's own L queries see their whole window inside the chunk: they equal the whole sequence's outputs
    _assert_rel([got[0][:, W:]], [ref[0][:, start:end]], ["out"], "swa chunk vs whole", BF16_REL)


def _global_candidates():
    """Every kernel the fused global core may use on a GPU: the core itself (GPU_GLOBAL_KERNEL) and each candidate
    function, all called (q, k, v, meta, q_start)."""
    core = FUSED.attention_core(GLOBAL, window_keys=0, scale=SCALE)
    return {
        f"core ({choice.GPU_GLOBAL_KERNEL})": lambda q, k, v, meta, q_start: core.at(q, k, v, meta, q_start=q_start),
        "flex": lambda q, k, v, meta, q_start: flex_sink_attention(q, k, v, meta, scale=SCALE, q_start=q_start),
        "flash_varlen": lambda q, k, v, meta, q_start: flash_varlen_attention(q, k, v, meta, scale=SCALE,
                                                                              q_start=q_start),
        "efficient_varlen": lambda q, k, v, meta, q_start: efficient_varlen_attention(q, k, v, meta, scale=SCALE,
                                                                                      q_start=q_start),
    }


@pytest.mark.parametrize("kernel", ["core", "flex", "flash_varlen", "efficient_varlen"])
def test_global_core_candidates_match_fp32_reference_whole_and_chunk(kernel):
    """Causal + documents, 8 query / 4 KV heads, QK 192 / V 128, in bf16 against the torch spec's global core in
    fp32: the whole micro-batch, and queries [q_start, end) over keys [0, end) (context parallelism's chunk)."""
    candidates = _global_candidates()
    name = next(n for n in candidates if n.split(" ")[0] == kernel)
    call = candidates[name]
    B, S = POSITIONS.shape
    q, k, v, _, dout = _inputs(B, S, 4, sink=False, seed=1)
    fused_meta, ref_meta = _metadata(FUSED, POSITIONS), _metadata(REFERENCE, POSITIONS)
    ref_core = REFERENCE.attention_core(GLOBAL, window_keys=0, scale=SCALE)
    names = ["out", "dq", "dk", "dv"]

    got = _forward_backward(lambda q, k, v, s: call(q, k, v, fused_meta, 0), q, k, v, None, dout, torch.bfloat16)
    ref = _forward_backward(lambda q, k, v, s: ref_core(q, k, v, ref_meta), q, k, v, None, dout, torch.float32)
    assert got[0].dtype == torch.bfloat16
    _assert_rel(got, ref, names, f"global {name}", BF16_REL)

    q_start, end = 180, 448  # the chunk starts inside row 0's first document and row 1's second
    args = (q[:, q_start:end], k[:, :end], v[:, :end])
    f_keys, r_keys = fused_meta.slice(0, end), ref_meta.slice(0, end)
    got = _forward_backward(lambda q, k, v, s: call(q, k, v, f_keys, q_start), *args, None, dout[:, q_start:end],
                            torch.bfloat16)
    ref = _forward_backward(lambda q, k, v, s: ref_core.at(q, k, v, r_keys, q_start=q_start), *args, None,
                            dout[:, q_start:end], torch.float32)
    _assert_rel(got, ref, names, f"global {name} chunk", BF16_REL)


# ---- grouped experts ------------------------------------------------------------------------------------------
COUNTS = [37, 0, 130, 5, 0, 77, 0, 1]  # uneven groups; empty experts between non-empty ones and next to last
HIDDEN, EXPERT_DIM = 256, 128


def _expert_weights(E, seed=2):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    gate_up = (torch.randn(E, 2 * EXPERT_DIM, HIDDEN, generator=g, device=CUDA) / math.sqrt(HIDDEN))
    down = (torch.randn(E, HIDDEN, EXPERT_DIM, generator=g, device=CUDA) / math.sqrt(EXPERT_DIM))
    return gate_up.to(torch.bfloat16), down.to(torch.bfloat16)


def test_grouped_experts_bf16_match_the_fp32_loop_with_empty_and_uneven_groups():
    """GroupedExperts (torch._grouped_mm) in bf16 against the reference spec's per-expert loop in fp32 on the same
    bf16 weights and rows: output, input and weight gradients; an empty expert's gradients are exactly zero."""
    E = len(COUNTS)
    gate_up, down = _expert_weights(E)
    g = torch.Generator(device=CUDA).manual_seed(3)
    x = torch.randn(sum(COUNTS), HIDDEN, generator=g, device=CUDA).to(torch.bfloat16)
    dy = torch.randn(sum(COUNTS), HIDDEN, generator=g, device=CUDA).to(torch.bfloat16)
    results = []
    for spec, dtype in ((FUSED, torch.bfloat16), (REFERENCE, torch.float32)):
        experts = spec.experts(E, HIDDEN, EXPERT_DIM).to(device=CUDA, dtype=dtype)
        with torch.no_grad():
            experts.gate_up_proj.copy_(gate_up)
            experts.down_proj.copy_(down)
        leaf = x.detach().to(dtype).requires_grad_()  # a new leaf, also where dtype is x's own
        # the model hands the counts as a device tensor
        y = experts(leaf, torch.tensor(COUNTS, device=CUDA))
        (y.float() * dy.float()).sum().backward()
        results.append((experts, [y, leaf.grad, experts.gate_up_proj.grad, experts.down_proj.grad]))
    (grouped, got), (_, ref) = results
    assert isinstance(grouped, GroupedExperts) and got[0].dtype == torch.bfloat16
    _assert_rel(got, ref, ["out", "dx", "dgate_up", "ddown"], "grouped experts", BF16_REL)
    for e, n in enumerate(COUNTS):
        grads = (grouped.gate_up_proj.grad[e], grouped.down_proj.grad[e])
        if n == 0:  # exactly zero, not merely small (and no NaN)
            assert all(not grad.any() for grad in grads), e
        else:
            assert all(grad.any() for grad in grads), e
            assert _rel(grouped.gate_up_proj.grad[e], ref[2][e]) < BF16_REL, e


def test_grouped_mm_bf16_zeroes_rows_past_the_last_offset_and_empty_groups():
    E = len(COUNTS)
    w = _expert_weights(E)[0].requires_grad_()
    g = torch.Generator(device=CUDA).manual_seed(4)
    n, tail = sum(COUNTS), 6
    x = torch.randn(n + tail, HIDDEN, generator=g, device=CUDA).to(torch.bfloat16).requires_grad_()
    offs = group_offsets(torch.tensor(COUNTS, device=CUDA), CUDA)
    assert offs.dtype == torch.int32 and offs.tolist()[-1] == n
    y = grouped_mm(x, w, offs)
    dy = torch.randn(y.shape, generator=g, device=CUDA).to(torch.bfloat16)
    y.backward(dy)
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    assert not y[n:].any() and not x.grad[n:].any()
    xs, dys = x.detach().float(), dy.float()
    start, loop, dx_loop = 0, [], []
    for e, count in enumerate(COUNTS):
        we = w.detach()[e].float()
        if count == 0:
            assert not w.grad[e].any(), e
            continue
        loop.append(xs[start:start + count] @ we.t())
        dx_loop.append(dys[start:start + count] @ we)
        assert _rel(w.grad[e], dys[start:start + count].t() @ xs[start:start + count]) < BF16_REL, e
        start += count
    _assert_rel([y[:n], x.grad[:n]], [torch.cat(loop), torch.cat(dx_loop)], ["out", "dx"], "grouped_mm", BF16_REL)


# ---- FP8 --------------------------------------------------------------------------------------------------------
def test_blockwise_fp8_gemm_is_supported_on_this_gpu():
    ok, why = fp8.blockwise_probe(CUDA)
    name = torch.cuda.get_device_name()
    assert ok, f"blockwise FP8 GEMM not available on {name} (torch {torch.__version__}, CUDA {torch.version.cuda}): {why}"


def _heavy_tailed(*shape, seed):
    """Gaussian values with a few large outliers, so the tiles' scales differ (as in tests/test_fp8.py)."""
    g = torch.Generator(device=CUDA).manual_seed(seed)
    x = torch.randn(*shape, generator=g, device=CUDA)
    return x * (1 + 20 * (torch.rand(*shape, generator=g, device=CUDA) > 0.995))


def test_blockwise_mm_on_the_gpu_equals_the_emulated_recipe(fp8_gemm_calls):
    """The three GEMMs of fp8_linear (forward, dgrad, wgrad; 200 tokens: the wgrad contraction is padded to whole
    tiles, the output rows to 16) through cuBLAS against the same function on CPU copies (which emulates: quantise,
    dequantise, fp32 matmul)."""
    M, K, N = 200, 512, 384
    x = _heavy_tailed(M, K, seed=0).to(torch.bfloat16)
    w = (0.05 * _heavy_tailed(N, K, seed=1)).to(torch.bfloat16)
    dy = _heavy_tailed(M, N, seed=2).to(torch.bfloat16)
    cases = {"forward": (x, w, fp8.TILE), "dgrad": (dy, w.t(), fp8.TILE), "wgrad": (dy.t(), x.t(), 1)}
    for name, (a, b, b_rows) in cases.items():
        before = fp8_gemm_calls["cublas"]
        got = fp8.blockwise_mm(a, b, b_rows=b_rows, out_dtype=torch.bfloat16)
        assert fp8_gemm_calls["cublas"] == before + 1, f"{name}: cuBLAS did not run the GEMM"
        emulated = fp8.blockwise_mm(a.cpu(), b.cpu(), b_rows=b_rows, out_dtype=torch.bfloat16)
        unquantised = a.float() @ b.float().t()
        assert got.shape == emulated.shape and got.dtype == torch.bfloat16
        err, fp8_err = _rel(got.cpu(), emulated), _rel(got, unquantised)
        print(f"blockwise_mm {name}: vs emulation {err:.2e}, vs the unquantised product {fp8_err:.2e}")
        assert err < FP8_REL, (name, err)
        assert fp8_err > 10 * err, (name, fp8_err, err)  # FP8 really rounds the operands, on both sides
    assert "cuda" not in fp8_gemm_calls["emulated"]


def test_fp8_linear_forward_backward_on_the_gpu_equals_the_emulated_recipe(fp8_gemm_calls):
    x = _heavy_tailed(2, 100, 256, seed=4).to(torch.bfloat16)
    w = (0.05 * _heavy_tailed(384, 256, seed=5)).to(torch.bfloat16)
    dy = _heavy_tailed(2, 100, 384, seed=6).to(torch.bfloat16)
    results = []
    for device in ("cuda", "cpu"):
        xd, wd = (t.detach().to(device).requires_grad_() for t in (x, w))
        y = fp8.fp8_linear(xd, wd)
        y.backward(dy.to(device))
        results.append([y, xd.grad, wd.grad])
    assert fp8_gemm_calls["cublas"] == 3 and "cuda" not in fp8_gemm_calls["emulated"]
    _assert_rel([t.cpu() for t in results[0]], results[1], ["y", "dx", "dw"], "fp8_linear", FP8_REL)


def test_fp8_grouped_mm_on_the_gpu_with_an_empty_expert_equals_the_emulated_recipe(fp8_gemm_calls):
    counts = [5, 0, 130, 1, 0, 40]
    E, K, N_out, tail = len(counts), 256, 128, 3
    x = _heavy_tailed(sum(counts) + tail, K, seed=7).to(torch.bfloat16)
    w = (0.05 * _heavy_tailed(E, N_out, K, seed=8)).to(torch.bfloat16)
    dy = _heavy_tailed(sum(counts) + tail, N_out, seed=9).to(torch.bfloat16)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    results = []
    for device in ("cuda", "cpu"):
        xd, wd = (t.detach().to(device).requires_grad_() for t in (x, w))
        out = fp8.fp8_grouped_mm(xd, wd, offs.to(device))
        out.backward(dy.to(device))
        results.append([out, xd.grad, wd.grad])
    (out, dx, dw), ref = results[0], results[1]
    assert fp8_gemm_calls["cublas"] == 3 * sum(n > 0 for n in counts) and "cuda" not in fp8_gemm_calls["emulated"]
    n = sum(counts)
    assert all(torch.isfinite(t).all() for t in (out, dx, dw))
    assert not out[n:].any() and not dx[n:].any()
    for e, count in enumerate(counts):
        if count == 0:
            assert not dw[e].any(), e  # an empty expert's gradient is exactly zero
        else:
            assert _rel(dw[e].cpu(), ref[2][e]) < FP8_REL, e
    _assert_rel([out[:n].cpu(), dx[:n].cpu()], [ref[0][:n], ref[1][:n]], ["out", "dx"], "fp8_grouped_mm", FP8_REL)
