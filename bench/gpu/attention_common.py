"""What the attention sections (swa, global_attention) share: packed inputs, one fwd+bwd step of a core, its
numerics against a reference, and model FLOPs.

Model FLOPs count what attention needs, not what a kernel does: per query head and query, 2 (D + Dv) per key it
may see (a window counts W keys, O(S W), never S^2), times 3 for forward + backward.
"""

from __future__ import annotations

import torch

from bench.gpu.harness import Harness, relative_error
from mimo_train.model.kernels.metadata import AttentionMetadata, document_ids


def packed_positions(seq_len: int, device) -> torch.Tensor:
    """One row of four packed documents (halves and quarters of the sequence; one starts mid-window)."""
    lengths = [seq_len // 2 - 37, seq_len // 4 + 37, seq_len // 8, seq_len - seq_len // 2 - seq_len // 4 - seq_len // 8]
    return torch.cat([torch.arange(n, device=device) for n in lengths]).unsqueeze(0)


def inputs(h: Harness, S: int, Hq: int, Hkv: int, D: int, Dv: int, dtype, seed: int = 0):
    g = torch.Generator(device=h.device).manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, device=h.device, dtype=dtype, generator=g)  # noqa: E731
    return make(1, S, Hq, D), make(1, S, Hkv, D), make(1, S, Hkv, Dv), make(Hq).float(), make(1, S, Hq, Dv)


def metadata(positions: torch.Tensor, documents: int | None = None) -> AttentionMetadata:
    B, S = positions.shape
    return AttentionMetadata(document_ids(positions), B, S, positions.device, max_documents=documents)


def step(core, q, k, v, sink, dout, meta, **kwargs):
    """One forward + backward of `core`; returns (out, dq, dk, dv, dsink or None)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    s = sink.detach().clone().requires_grad_() if sink is not None else None
    out = core(*leaves, meta, sink=s, **kwargs)
    out.backward(dout)
    return [out.detach(), *(t.grad for t in leaves), s.grad if s is not None else None]


def errors(ours: list, ref: list) -> dict[str, str]:
    """Relative errors of out, dq, dk, dv, dsink, written 1.2e-07."""
    names = ["out", "dq", "dk", "dv", "dsink"]
    return {f"err_{n}": f"{relative_error(a, b):.1e}" for n, a, b in zip(names, ours, ref)
            if a is not None and b is not None}


def tflops(h: Harness, flops: float, seconds: float) -> float | None:
    return flops / seconds / 1e12 if seconds > 0 and h.cuda else None


def attempt(h: Harness, fn):
    """Run a candidate; on a GPU a failure (unsupported there, out of memory) becomes a status so the others still
    run; under --smoke it propagates (CI must see it)."""
    try:
        return fn(), "ok"
    except (RuntimeError, NotImplementedError, ValueError, torch.OutOfMemoryError) as exc:
        if h.smoke:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None, f"error_{type(exc).__name__}"
