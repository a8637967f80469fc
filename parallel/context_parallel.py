"""Context parallelism: the sequence is split over the cp group, and attention brings the keys it needs.

Layout: the sequence is cut into 2 x cp chunks and rank r holds chunks r and 2cp - 1 - r (a head chunk and a tail
chunk), so every rank has the same share of causal global-attention work.

- Sliding-window layers exchange only a halo: each chunk needs the W keys (and values) before it, which are the
  last W rows of the previous chunk, held by one other rank. Traffic per layer is O(W), whatever the sequence
  length. The query's softmax, sink included, is then computed on one rank from complete keys, so the sink
  enters each normaliser exactly once.
- Global layers all-gather K/V (GA layers have few KV heads: 4 of the 64 query heads' width) and each local chunk
  attends causally to the keys before its end.

Positions and document ids are global: the rotary tables are built from the global position ids of the local
tokens, and document ids are looked up by global index, so packed documents hold across rank boundaries.
"""

from __future__ import annotations

import torch

from parallel import comm


class ChunkLayout:
    """Which global positions this rank holds: chunks (r, 2cp - 1 - r) of 2 x cp equal chunks."""

    def __init__(self, cp: int, rank: int):
        self.cp, self.rank = cp, rank
        self._index: dict[tuple[int, str], torch.Tensor] = {}

    def chunk_len(self, seq_len: int) -> int:
        if seq_len % (2 * self.cp):
            raise ValueError(f"sequence length {seq_len} must be divisible by 2 x parallel.cp = {2 * self.cp}")
        return seq_len // (2 * self.cp)

    def chunks(self, rank: int | None = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        return r, 2 * self.cp - 1 - r

    def owner(self, chunk: int) -> int:
        return chunk if chunk < self.cp else 2 * self.cp - 1 - chunk

    def index(self, seq_len: int, device) -> torch.Tensor:
        key = (seq_len, str(device))
        if key not in self._index:
            L = self.chunk_len(seq_len)
            self._index[key] = torch.cat([torch.arange(c * L, (c + 1) * L, device=device) for c in self.chunks()])
        return self._index[key]

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's positions of a whole-sequence tensor [B, S, ...]."""
        return t[:, self.index(t.shape[1], t.device)]

    def gathered_to_global(self, seq_len: int, device) -> torch.Tensor:
        """Index that reorders an all-gather of every rank's local positions (rank order) into global order."""
        L = self.chunk_len(seq_len)
        where = torch.empty(seq_len, dtype=torch.long)
        for r in range(self.cp):
            for j, c in enumerate(self.chunks(r)):
                where[c * L:(c + 1) * L] = torch.arange(r * 2 * L + j * L, r * 2 * L + (j + 1) * L)
        return where.to(device)


class ContextParallelAttention:
    """Wraps an attention core of a layer spec (`parallel.kernels`): called like it, with the local q/k/v of this
    rank's chunks and the whole sequence's attention metadata; the local core sees chunks and their metadata."""

    def __init__(self, base, layout: ChunkLayout, group, *, sliding: bool, window_keys: int = 0):
        self.base, self.layout, self.group = base, layout, group
        self.sliding, self.window_keys = sliding, window_keys

    def __call__(self, q, k, v, attn_meta, sink=None):
        if self.sliding:
            return self.sliding_window_attention(q, k, v, attn_meta, sink)
        return self.causal_attention(q, k, v, attn_meta)

    # ---- sliding window: halo exchange ------------------------------------------------------------------------
    def sliding_window_attention(self, q, k, v, attn_meta, sink=None):
        B, S_local = q.shape[:2]
        L, cp = S_local // 2, self.layout.cp
        W = self.window_keys - 1
        if W > L:
            raise ValueError(f"context parallelism: chunk length {L} (seq_len / 2cp) must be >= the window {W}")
        halos = self._exchange_halos(k, v, L, W) if W > 0 else {}
        outputs = []
        for j, c in enumerate(self.layout.chunks()):
            qc, kc, vc = (t[:, j * L:(j + 1) * L] for t in (q, k, v))
            start = c * L
            if c in halos:  # prepend the halo keys (and placeholder queries whose outputs are dropped)
                hk, hv = halos[c]
                qc = torch.cat([qc.new_zeros(B, W, *qc.shape[2:]), qc], dim=1)
                kc, vc = torch.cat([hk, kc], dim=1), torch.cat([hv, vc], dim=1)
                start -= W
            out = self.base(qc, kc, vc, attn_meta.slice(start, (c + 1) * L), sink=sink)
            outputs.append(out[:, out.shape[1] - L:])
        return torch.cat(outputs, dim=1)

    def _exchange_halos(self, k, v, L, W):
        """Send the last W rows of each local chunk to the owner of the next chunk; return {chunk: (k, v)} for
        each local chunk that has a predecessor. One all-to-all of W rows per chunk boundary."""
        lay, cp = self.layout, self.layout.cp
        B, Hkv, D, Dv = k.shape[0], k.shape[2], k.shape[3], v.shape[3]

        def rows(t, j):  # the last W rows of local chunk j, as [W, B * features]
            return t[:, (j + 1) * L - W:(j + 1) * L].transpose(0, 1).reshape(W, -1)

        sends = {}  # destination rank -> [(chunk, rows)]
        for j, c in enumerate(lay.chunks()):
            if c + 1 < 2 * cp:
                sends.setdefault(lay.owner(c + 1), []).append((c, torch.cat([rows(k, j), rows(v, j)], dim=1)))
        recvs = {}  # source rank -> chunks whose halo it sends here, in the sender's order
        for c in lay.chunks():
            if c > 0:
                recvs.setdefault(lay.owner(c - 1), []).append(c)
        send_rows, send_splits, recv_splits = [], [], []
        for r in range(cp):
            items = sorted(sends.get(r, []), key=lambda item: item[0])
            send_rows += [t for _, t in items]
            send_splits.append(W * len(items))
            recv_splits.append(W * len(recvs.get(r, [])))
        width = B * Hkv * (D + Dv)
        payload = torch.cat(send_rows) if send_rows else k.new_zeros(0, width)
        received = comm.all_to_all(payload, recv_splits, send_splits, self.group)
        halos, offset = {}, 0
        for r in range(cp):
            for c in sorted(recvs.get(r, []), key=lambda c: c - 1):
                block = received[offset:offset + W]
                offset += W
                hk = block[:, :B * Hkv * D].reshape(W, B, Hkv, D).transpose(0, 1)
                hv = block[:, B * Hkv * D:].reshape(W, B, Hkv, Dv).transpose(0, 1)
                halos[c] = (hk, hv)
        return halos

    # ---- global attention: all-gather K/V ---------------------------------------------------------------------
    def causal_attention(self, q, k, v, attn_meta):
        L = q.shape[1] // 2
        S = L * 2 * self.layout.cp
        order = self.layout.gathered_to_global(S, q.device)
        k_all = comm.gather_from_sequence(k, 1, self.group)[:, order]
        v_all = comm.gather_from_sequence(v, 1, self.group)[:, order]
        outputs = []
        for j, c in enumerate(self.layout.chunks()):
            end = (c + 1) * L
            outputs.append(self.base.at(q[:, j * L:(j + 1) * L], k_all[:, :end], v_all[:, :end],
                                        attn_meta.slice(0, end), q_start=c * L))
        return torch.cat(outputs, dim=1)
