"""Benchmark: tokens per second the data stream delivers, per process, against two references in the same run.

1. The raw read speed of the same shard files (``cat`` to /dev/null, page cache warm), in tokens per second:
   the stream should not be much slower than just reading its bytes (goal: ratio >= 0.8).
2. What a training step consumes: global_batch x seq_len tokens per ``--step-time`` seconds (a stand-in for a
   tiny model's step until the real one is wired in): the stream must stay ahead of it (step_ratio > 1).

Run from the checkout: ``python -m bench.data_stream``. The last line is ``RESULT data_stream ratio=<x> ...``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

from data_pipeline import DataConfig, GlobalSampleStream, SourceConfig
from data_pipeline.config import BUILTIN_SOURCE
from data_pipeline.shards import join_url, read_manifest


def raw_read_tokens_per_second(directory: str, min_seconds: float) -> float:
    """Token ids per second obtained by reading the shard files with ``cat`` (repeated for a stable figure)."""
    manifest = read_manifest(directory)
    paths = [join_url(directory, s.url) for s in manifest.shards]
    tokens = sum(s.tokens for s in manifest.shards)
    subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    passes, start = 0, time.perf_counter()
    while passes == 0 or time.perf_counter() - start < min_seconds:
        subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True)
        passes += 1
    return passes * tokens / (time.perf_counter() - start)


def stream_tokens_per_second(config: DataConfig, seq_len: int, global_batch: int, micro_batch: int,
                             steps: int) -> float:
    stream = GlobalSampleStream(config)
    stream.set_stage(seq_len)
    stream.micro_batches(0, global_batch, micro_batch)  # starts the prefetch workers; not timed
    start = time.perf_counter()
    for step in range(1, steps + 1):
        stream.micro_batches(step, global_batch, micro_batch)
    elapsed = time.perf_counter() - start
    stream.close()
    return steps * global_batch * seq_len / elapsed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=BUILTIN_SOURCE, help="a shard directory / URL, or builtin:stdlib")
    parser.add_argument("--cache-dir", default=os.environ.get("MIMO_TRAIN_CACHE", ".cache/mimo-train"))
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader prefetch workers")
    parser.add_argument("--step-time", type=float, default=0.5, help="seconds per training step of the model")
    args = parser.parse_args(argv)

    config = DataConfig(sources=[SourceConfig("bench", args.data)], cache_dir=args.cache_dir,
                        num_workers=args.workers)
    stream_tps = stream_tokens_per_second(config, args.seq_len, args.global_batch, args.micro_batch, args.steps)
    directory = GlobalSampleStream(config).sources[0].directory  # builtin:stdlib resolved to its shard dir
    raw_tps = raw_read_tokens_per_second(directory, min_seconds=1.0)
    step_tps = args.global_batch * args.seq_len / args.step_time

    print(f"stream: {stream_tps / 1e6:.1f} M tokens/s per process (seq_len {args.seq_len}, global batch "
          f"{args.global_batch}, {args.workers} workers)")
    print(f"raw read (cat): {raw_tps / 1e6:.1f} M tokens/s")
    print(f"training step: {step_tps / 1e6:.3f} M tokens/s ({args.global_batch} x {args.seq_len} per "
          f"{args.step_time} s)")
    print(f"RESULT data_stream ratio={stream_tps / raw_tps:.3f} stream_tok_s={stream_tps:.0f} raw_tok_s={raw_tps:.0f} "
          f"step_ratio={stream_tps / step_tps:.1f} step_tok_s={step_tps:.0f}")


if __name__ == "__main__":
    main()
