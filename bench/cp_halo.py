"""Bytes each rank receives per sliding-window layer under context parallelism: our halo exchange, measured by
running the implementation's exchange (with a recording stand-in for the all-to-all, so no process group is
needed), against an all-gather of the full K/V (what a CP implementation without halo exchange moves), at the
full model's head sizes (8 KV heads, K 192 / V 128 dims, window 128, bf16).

Run: python -m bench.cp_halo
"""

from __future__ import annotations

import argparse

import torch

from mimo_train.config import load_model_config
from parallel import comm
from parallel.context_parallel import ChunkLayout, ContextParallelAttention


class _Recorder:
    """Replaces comm.all_to_all for one call: records the rows this rank would receive, returns zeros."""

    def __init__(self):
        self.received_bytes = 0

    def __call__(self, x, output_splits, input_splits, group):
        out = x.new_zeros((sum(output_splits), *x.shape[1:]))
        self.received_bytes += out.numel() * out.element_size()
        return out


def halo_bytes(seq_len: int, cp: int, rank: int, heads: int, d: int, dv: int, window: int, dtype) -> int:
    layout = ChunkLayout(cp, rank)
    L = layout.chunk_len(seq_len)
    k = torch.zeros(1, 2 * L, heads, d, dtype=dtype)
    v = torch.zeros(1, 2 * L, heads, dv, dtype=dtype)
    attention = ContextParallelAttention(base=None, layout=layout, group=None)
    recorder, real = _Recorder(), comm.all_to_all
    comm.all_to_all = recorder
    try:
        attention._exchange_halos(k, v, L, window)
    finally:
        comm.all_to_all = real
    return recorder.received_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, nargs="+", default=[32768, 262144])
    ap.add_argument("--cp", type=int, nargs="+", default=[2, 8, 32])
    args = ap.parse_args()
    cfg = load_model_config("configs/model/mimo_v2_flash.yaml")
    heads, d, dv, window = cfg.swa_num_key_value_heads, cfg.head_dim, cfg.v_head_dim, cfg.window_keys - 1
    dtype = torch.bfloat16
    size = torch.finfo(dtype).bits // 8
    print(f"SWA layer: {heads} KV heads, K {d} / V {dv} dims, window {window}, {dtype}; bytes received per rank")
    print(f"{'seq':>8} {'cp':>4} {'halo (max over ranks)':>22} {'all-gather K/V':>16} {'ratio':>10}")
    worst = 0.0
    for seq in args.seq:
        for cp in args.cp:
            halo = max(halo_bytes(seq, cp, r, heads, d, dv, window, dtype) for r in sorted({0, cp // 2, cp - 1}))
            gather = (cp - 1) * (seq // cp) * heads * (d + dv) * size
            ratio = gather / halo
            worst = ratio if worst == 0 else min(worst, ratio)
            print(f"{seq:>8} {cp:>4} {halo:>22,} {gather:>16,} {ratio:>9.0f}x")
    print(f"RESULT cp_halo ratio={worst:.1f} halo_bytes_per_boundary={window * heads * (d + dv) * size} "
          f"note=min_over_table_of_allgather_over_halo")


if __name__ == "__main__":
    main()
