"""Benchmark: one training step (forward, backward, clipping, AdamW) of the tiny model, ours against transformers.

The tiny model (configs/model/mimo_tiny.yaml) is built with `mtp.num_blocks=0`, since transformers'
`MiMoV2FlashForCausalLM` has no MTP, and exported with `mimo_train.interop.hf.save_hf`. Both implementations then load
that same export (ours with `hf.load_pretrained`, transformers with `from_pretrained(attn_implementation="eager",
dtype=float32)`, its experts with its default implementation), so the weights are identical; they get the same
batch (random tokens, B x S) and the same optimizer (`mimo_train.training.trainer.build_optimizer` with the CPU demo's train
settings, gradient clipping at its clip_grad). The loss is the mean next-token cross-entropy for both (transformers
has no balance loss; ours still computes its balance-loss statistics in the forward, and that time is included).

Each implementation runs in a fresh subprocess, so its memory is measured alone: the peak RSS growth of its first
step is `ru_maxrss` after the step minus the resident size just before it (the first step also allocates the
AdamW moments, the same size for both). The step time is the median of the following steps. The two first-step
losses are printed with their difference: the comparison is of the same computation.

Run from the checkout: ``python -m bench.train_step``. The last line is
``RESULT train_step ratio=<HF time / ours> mem_ratio=<HF peak growth / ours> ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench.common first: it sets OMP_WAIT_POLICY before torch loads OpenMP.
from bench.common import current_rss_bytes, machine_note, mib, peak_rss_bytes, result_line, set_threads  # noqa: I001

import torch

from data_pipeline.labels import IGNORE_INDEX


REPO = Path(__file__).resolve().parent.parent
MODEL_CONFIG = REPO / "configs/model/mimo_tiny.yaml"
TRAIN_CONFIG = REPO / "configs/train/tiny_cpu.yaml"


def export_tiny_model(out_dir: str | Path, seed: int = 0) -> None:
    """The tiny model without MTP, randomly initialised, written in the Hub layout transformers loads."""
    from mimo_train.interop import hf
    from mimo_train.config import load_model_config
    from mimo_train.model import MiMoForCausalLM

    cfg = load_model_config(MODEL_CONFIG, ["model.mtp.num_blocks=0"])
    torch.manual_seed(seed)
    model = MiMoForCausalLM(cfg)
    model.init_weights(seed=seed)
    hf.save_hf(model, out_dir)


def build_adamw(model: torch.nn.Module, train_cfg) -> tuple[torch.optim.Optimizer, str]:
    """The trainer's single-process optimizer: `mimo_train.training.trainer.build_optimizer` where it exists, else the same
    AdamW built here (no weight decay on vectors; the per-tensor loop, foreach=False)."""
    try:
        from mimo_train.training.trainer import build_optimizer
    except ImportError:
        t = train_cfg.train
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, foreach=False)
        return opt, "torch AdamW (foreach=False, no decay on vectors)"
    return build_optimizer(model, train_cfg), "mimo_train.training.trainer.build_optimizer"


def make_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def measure_impl(impl: str, model_dir: str | Path, batch: int, seq_len: int, steps: int, threads: int) -> dict:
    """Load `impl` ("ours" or "hf") from the export, run `steps` training steps, return times, losses, memory."""
    from mimo_train.config import load_config

    threads = set_threads(threads)
    train_cfg = load_config(TRAIN_CONFIG)
    if impl == "ours":
        from mimo_train.interop.hf import load_pretrained

        model = load_pretrained(model_dir)
        vocab = model.cfg.vocab_size
        ids = make_batch(vocab, batch, seq_len)
        labels = torch.cat([ids[:, 1:], torch.full((batch, 1), IGNORE_INDEX)], dim=1)  # next tokens

        def loss_fn():
            out = model(ids, labels=labels, return_logits=False)
            return out.lm_loss_sum / out.lm_tokens
        detail = "ours: torch kernel backend"
    elif impl == "hf":
        from transformers import MiMoV2FlashForCausalLM

        model = MiMoV2FlashForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
        vocab = model.config.vocab_size
        ids = make_batch(vocab, batch, seq_len)

        def loss_fn():
            return model(input_ids=ids, labels=ids, use_cache=False).loss  # transformers shifts the labels
        detail = (f"hf: attn_implementation={model.config._attn_implementation} "
                  f"experts_implementation={model.config._experts_implementation}")
    else:
        raise ValueError(f"impl must be 'ours' or 'hf', got {impl!r}")
    model.train()
    optimizer, optimizer_name = build_adamw(model, train_cfg)
    clip = train_cfg.train.clip_grad if train_cfg.train.clip_grad > 0 else float("inf")

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        return loss.item()

    rss_before, peak_before = current_rss_bytes(), peak_rss_bytes()
    t0 = time.perf_counter()
    losses = [step()]
    first_time = time.perf_counter() - t0
    peak_after = peak_rss_bytes()
    times = []
    for _ in range(steps - 1):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    return {
        "impl": impl, "detail": detail, "optimizer": optimizer_name, "clip": clip, "threads": threads, "batch": batch, "seq_len": seq_len,
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": statistics.median(times) if times else first_time, "first_step_s": first_time,
        "step_samples": times, "losses": losses,
        "rss_before": rss_before, "peak_before": peak_before, "peak_after": peak_after,
        # A step's own peak shows only if it rises above the old high-water mark; say when it did not.
        "peak_growth": peak_after - rss_before, "peak_valid": peak_after > peak_before,
    }


def run_child(impl: str, model_dir: str, batch: int, seq_len: int, steps: int, threads: int) -> dict:
    """`measure_impl` in a fresh interpreter (clean RSS high-water mark), its result as the last stdout line."""
    cmd = [sys.executable, "-m", "bench.train_step", "--child", impl, "--model-dir", model_dir,
           "--batch", str(batch), "--seq-len", str(seq_len), "--steps", str(steps), "--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def combine(rounds: list[dict]) -> dict:
    """Several fresh-process runs of one implementation: time = median of all timed steps, memory = the largest
    first-step peak growth (first round's losses; every round computes the same ones)."""
    out = dict(rounds[0])
    samples = [t for r in rounds for t in r["step_samples"]]
    if samples:
        out["step_s"] = statistics.median(samples)
    worst = max(rounds, key=lambda r: r["peak_growth"])
    out.update(peak_growth=worst["peak_growth"], peak_valid=all(r["peak_valid"] for r in rounds),
               rounds=len(rounds), step_samples=samples)
    return out


def report(ours: dict, theirs: dict) -> list[str]:
    """The summary lines, the RESULT line last."""
    ratio = theirs["step_s"] / ours["step_s"]
    mem_ratio = theirs["peak_growth"] / max(ours["peak_growth"], 1)
    loss_diff = abs(ours["losses"][0] - theirs["losses"][0])
    n = min(len(ours["losses"]), len(theirs["losses"]))
    traj_diff = max(abs(a - b) for a, b in zip(ours["losses"][:n], theirs["losses"][:n]))
    lines = [
        machine_note(),
        f"tiny model (mtp.num_blocks=0, {ours['params']:,} parameters), batch {ours['batch']} x seq {ours['seq_len']}, "
        f"float32, torch threads {ours['threads']}; {ours['detail']}; {theirs['detail']}; optimizer "
        f"{ours['optimizer']}, clip_grad {ours['clip']}; loss: mean next-token cross-entropy; "
        f"{ours.get('rounds', 1)} fresh process(es) per implementation, alternating; step time = median of "
        f"{len(ours['step_samples'])} timed steps after each process's first",
        f"{'impl':>5} {'step ms':>9} {'1st step ms':>12} {'peak RSS growth MiB':>20} {'first loss':>11}",
    ]
    for r in (ours, theirs):
        flag = "" if r["peak_valid"] else " (below earlier high-water mark: upper bound)"
        lines.append(f"{r['impl']:>5} {r['step_s'] * 1e3:>9.1f} {r['first_step_s'] * 1e3:>12.1f} "
                     f"{mib(r['peak_growth']):>20.1f} {r['losses'][0]:>11.6f}{flag}")
    lines.append(f"first-step loss |ours - hf| = {loss_diff:.2e}; max over {n} steps (after identical AdamW "
                 f"updates) = {traj_diff:.2e}")
    lines.append(f"time ratio (hf / ours) = {ratio:.2f}x, peak-memory ratio (hf / ours) = {mem_ratio:.2f}x")
    lines.append(result_line(
        "train_step", ratio=ratio, mem_ratio=mem_ratio, ours_ms=ours["step_s"] * 1e3, hf_ms=theirs["step_s"] * 1e3,
        ours_peak_mib=mib(ours["peak_growth"]), hf_peak_mib=mib(theirs["peak_growth"]), loss_diff=f"{loss_diff:.2e}",
        seq_len=ours["seq_len"], batch=ours["batch"], threads=ours["threads"], load1=os.getloadavg()[0]))
    return lines


def run(batch: int, seq_len: int, steps: int, threads: int, subprocesses: bool = True, rounds: int = 2) -> list[str]:
    set_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        export_tiny_model(tmp)
        if subprocesses:  # ours, hf, ours, hf, ...: a noisy neighbour slows both alike
            runs = {"ours": [], "hf": []}
            for _ in range(rounds):
                for impl in runs:
                    runs[impl].append(run_child(impl, tmp, batch, seq_len, steps, threads))
            ours, theirs = combine(runs["ours"]), combine(runs["hf"])
        else:  # in-process (tests): times and losses are right, the memory figures are not isolated
            ours = measure_impl("ours", tmp, batch, seq_len, steps, threads)
            theirs = measure_impl("hf", tmp, batch, seq_len, steps, threads)
    lines = report(ours, theirs)
    print("\n".join(lines), flush=True)
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6, help="steps per implementation; the first is not timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per implementation, alternating")
    parser.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = measure_impl(args.child, args.model_dir, args.batch, args.seq_len, args.steps, args.threads)
        print(json.dumps(result), flush=True)
        return
    run(args.batch, args.seq_len, args.steps, args.threads, rounds=args.rounds)


if __name__ == "__main__":
    main()
