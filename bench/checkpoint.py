"""Benchmark: checkpoint save and load throughput against raw file I/O, and the stall of an asynchronous save.

1. Throughput. A synthetic model of the MiMo structure (the tiny config widened: hidden 512, vocab 8192; about
   34M parameters) with its AdamW state after one step, about 390 MiB of tensors, is saved with
   `mimo_train.training.checkpoint.save_checkpoint` (DCP plus the atomic publish) and loaded back in place with
   `load_checkpoint`. The reference, in the same directory on the same disk and interleaved with ours, writes the
   same number of bytes to one file with `write` + `fsync` (+ fsync of the directory, as our publish does) and
   reads them back with `readinto` into a preallocated buffer. Both reads come right after the writes, so they are
   served by the page cache (nothing is dropped): the load figures are memory-copy speeds, not disk speeds.
   ratio = our bytes/s over raw bytes/s (1.0 means no overhead). The checksum (`ckpt.Checksum`, xxh3-64 or
   crc32, computed while writing) is timed on its own over the same bytes in memory: `checksum_frac` is that time
   over the whole save, the share of the write it costs; `verify_frac` is `ckpt.verify` (read back + checksum,
   done before every load and included in the load figure) over the load.

2. Asynchronous save. `torch.distributed.checkpoint.async_save` of the tiny model's training state (model and
   AdamW, configs/model/mimo_tiny.yaml with its MTP block) between training steps of that model (the CPU demo's
   batch: 8 x 256 tokens, one forward/backward, AdamW). A one-rank gloo process group is started on localhost (the
   process-based executor needs it). The training stall is the time `async_save` blocks the training loop
   (staging a CPU copy of the state, handing it to the writer), as a fraction of one step; the steps that run
   while the writer works in the background are timed too (on two cores the writer competes with training).
   The saved tensors are checked against a copy taken at the time of the save. `mimo_train.training.checkpoint` has no
   asynchronous path yet: this measures DCP's, which it would use (the publish would follow the future).

Run from the checkout: ``python -m bench.checkpoint``. The last line is
``RESULT checkpoint ratio=<save ratio> load_ratio=<...> async_stall_frac=<...> ...``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

# bench.common first: it sets OMP_WAIT_POLICY before torch loads OpenMP.
from bench.common import machine_note, mib, result_line, set_threads  # noqa: I001

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from data_pipeline.labels import IGNORE_INDEX
from mimo_train.training import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent
MODEL_CONFIG = REPO / "configs/model/mimo_tiny.yaml"
TRAIN_CONFIG = REPO / "configs/train/tiny_cpu.yaml"
WIDE = ["model.hidden_size=512", "model.vocab_size=8192", "model.moe_intermediate_size=128",
        "model.intermediate_size=1536"]
# A single-process dcp.save/load without a process group says so on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


# ---- a model, its optimizer and a training step ----------------------------------------------------------------


class TinyTraining:
    """Our model and AdamW (the trainer's single-process settings) with a fixed random batch."""

    def __init__(self, overrides=(), batch=8, seq_len=256, seed=0) -> None:
        from mimo_train.config import load_config, load_model_config
        from mimo_train.model import MiMoForCausalLM

        self.cfg = load_model_config(MODEL_CONFIG, list(overrides))
        self.train_cfg = load_config(TRAIN_CONFIG).train
        torch.manual_seed(seed)
        self.model = MiMoForCausalLM(self.cfg)
        self.model.init_weights(seed=seed)
        t = self.train_cfg
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, foreach=False)
        gen = torch.Generator().manual_seed(seed + 1)
        self.ids = torch.randint(0, self.cfg.vocab_size, (batch, seq_len), generator=gen)
        self.labels = torch.cat([self.ids[:, 1:], torch.full((batch, 1), IGNORE_INDEX)], dim=1)

    def step(self) -> float:
        t = self.train_cfg
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(self.ids, labels=self.labels, return_logits=False)
        loss = out.lm_loss_sum / out.lm_tokens
        if out.mtp_loss_sums:
            mtp = torch.stack([s / n for s, n in zip(out.mtp_loss_sums, out.mtp_tokens)]).mean()
            loss = loss + t.mtp_loss_weight * mtp
        loss = loss + t.aux_loss_coeff * out.aux_loss_sum / self.ids.shape[0]
        loss.backward()
        for p in self.model.parameters():  # an expert that got no token still takes an AdamW step
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad)
        self.optimizer.step()
        return loss.item()

    def state(self) -> dict:
        """The DCP state dict the trainer checkpoints: model and optimizer, keyed by parameter names."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optim_state}


def tensors_of(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in tensors_of(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in tensors_of(v)]
    return []


def state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(state))


def snapshot(state):
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: snapshot(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(v) for v in state)
    return state


def max_abs_diff(a, b) -> float:
    return max(((x.float() - y.float()).abs().max().item() if x.numel() else 0.0)
               for x, y in zip(tensors_of(a), tensors_of(b)))


# ---- 1. throughput ---------------------------------------------------------------------------------------------


def raw_write(path: Path, tensors: list[torch.Tensor]) -> int:
    """The same bytes, written sequentially to one file, fsynced (file and directory)."""
    n = 0
    with open(path, "wb") as f:
        for t in tensors:
            n += f.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    ckpt._fsync_dir(path.parent)  # the raw write pays the same directory fsync as ours
    return n


def raw_read(path: Path, buffer: bytearray) -> int:
    view, n = memoryview(buffer), 0
    with open(path, "rb", buffering=0) as f:
        while n < len(buffer):
            got = f.readinto(view[n:])
            if not got:
                break
            n += got
    return n


def time_checksum(path: Path) -> float:
    """Seconds the write-time checksum takes over a checkpoint's bytes (read into memory first, outside the
    timing): the CPU work `ChecksummingFileSystem` adds to a save."""
    blobs = [p.read_bytes() for p in sorted(path.iterdir()) if p.name != ckpt.META]
    t0 = time.perf_counter()
    for blob in blobs:
        h = ckpt.Checksum(ckpt.ChecksummingFileSystem.algorithm)
        h.update(blob)
        h.hexdigest()
    return time.perf_counter() - t0


def measure_throughput(training: TinyTraining, workdir: Path, repeats: int) -> dict:
    state = training.state()
    tensors = tensors_of(state)
    nbytes = state_bytes(state)
    meta = {"bench": True}
    root = workdir / "checkpoints"
    raw_path = workdir / "raw.bin"
    buffer = bytearray(nbytes)  # allocated (and zero-filled) once, outside the timing
    save_s, load_s, raw_w_s, raw_r_s, ckpt_files, checksum_s, verify_s = [], [], [], [], 0, [], []
    for i in range(repeats):
        # Interleaved, so that a noisy neighbour on the machine slows both alike.
        t0 = time.perf_counter()
        path = ckpt.save_checkpoint(root, i + 1, state, meta)
        save_s.append(time.perf_counter() - t0)
        ckpt_files = sum(p.stat().st_size for p in path.iterdir())
        checksum_s.append(time_checksum(path))
        t0 = time.perf_counter()
        written = raw_write(raw_path, tensors)
        raw_w_s.append(time.perf_counter() - t0)
        assert written == nbytes, (written, nbytes)

        t0 = time.perf_counter()
        ckpt.load_checkpoint(path, state)
        load_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert ckpt.verify(path) is None
        verify_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        got = raw_read(raw_path, buffer)
        raw_r_s.append(time.perf_counter() - t0)
        assert got == nbytes, (got, nbytes)
        for old in ckpt.list_checkpoints(root)[:-1]:  # keep the disk footprint at one checkpoint
            shutil.rmtree(old)
    med = statistics.median
    out = {"bytes": nbytes, "ckpt_file_bytes": ckpt_files,
           "save_s": med(save_s), "raw_write_s": med(raw_w_s), "load_s": med(load_s), "raw_read_s": med(raw_r_s)}
    out["save_ratio"] = out["raw_write_s"] / out["save_s"]  # = (bytes / save_s) / (bytes / raw_write_s)
    out["load_ratio"] = out["raw_read_s"] / out["load_s"]
    out["checksum_frac"] = med(checksum_s) / out["save_s"]
    out["verify_frac"] = med(verify_s) / out["load_s"]
    shutil.rmtree(root, ignore_errors=True)
    raw_path.unlink(missing_ok=True)
    return out


# ---- 2. asynchronous save --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_rank_group() -> None:
    """A one-rank gloo group on localhost (env:// rendezvous; the process-based DCP executor reads MASTER_*)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=120))


def measure_async(training: TinyTraining, workdir: Path, mode: str, saves: int, baseline_step_s: float,
                  max_overlap_steps: int = 50) -> dict:
    """Each save: the time async_save blocks the loop, then training steps until the writer finishes."""
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    kind = AsyncCheckpointerType.PROCESS if mode == "process" else AsyncCheckpointerType.THREAD
    records = []
    for i in range(saves):
        state = training.state()
        expected = snapshot(state)  # what the checkpoint must hold: the state at the time of the save
        path = workdir / f"async_{mode}_{i}"
        t0 = time.perf_counter()
        future = dcp.async_save(state, checkpoint_id=str(path), async_checkpointer_type=kind)
        stall = time.perf_counter() - t0
        if hasattr(future, "upload_completion"):  # AsyncSaveResponse (async staging); not the default
            future = future.upload_completion
        overlap = []
        while not future.done() and len(overlap) < max_overlap_steps:
            s0 = time.perf_counter()
            training.step()  # modifies the live parameters and moments in place
            overlap.append(time.perf_counter() - s0)
        w0 = time.perf_counter()
        future.result()
        wait = time.perf_counter() - w0
        background = stall + sum(overlap) + wait
        fresh = snapshot(state)
        dcp.load(fresh, checkpoint_id=str(path))
        records.append({"stall_s": stall, "overlap_steps": len(overlap), "overlap_step_s": overlap,
                        "wait_s": wait, "background_s": background,
                        "saved_vs_snapshot": max_abs_diff(fresh, expected),
                        # the parameters training moved meanwhile (the checkpoint must not follow them)
                        "live_vs_snapshot": max_abs_diff(state["model"], expected["model"])})
        shutil.rmtree(path, ignore_errors=True)
    steady = records[-1]
    extra = sum(s - baseline_step_s for s in steady["overlap_step_s"])
    return {"mode": mode, "records": records, "stall_s": steady["stall_s"],
            "stall_frac": steady["stall_s"] / baseline_step_s, "first_stall_s": records[0]["stall_s"],
            "overlap_steps": steady["overlap_steps"],
            "overlap_extra_frac": extra / baseline_step_s,
            "background_s": steady["background_s"], "wait_s": steady["wait_s"],
            "saved_vs_snapshot": max(r["saved_vs_snapshot"] for r in records),
            "live_vs_snapshot": min(r["live_vs_snapshot"] for r in records)}


def measure_step(training: TinyTraining, repeats: int) -> float:
    training.step()  # warm-up (and creates the AdamW moments)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        training.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- the run ---------------------------------------------------------------------------------------------------


def run(workdir: str | None = None, threads: int = 2, repeats: int = 3, overrides=tuple(WIDE),
        tiny_batch: int = 8, tiny_seq_len: int = 256, step_repeats: int = 5, saves: int = 2,
        modes=("thread", "process")) -> list[str]:
    threads = set_threads(threads)
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_", dir=workdir) as tmp:
        tmp = Path(tmp)
        say(machine_note())
        say(f"directory {tmp} (same disk for ours and raw)")
        # 1. throughput
        big = TinyTraining(overrides, batch=1, seq_len=64)
        big.step()  # AdamW moments exist after one step
        tp = measure_throughput(big, tmp, repeats)
        nparams = sum(p.numel() for p in big.model.parameters())
        del big
        say(f"state: {nparams / 1e6:.1f}M parameters + AdamW moments = {mib(tp['bytes']):.1f} MiB of tensors "
            f"({mib(tp['ckpt_file_bytes']):.1f} MiB of checkpoint files); median of {repeats}, ours and raw interleaved")
        say(f"{'':<6} {'ours s':>8} {'ours MiB/s':>11} {'raw s':>8} {'raw MiB/s':>10} {'ratio':>6}")
        for what, ours_s, raw_s, ratio in (("save", tp["save_s"], tp["raw_write_s"], tp["save_ratio"]),
                                           ("load", tp["load_s"], tp["raw_read_s"], tp["load_ratio"])):
            say(f"{what:<6} {ours_s:>8.3f} {mib(tp['bytes']) / ours_s:>11.0f} {raw_s:>8.3f} "
                f"{mib(tp['bytes']) / raw_s:>10.0f} {ratio:>6.2f}")
        say("save: DCP + meta.json + atomic rename, all fsynced, vs write+fsync of the same bytes; load: DCP load "
            "in place vs readinto. Reads follow the writes, so both are served from the page cache (not dropped).")
        say(f"checksum ({ckpt.ChecksummingFileSystem.algorithm}, computed while writing): "
            f"{100 * tp['checksum_frac']:.1f}% of the save time; verification before a load (read back + checksum): "
            f"{100 * tp['verify_frac']:.1f}% of the load time")

        # 2. async save
        tiny = TinyTraining((), batch=tiny_batch, seq_len=tiny_seq_len)
        step_s = measure_step(tiny, step_repeats)
        state_mib = mib(state_bytes(tiny.state()))
        t0 = time.perf_counter()
        ckpt.save_checkpoint(tmp / "sync", 1, tiny.state(), {"bench": True})
        sync_s = time.perf_counter() - t0
        say(f"tiny model training step ({tiny_batch} x {tiny_seq_len} tokens, MTP 1): {step_s * 1e3:.0f} ms "
            f"(median of {step_repeats}); its state {state_mib:.1f} MiB; synchronous save_checkpoint "
            f"{sync_s * 1e3:.0f} ms = {sync_s / step_s:.2f} steps of stall")
        async_results, errors = {}, {}
        own_group = False
        if "process" in modes and not dist.is_initialized():  # the thread executor needs no group
            try:
                init_single_rank_group()
                own_group = True
            except Exception as e:  # noqa: BLE001 - reported, the thread executor may still work
                errors["process_group"] = f"{type(e).__name__}: {e}"
        for mode in modes:
            if mode == "process" and not dist.is_initialized():
                errors[mode] = "needs a process group, which could not be started"
                continue
            try:
                async_results[mode] = measure_async(tiny, tmp, mode, saves, step_s)
            except Exception as e:  # noqa: BLE001 - an executor that cannot run here is reported, not fatal
                errors[mode] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if own_group:
            dist.destroy_process_group()
        say(f"{'async':<8} {'stall ms':>9} {'stall/step':>11} {'1st stall ms':>13} {'bg s':>6} "
            f"{'steps during':>13} {'extra/step':>11} {'saved==snapshot':>16} {'live moved by':>14}")
        for mode, r in async_results.items():
            say(f"{mode:<8} {r['stall_s'] * 1e3:>9.1f} {r['stall_frac']:>11.3f} {r['first_stall_s'] * 1e3:>13.1f} "
                f"{r['background_s']:>6.2f} {r['overlap_steps']:>13} {r['overlap_extra_frac']:>11.2f} "
                f"{str(r['saved_vs_snapshot'] == 0.0):>16} {r['live_vs_snapshot']:>14.1e}")
        for mode, err in errors.items():
            say(f"async {mode}: not measured: {err}")
        say("stall = time async_save blocks the loop (CPU staging copy + hand-off), steady state (the last of "
            f"{saves} saves; '1st' includes starting the executor); 'extra/step' = extra training time, in steps, "
            "of the steps that ran while the writer worked (it shares the cores); 'saved==snapshot': the checkpoint "
            "holds the state as of the save although training moved the live parameters meanwhile ('live moved by', max abs).")

    fields = {"ratio": tp["save_ratio"], "load_ratio": tp["load_ratio"],
              "save_mib_s": mib(tp["bytes"]) / tp["save_s"], "raw_write_mib_s": mib(tp["bytes"]) / tp["raw_write_s"],
              "load_mib_s": mib(tp["bytes"]) / tp["load_s"], "raw_read_mib_s": mib(tp["bytes"]) / tp["raw_read_s"],
              "state_mib": mib(tp["bytes"]), "checksum_frac": tp["checksum_frac"], "verify_frac": tp["verify_frac"]}
    best = min(async_results.values(), key=lambda r: r["stall_frac"]) if async_results else None
    if best is not None:
        fields.update(async_stall_frac=best["stall_frac"], async_mode=best["mode"])
        for mode, r in async_results.items():
            fields[f"stall_frac_{mode}"] = r["stall_frac"]
    else:
        fields.update(async_stall_frac="nan", async_mode="none")
    fields.update(sync_stall_frac=sync_s / step_s, step_ms=step_s * 1e3, threads=threads, load1=os.getloadavg()[0])
    say(result_line("checkpoint", **fields))
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="where to write (a temporary directory under it; default /tmp)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--saves", type=int, default=2, help="async saves per executor; the last is reported")
    parser.add_argument("--modes", default="thread,process", help="async executors to measure")
    args = parser.parse_args(argv)
    run(args.dir, args.threads, args.repeats, saves=args.saves, modes=tuple(args.modes.split(",")))


if __name__ == "__main__":  # DCP's process-based async executor re-imports the main module
    main()
