"""Section 2: the sliding-window + sink attention core (B=1, 64/8 heads, QK 192 / V 128, window 128, packed
documents), forward + backward: `fused` (flash varlen with the sink folded into its lse) against the `torch`
reference (banded blocks) and SDPA with a boolean band mask (no sink: SDPA has none; a timing baseline only).
`fused` gets the micro-batch's document bound (as a data loader knows it); `fused_static_bound` (S = 4k only) runs
without it: the cu_seqlens table then has S + 1 slots, and the kernel's grid grows with it.

RESULT swa_<candidate>: time, model TFLOP/s (window counted as O(S W)), peak memory; RESULT swa_numerics: out, dq,
dk, dv, dsink of `fused` relative to the reference, in bf16 and fp32 (on a GPU fp32 inputs run the reference:
the flash kernel is bf16/fp16 only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.gpu import attention_common as common
from bench.gpu.harness import Harness
from parallel.kernels import get_spec


def _band_sdpa(q, k, v, meta, sink=None):
    """SDPA with an S x S boolean mask (window + documents); GQA expanded; no sink."""
    S, W = q.shape[1], _band_sdpa.window_keys
    i, j = torch.arange(S, device=q.device).view(-1, 1), torch.arange(S, device=q.device).view(1, -1)
    docs = meta.doc_ids[0]
    mask = (j <= i) & (i - j < W) & (docs.view(-1, 1) == docs.view(1, -1))
    G = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(G, 2).transpose(1, 2), v.repeat_interleave(G, 2).transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=q.shape[-1] ** -0.5).transpose(1, 2)


def run(h: Harness) -> None:
    Hq, Hkv, D, Dv = h.pick(64, 4), h.pick(8, 2), h.pick(192, 24), h.pick(128, 16)
    window_keys = h.pick(129, 17)  # the window: 128 keys before the query, and itself
    scale = D**-0.5
    cores = {name: get_spec(name).attention_core("sliding_attention", window_keys=window_keys, scale=scale)
             for name in ("torch", "fused")}
    _band_sdpa.window_keys = window_keys
    candidates = {"fused": cores["fused"], "torch": cores["torch"], "sdpa_band_mask": _band_sdpa}
    dtype = torch.bfloat16 if h.cuda else torch.float32

    for S in h.pick((4096, 32768), (96, 160)):
        positions = common.packed_positions(S, h.device)
        meta = common.metadata(positions, documents=5)
        q, k, v, sink, dout = common.inputs(h, S, Hq, Hkv, D, Dv, dtype)
        flops = 3 * 2 * Hq * S * min(window_keys, S) * (D + Dv)
        static = common.metadata(positions)  # no document bound: S + 1 slots per row
        runs = [(name, core, meta) for name, core in candidates.items()]
        if S <= 4096:
            runs.append(("fused_static_bound", cores["fused"], static))
        for name, core, run_meta in runs:
            use_sink = sink if name != "sdpa_band_mask" else None
            run_once = lambda: common.step(core, q, k, v, use_sink, dout, run_meta)  # noqa: E731
            seconds, status = common.attempt(h, lambda: h.time(run_once, warmup=1, iters=3))
            peak = common.attempt(h, lambda: h.peak_memory(run_once))[0] if status == "ok" else None
            h.result(f"swa_{name}", seq_len=S, dtype=str(dtype).removeprefix("torch."), status=status,
                     ms=seconds * 1e3 if seconds else None,
                     model_tflops=common.tflops(h, flops, seconds) if seconds else None,
                     peak_mib=peak / 2**20 if peak else None)
        _numerics(h, cores, S, Hq, Hkv, D, Dv, meta)


def _numerics(h: Harness, cores, S, Hq, Hkv, D, Dv, meta) -> None:
    """fused vs the reference on the same inputs; bf16 is compared with the fp32 reference of its own inputs."""
    q, k, v, sink, dout = common.inputs(h, S, Hq, Hkv, D, Dv, torch.float32, seed=1)
    reference = common.step(cores["torch"], q, k, v, sink, dout, meta)
    for dtype in (torch.float32, torch.bfloat16):
        args = [t.to(dtype) for t in (q, k, v)]
        got, status = common.attempt(h, lambda: common.step(cores["fused"], *args, sink, dout.to(dtype), meta))
        ref = reference if dtype == torch.float32 else common.step(
            cores["torch"], *(t.float() for t in args), sink, dout.to(dtype).float(), meta)
        fields = common.errors(got, ref) if got is not None else {}
        kernel = "reference" if (h.cuda and dtype == torch.float32) else "fused"
        h.result("swa_numerics", seq_len=S, dtype=str(dtype).removeprefix("torch."), kernel=kernel, status=status,
                 **fields)
