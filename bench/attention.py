"""Benchmark: sliding-window attention with sink, forward plus backward, ours against transformers' eager reference.

Ours is `mimo_train.model.kernels.torch_backend.sliding_window_attention` (banded: query blocks against their own keys and
the window before them, O(S x W)). The reference is `eager_attention_forward` from transformers' MiMo-V2-Flash
(`repeat_kv`, a full S x S score matrix plus the additive mask, a sink column, softmax), fed the float mask that
transformers builds for eager attention: `masking_utils.eager_mask` with `sliding_window_causal_mask_function(W)`
(`kv_idx > q_idx - W` and causal, 0 where allowed and the dtype's minimum elsewhere). transformers builds that mask
once per forward (per layer type), so the reference time includes building it; the time without it is shown too.

Both run on the same tensors (each in its own layout: ours [B, S, H, D], transformers [B, H, S, D]), with the same
output gradient, the same torch thread count, float32. The window is the released config's as transformers reads
it: `sliding_window_size` 128 -> 129 keys, the query included. The head layout is the real model's SWA layer scaled
down (64 query heads over 8 KV heads -> 8 over 1, the same GQA ratio; QK head dim 192, V head dim 128) so that the
O(S^2) reference fits a 2-core / 24 GiB machine in a few minutes.

Run from the checkout: ``python -m bench.attention``. The last line is
``RESULT attention ratio=<S=8k ratio> ratio_<S>=... ratio_nomask_<S>=...``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

# bench.common first: it sets OMP_WAIT_POLICY before torch loads OpenMP.
from bench.common import machine_note, result_line, set_threads  # noqa: I001

import torch
import torch.nn as nn

from mimo_train.model.kernels.torch_backend import sliding_window_attention


class _EagerModule(nn.Module):
    """The attributes `eager_attention_forward` reads from transformers' attention module."""

    def __init__(self, num_key_value_groups: int, sinks: torch.Tensor) -> None:
        super().__init__()
        self.num_key_value_groups = num_key_value_groups
        self.sinks = sinks


def hf_eager_mask(batch: int, seq_len: int, window_keys: int, dtype=torch.float32) -> torch.Tensor:
    """The additive [B, 1, S, S] mask transformers builds for eager sliding-window attention."""
    from transformers.masking_utils import eager_mask, sliding_window_causal_mask_function

    return eager_mask(batch_size=batch, q_length=seq_len, kv_length=seq_len,
                      mask_function=sliding_window_causal_mask_function(window_keys), dtype=dtype)


def make_inputs(batch, seq_len, heads, kv_heads, head_dim, v_head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, head_dim, generator=gen)
    k = torch.randn(batch, seq_len, kv_heads, head_dim, generator=gen)
    v = torch.randn(batch, seq_len, kv_heads, v_head_dim, generator=gen)
    sink = torch.randn(heads, generator=gen)
    grad_out = torch.randn(batch, seq_len, heads, v_head_dim, generator=gen)
    return q, k, v, sink, grad_out


