"""Section 3: the global attention core (causal + packed documents, 64 query / 4 KV heads, QK 192 / V 128, no
sink), forward + backward, S = 4k and 32k: each candidate, and the one `fused` uses on a GPU (GPU_GLOBAL_KERNEL,
provisional until this section has measured it).

The reference every candidate's errors are measured against: SDPA with K/V expanded to the 64 query heads and an
S x S causal + document mask, on the memory-efficient kernel (the one fused SDPA kernel that takes an arbitrary
mask; without the expansion GQA sends SDPA to its math kernel, which at 32k holds 64 x S^2 bf16 scores, 137 GB).
At 32k it holds the mask as a bf16 bias (2 GiB) and the expanded K/V (1.3 GB), and fits.

Candidates: `torch` (the torch spec's core: SDPA with GQA and the mask, i.e. the math kernel; S = 4k only, see
above), flash varlen (V padded to 192), efficient varlen (V 128; its lse is [documents, heads, S], so it takes the
host-known document bound), flex_attention (compiled) with a document BlockMask, and cuDNN SDPA on one document
per row (it has no document mask here). On a CPU (--smoke) the reference, torch, fused (the CPU flash kernel) and
flex's forward run; the others report gpu_only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.gpu import attention_common as common
from bench.gpu.harness import Harness
from parallel.kernels import choice
from parallel.kernels import get_spec
from parallel.kernels.flex import flex_sink_attention
from parallel.kernels.sink_attention import efficient_varlen_attention, flash_varlen_attention

DOCUMENTS = 5  # packed_positions' four documents, and document 0
MATH_KERNEL_LIMIT_BYTES = 64 * 2**30  # the `torch` core's S x S scores per head are not run above this


def expanded_reference(q, k, v, meta, sink=None, *, scale: float):
    """Causal + document attention through SDPA with K/V expanded to the query heads and a boolean mask: the
    memory-efficient kernel on a GPU (math on a CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    S, G = q.shape[1], q.shape[2] // k.shape[2]
    docs = meta.doc_ids[0]
    i = torch.arange(S, device=q.device)
    mask = (i.view(-1, 1) >= i.view(1, -1)) & (docs.view(-1, 1) == docs.view(1, -1))
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(G, 2).transpose(1, 2), v.repeat_interleave(G, 2).transpose(1, 2)
    backends = [SDPBackend.EFFICIENT_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2)


def math_kernel_bytes(Hq: int, S: int) -> int:
    """The `torch` core's attention scores (the math kernel: bf16 [Hq, S, S]) for one row."""
    return 2 * Hq * S * S


def _candidates(h: Harness, scale: float):
    def reference(q, k, v, meta, sink=None):
        return expanded_reference(q, k, v, meta, scale=scale)

    spec_core = get_spec("torch").attention_core("full_attention", window_keys=0, scale=scale)
    fused = get_spec("fused").attention_core("full_attention", window_keys=0, scale=scale)

    def flash(q, k, v, meta, sink=None):
        return flash_varlen_attention(q, k, v, meta, scale=scale)

    def efficient(q, k, v, meta, sink=None):
        return efficient_varlen_attention(q, k, v, meta, scale=scale)

    def flex(q, k, v, meta, sink=None):
        return flex_sink_attention(q, k, v, meta, scale=scale)

    def cudnn_one_document(q, k, v, meta, sink=None):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)

    gpu_only = {"flash_varlen": flash, "efficient_varlen": efficient, "cudnn_one_document": cudnn_one_document}
    candidates = {"reference": reference, "torch": spec_core, "fused": fused, "flex": flex, **gpu_only}
    return candidates, set(gpu_only)


def run(h: Harness) -> None:
    Hq, Hkv, D, Dv = h.pick(64, 4), h.pick(4, 2), h.pick(192, 24), h.pick(128, 16)
    scale = D**-0.5
    candidates, gpu_only = _candidates(h, scale)
    dtype = torch.bfloat16 if h.cuda else torch.float32
    chosen = choice.GPU_GLOBAL_KERNEL if h.cuda else "cpu_flash"
    for S in h.pick((4096, 32768), (96, 256)):
        positions = common.packed_positions(S, h.device)
        q, k, v, _, dout = common.inputs(h, S, Hq, Hkv, D, Dv, dtype)
        flops = 3 * 2 * Hq * (S * (S + 1) / 2) * (D + Dv)  # causal over the whole row: an upper bound with documents
        ref = None
        for name, core in candidates.items():
            one_document = name == "cudnn_one_document"
            meta = common.metadata(positions if not one_document else torch.arange(S, device=h.device)[None],
                                   documents=DOCUMENTS)
            if name in gpu_only and not h.cuda:
                h.result(f"global_{name}", seq_len=S, status="gpu_only")
                continue
            if name == "torch" and math_kernel_bytes(Hq, S) > MATH_KERNEL_LIMIT_BYTES:
                h.result(f"global_{name}", seq_len=S, status="not_run_math_kernel",
                         needs_gib=round(math_kernel_bytes(Hq, S) / 2**30))
                continue
            forward_only = name == "flex" and not h.cuda  # flex has no CPU backward
            run_once = (lambda: core(q, k, v, meta)) if forward_only else (
                lambda: common.step(core, q, k, v, None, dout, meta))
            seconds, status = common.attempt(h, lambda: h.time(run_once, warmup=1, iters=3))
            peak = common.attempt(h, lambda: h.peak_memory(run_once))[0] if status == "ok" else None
            fields = {}
            if status == "ok" and not one_document:
                got = run_once()
                if name == "reference":
                    ref = got
                elif ref is not None:
                    fields = {"err_out": common.errors([got], [ref[0]])["err_out"]} if forward_only else \
                        common.errors(got, ref)
            h.result(f"global_{name}", seq_len=S, dtype=str(dtype).removeprefix("torch."), status=status,
                     passes="fwd" if forward_only else "fwd_bwd", ms=seconds * 1e3 if seconds else None,
                     model_tflops=common.tflops(h, flops, seconds) if seconds else None,
                     peak_mib=peak / 2**20 if peak else None, **fields)
        h.result("global_chosen", seq_len=S, kernel=chosen, provisional="yes")
