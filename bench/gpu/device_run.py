"""`python -m bench.gpu.device_run --out DIR` (through bench/gpu/device_run.sh): everything a first GPU window
should do, in one command that fits the window and loses nothing when it is cut short.

Parts, in order, each a process of its own (a CUDA error or a hang in one cannot take the others down):
  env             bench/gpu/device_check.py: CUDA, capability, C compiler and Python.h for Triton, free memory
  tests_kernels   pytest tests/gpu/test_gpu_kernels.py (the fused kernels and FP8 GEMMs against references)
  tests_training  pytest tests/gpu/test_gpu_training.py (training runs on synthetic batches, collectives)
  bench           python -m bench.gpu (every section, or --sections)

Before a part starts its estimate is printed (bench/gpu/estimates.py: how each is made); the run has a total
budget (--budget, 480 s: 8 minutes) and each part a time limit (twice its estimate, at most what is left); a part
that no longer fits is deferred. What comes back, all in DIR (six files, no sub-folders):
  device_run.log  everything every part printed
  parts.jsonl     one line per part as it ends (estimate, limit, seconds, exit status, outcome), then a summary line
                  with the command that runs what did not finish
  env.json        the environment check
  tests.jsonl     one line per test as it ends (pytest, both test parts)
  bench_gpu.json, bench_gpu_calibration.json   the benchmark, rewritten after every section
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.gpu.estimates import BENCH_SECTION_SECONDS, PART_SECONDS, PROCESS_S

REPO = Path(__file__).resolve().parents[2]
PARTS = ("env", "tests_kernels", "tests_training", "bench")
BENCH_SECTIONS = tuple(BENCH_SECTION_SECONDS)
TEST_FILES = {"tests_kernels": "tests/gpu/test_gpu_kernels.py", "tests_training": "tests/gpu/test_gpu_training.py"}
PYTEST_NO_TESTS = 5  # pytest's exit status when nothing was collected (or everything was deselected)


def part_command(part: str, out: Path, sections: tuple[str, ...]) -> list[str]:
    py = sys.executable
    if part == "env":
        return [py, "-m", "bench.gpu.device_check", "--out", str(out)]
    if part in TEST_FILES:  # -p no:cacheprovider: nothing written into the source tree
        return [py, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", TEST_FILES[part]]
    return [py, "-m", "bench.gpu", "--out", str(out), "--only", *sections]


def estimate(part: str, sections: tuple[str, ...]) -> int:
    if part == "bench":
        return round(PROCESS_S + sum(BENCH_SECTION_SECONDS[s] for s in sections))
    return PART_SECONDS[part]


def outcome(part: str, rc: int | None, cuda: bool) -> str:
    """What a part's exit status means. pytest's 5 (no tests ran) is a failure where CUDA is present (the GPU tests
    were deselected or not found), and the expected result on a CPU."""
    if rc is None:
        return "timeout"
    if part in TEST_FILES and rc == PYTEST_NO_TESTS:
        return "failed_no_tests_ran" if cuda else "deselected"
    if part == "env" and rc == 1:
        return "incomplete_environment"  # named in env.json; the other parts still run and show what it costs
    return "passed" if rc == 0 else "failed"


def run_part(cmd: list[str], limit: float, log, env: dict) -> int | None:
    """Run `cmd`, copying its output to stdout and the log as it comes; None when it ran past `limit` seconds
    (then its whole process group is stopped)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)

    def copy():
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        rc = None
    reader.join(timeout=5)
    return rc


def unfinished_sections(out: Path, ran: tuple[str, ...]) -> list[str]:
    """The bench sections of this run with no "ok" in bench_gpu.json (failed, cut short or never started)."""
    try:
        done = json.loads((out / "bench_gpu.json").read_text()).get("sections", {})
    except (OSError, ValueError):
        done = {}
    return [s for s in ran if done.get(s, {}).get("status") != "ok"]


def rerun_command(out: Path, parts: list[str], sections: list[str]) -> str | None:
    if not parts:
        return None
    cmd = f"bash bench/gpu/device_run.sh {out} --parts {' '.join(parts)}"
    if "bench" in parts and sections:
        cmd += f" --sections {' '.join(sections)}"
    budget = sum(estimate(p, tuple(sections)) for p in parts)
    return f"{cmd} --budget {max(60, budget)}"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu.device_run", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="results folder (on the device: $OUT)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="the parts to run, in order")
    ap.add_argument("--sections", nargs="+", choices=BENCH_SECTIONS, default=list(BENCH_SECTIONS),
                    help="the benchmark's sections (part bench)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sections = tuple(s for s in BENCH_SECTIONS if s in args.sections)
    env = {**os.environ, "MIMO_TEST_LOG": str(out / "tests.jsonl"), "PYTHONUNBUFFERED": "1"}
    cuda = _has_cuda()
    start, not_done, failed = time.monotonic(), [], False
    with open(out / "device_run.log", "a") as log, open(out / "parts.jsonl", "a") as parts_log:
        for part in [p for p in PARTS if p in args.parts]:
            left = args.budget - (time.monotonic() - start)
            guess = estimate(part, sections)
            limit = min(left, max(2 * guess, guess + 60))
            record = {"part": part, "estimate_s": guess, "limit_s": round(limit)}
            if left < guess / 2:
                print(f"device_run: {part}: estimate {guess} s, {left:.0f} s left: deferred", flush=True)
                status, rc, wall = "deferred", None, 0.0
            else:
                banner = f"device_run: {part}: estimate {guess} s (limit {limit:.0f} s, {left:.0f} s left)\n"
                sys.stdout.write(banner)
                log.write(banner)
                t0 = time.monotonic()
                rc = run_part(part_command(part, out, sections), limit, log, env)
                wall, status = time.monotonic() - t0, outcome(part, rc, cuda)
            record.update(seconds=round(wall, 1), rc=rc, status=status)
            parts_log.write(json.dumps(record) + "\n")
            parts_log.flush()
            print(f"device_run: {part}: {status} in {wall:.0f} s", flush=True)
            if part == "bench" and status not in ("deferred",):
                left_over = unfinished_sections(out, sections)
                if left_over:
                    not_done.append(part)
            elif status in ("deferred", "timeout"):
                not_done.append(part)
            failed |= status not in ("passed", "deselected")
            if part == "env" and rc == 2:
                print("device_run: no CUDA device: nothing else can run here", flush=True)
                break
        bench_left = unfinished_sections(out, sections) if "bench" in args.parts else []
        rerun = rerun_command(args.out, not_done, bench_left)
        summary = {"part": "summary", "seconds": round(time.monotonic() - start, 1), "not_finished": not_done,
                   "bench_sections_not_ok": bench_left, "rerun": rerun}
        parts_log.write(json.dumps(summary) + "\n")
    print(f"device_run: done in {summary['seconds']:.0f} s; " +
          (f"to finish: {rerun}" if rerun else "every part finished"), flush=True)
    return 1 if failed else 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