class Pair:
    """The same attention problem set up for ours and for transformers' eager path (separate leaf tensors)."""

    def __init__(self, batch, seq_len, heads, kv_heads, head_dim, v_head_dim, window_keys, seed=0):
        q, k, v, sink, self.grad_out = make_inputs(batch, seq_len, heads, kv_heads, head_dim, v_head_dim, seed)
        self.batch, self.seq_len, self.window_keys = batch, seq_len, window_keys
        self.scale = head_dim**-0.5
        leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
        self.ours = [leaf(q), leaf(k), leaf(v), leaf(sink)]
        self.theirs = [leaf(q.transpose(1, 2).contiguous()), leaf(k.transpose(1, 2).contiguous()),
                       leaf(v.transpose(1, 2).contiguous())]
        self.module = _EagerModule(heads // kv_heads, nn.Parameter(sink.clone()))

    def run_ours(self) -> torch.Tensor:
        q, k, v, sink = self.ours
        for t in self.ours:
            t.grad = None
        out = sliding_window_attention(q, k, v, window_keys=self.window_keys, scale=self.scale, sink=sink,
                                       doc_ids=None)
        out.backward(self.grad_out)
        return out

    def build_mask(self) -> torch.Tensor:
        return hf_eager_mask(self.batch, self.seq_len, self.window_keys)

    def run_theirs(self, mask: torch.Tensor) -> torch.Tensor:
        from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import eager_attention_forward

        for t in [*self.theirs, self.module.sinks]:
            t.grad = None
        q, k, v = self.theirs
        out, _ = eager_attention_forward(self.module, q, k, v, mask, scaling=self.scale, dropout=0.0)
        out.backward(self.grad_out)  # [B, S, H, Dv], the same layout as ours
        return out

    def max_abs_diffs(self) -> dict[str, float]:
        """Output and gradient differences between ours and the reference (after one run of each)."""
        ours_out = self.run_ours().detach()
        theirs_out = self.run_theirs(self.build_mask()).detach()
        q, k, v, sink = self.ours
        tq, tk, tv = self.theirs
        return {
            "out": (ours_out - theirs_out).abs().max().item(),
            "dq": (q.grad - tq.grad.transpose(1, 2)).abs().max().item(),
            "dk": (k.grad - tk.grad.transpose(1, 2)).abs().max().item(),
            "dv": (v.grad - tv.grad.transpose(1, 2)).abs().max().item(),
            "dsink": (sink.grad - self.module.sinks.grad).abs().max().item(),
        }


def measure(seq_len: int, *, batch=1, heads=8, kv_heads=1, head_dim=192, v_head_dim=128, window_keys=129,
            repeats=3, warmup=1, check=True) -> dict[str, float]:
    """Median forward+backward times (seconds) of ours and the reference at one sequence length."""
    pair = Pair(batch, seq_len, heads, kv_heads, head_dim, v_head_dim, window_keys)
    row = {"seq_len": seq_len}
    if check:  # one run of each, which also serves as their warm-up
        row.update({f"diff_{k}": v for k, v in pair.max_abs_diffs().items()})
        warmup = 0
    for _ in range(warmup):
        pair.run_ours()
        pair.run_theirs(pair.build_mask())
    # Ours and the reference alternate, so that a noisy neighbour on the machine slows both alike; one loop times
    # both parts of a reference step, so `with mask` and `without mask` share their samples.
    ours_times, mask_times, attn_times = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pair.run_ours()
        t1 = time.perf_counter()
        mask = pair.build_mask()
        t2 = time.perf_counter()
        pair.run_theirs(mask)
        t3 = time.perf_counter()
        del mask
        ours_times.append(t1 - t0)
        mask_times.append(t2 - t1)
        attn_times.append(t3 - t2)
    row["ours"] = statistics.median(ours_times)
    row["theirs"] = statistics.median(m + a for m, a in zip(mask_times, attn_times))
    row["theirs_nomask"] = statistics.median(attn_times)
    row["mask"] = statistics.median(mask_times)
    row["ratio"] = row["theirs"] / row["ours"]
    row["ratio_nomask"] = row["theirs_nomask"] / row["ours"]
    return row


def run(seq_lens, threads, repeats, **shape) -> list[str]:
    """Measure every sequence length, print the table, return the printed lines (the RESULT line last)."""
    threads = set_threads(threads)
    lines = [machine_note(),
             f"float32; forward+backward; B={shape.get('batch', 1)} "
             f"Hq={shape.get('heads', 8)} Hkv={shape.get('kv_heads', 1)} D={shape.get('head_dim', 192)} "
             f"Dv={shape.get('v_head_dim', 128)} window_keys={shape.get('window_keys', 129)} "
             f"(query + {shape.get('window_keys', 129) - 1} before it); median of {repeats} after warm-up",
             f"{'S':>6} {'ours ms':>10} {'HF ms':>10} {'HF-mask ms':>11} {'mask ms':>8} {'ratio':>7} "
             f"{'ratio-mask':>10} {'max|d out|':>11} {'max|d grad|':>11}"]
    print("\n".join(lines), flush=True)
    rows = []
    for s in seq_lens:
        row = measure(s, repeats=repeats, **shape)
        rows.append(row)
        grad_diff = max(row.get(k, 0.0) for k in ("diff_dq", "diff_dk", "diff_dv", "diff_dsink"))
        line = (f"{s:>6} {row['ours'] * 1e3:>10.1f} {row['theirs'] * 1e3:>10.1f} {row['theirs_nomask'] * 1e3:>11.1f} "
                f"{row['mask'] * 1e3:>8.1f} {row['ratio']:>7.1f} {row['ratio_nomask']:>10.1f} "
                f"{row.get('diff_out', math.nan):>11.2e} {grad_diff:>11.2e}")
        print(line, flush=True)
        lines.append(line)
    last = rows[-1]
    note = ("HF ms includes building transformers' eager mask (once per forward); HF-mask ms excludes it. "
            "ratio = HF / ours.")
    print(note)
    lines.append(note)
    fields = {"ratio": last["ratio"], "seq_len": last["seq_len"]}
    for row in rows:
        fields[f"ratio_{row['seq_len']}"] = row["ratio"]
    for row in rows:
        fields[f"ratio_nomask_{row['seq_len']}"] = row["ratio_nomask"]
    fields["ours_ms"] = last["ours"] * 1e3
    fields["hf_ms"] = last["theirs"] * 1e3
    fields["threads"] = threads
    fields["load1"] = os.getloadavg()[0]
    result = result_line("attention", **fields)
    print(result, flush=True)
    lines.append(result)
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", default="1024,4096,8192", help="comma-separated; the last one is `ratio`")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=192)
    parser.add_argument("--v-head-dim", type=int, default=128)
    parser.add_argument("--window-keys", type=int, default=129, help="keys per query, the query included")
    args = parser.parse_args(argv)
    run([int(s) for s in args.seq_lens.split(",")], args.threads, args.repeats, batch=args.batch, heads=args.heads,
        kv_heads=args.kv_heads, head_dim=args.head_dim, v_head_dim=args.v_head_dim, window_keys=args.window_keys)


if __name__ == "__main__":
    main()
