"""Benchmark: tokens per second the data stream delivers to one rank with 1 prefetch worker, against three references
measured or computed in the same run.

1. The raw read speed of the same shard files (``cat`` to /dev/null, page cache warm), in tokens per second:
   the stream should not be much slower than just reading its bytes (``ratio``).
2. What a GPU consumes at the 309B model's step: the planner's recommendation for 512 H100s at the recipe's batch
   (2048 x 32k). ``gpu_ratio`` is against the planner's tokens/s per GPU (tokens per step / step time / GPUs);
   ``rank_ratio`` against what one rank's loader must deliver under that layout (every rank reads its whole
   data-parallel slice, gbs / dp sequences per step, since tensor-, context- and pipeline-parallel ranks read the
   same micro-batches). Both must stay above 1.
3. The data wait inside real CPU demo steps (``configs/train/tiny_cpu.yaml``, 1 prefetch worker): the time the
   trainer spends in ``micro_batches`` as a fraction of the step (goal: under 1 %).

Run from the checkout: ``python -m bench.data_stream``. The last line is ``RESULT data_stream ratio=<x> ...``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time

from data_pipeline import DataConfig, GlobalSampleStream, SourceConfig
from data_pipeline.config import BUILTIN_SOURCE
from data_pipeline.shards import join_url, read_manifest

PLANNER_GPUS, PLANNER_GPU, RECIPE_SEQ = 512, "h100", 32768


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


def planner_demand() -> dict:
    """Tokens/s per GPU and per rank's loader at the planner's best layout for the 309B model on 512 H100s, as
    ``mimo-train plan --config configs/model/mimo_v2_flash.yaml --gpus 512 --gpu h100`` recommends it."""
    import contextlib
    import io
    import json

    from mimo_train.launch.cli import main as cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(["plan", "--config", "configs/model/mimo_v2_flash.yaml", "--gpus", str(PLANNER_GPUS), "--gpu",
                    PLANNER_GPU, "--seq", str(RECIPE_SEQ), "--json", "--top", "1"])
    if code != 0:
        raise RuntimeError(f"mimo-train plan failed with status {code}")
    result = json.loads(out.getvalue())
    best = result["results"][0]
    step_tokens = result["global_batch"] * result["seq"]
    return {"layout": best["layout"]["name"], "step_time": best["step_time"],
            "gpu_tok_s": step_tokens / best["step_time"] / PLANNER_GPUS,
            "rank_tok_s": step_tokens / best["layout"]["dp"] / best["step_time"]}


def demo_data_wait(steps: int, cache_dir: str) -> tuple[float, float]:
    """(median data wait, median step time) in seconds over the CPU demo's steps after the first."""
    import statistics

    from mimo_train.config import load_config
    from mimo_train.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config("configs/train/tiny_cpu.yaml", [f"train.steps={steps}", f"run.dir={run_dir}",
                                                          "run.wandb_mode=disabled", f"data.cache_dir={cache_dir}",
                                                          "data.num_workers=1"])
        trainer = Trainer(cfg, resume="none")
        waits, fetch = [], trainer.data.micro_batches

        def timed(*args, **kwargs):
            start = time.perf_counter()
            batches = fetch(*args, **kwargs)
            waits.append(time.perf_counter() - start)
            return batches

        trainer.data.micro_batches = timed
        records = trainer.fit(log=False)
        trainer.data.close()
    return statistics.median(waits[1:]), statistics.median(r["step_time_s"] for r in records[1:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=BUILTIN_SOURCE, help="a shard directory / URL, or builtin:stdlib")
    parser.add_argument("--cache-dir", default=os.environ.get("MIMO_TRAIN_CACHE")
                        or os.path.join(os.path.expanduser("~"), ".cache", "mimo-train"))
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader prefetch workers")
    parser.add_argument("--demo-steps", type=int, default=8, help="CPU demo steps for the data wait (0: skip)")
    args = parser.parse_args(argv)

    cache_dir = os.path.abspath(args.cache_dir)
    config = DataConfig(sources=[SourceConfig("bench", args.data)], cache_dir=cache_dir, num_workers=args.workers)
    stream_tps = stream_tokens_per_second(config, args.seq_len, args.global_batch, args.micro_batch, args.steps)
    directory = GlobalSampleStream(config).sources[0].directory  # builtin:stdlib resolved to its shard dir
    raw_tps = raw_read_tokens_per_second(directory, min_seconds=1.0)
    demand = planner_demand()
    wait, step = demo_data_wait(args.demo_steps, cache_dir) if args.demo_steps > 1 else (float("nan"), float("nan"))

    print(f"stream: {stream_tps / 1e6:.2f} M tokens/s per rank (seq_len {args.seq_len}, global batch "
          f"{args.global_batch}, {args.workers} workers)")
    print(f"raw read (cat): {raw_tps / 1e6:.1f} M tokens/s")
    print(f"309B on {PLANNER_GPUS} {PLANNER_GPU} ({demand['layout']}, planner step {demand['step_time']:.1f} s): "
          f"{demand['gpu_tok_s']:.0f} tokens/s per GPU; each rank's loader must deliver {demand['rank_tok_s']:.0f}")
    print(f"CPU demo step: data wait {wait * 1e3:.2f} ms of {step * 1e3:.0f} ms ({100 * wait / step:.2f} %)")
    print(f"RESULT data_stream ratio={stream_tps / raw_tps:.3f} stream_tok_s={stream_tps:.0f} raw_tok_s={raw_tps:.0f} "
          f"gpu_ratio={stream_tps / demand['gpu_tok_s']:.1f} rank_ratio={stream_tps / demand['rank_tok_s']:.2f} "
          f"data_wait_frac={wait / step:.4f}")


if __name__ == "__main__":
    main()
