"""Helpers shared by the benchmarks: thread setup, median timing, peak-RSS reading, RESULT-line formatting."""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP workers sleep instead of spinning. On a small machine shared with other
# jobs, spinning workers of a 2-thread pool fight the neighbours for the cores and a step can take 5-20x longer;
# passive waiting costs little when the machine is quiet. Applies to ours and the reference alike; an explicit
# OMP_WAIT_POLICY in the environment wins. (Import this module before torch for it to take effect.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import re  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

RESULT_RE = re.compile(r"^RESULT (?P<name>[a-z_]+)(?P<fields>( [a-z0-9_]+=[^ ]+)+)$")


def set_threads(threads: int) -> int:
    """Pin torch's intra-op threads (the reference and ours always run with the same count) and return it."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine_note() -> str:
    """Threads, OpenMP wait policy and the machine's load (other jobs skew timings; the ratios less so, since
    ours and the reference are interleaved or run back to back)."""
    load1, load5, _ = os.getloadavg()
    return (f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}, "
            f"{os.cpu_count()} CPUs, load average {load1:.2f} (1 min) {load5:.2f} (5 min)")


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of `fn` in seconds over `repeats` calls after `warmup` untimed ones (and all samples)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """High-water resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def result_line(name: str, **fields) -> str:
    """`RESULT <name> k=v ...`: floats with 3 significant decimals, everything else as str (no spaces)."""
    parts = []
    for key, value in fields.items():
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        if " " in text:
            raise ValueError(f"RESULT field {key}={text!r} contains a space")
        parts.append(f"{key}={text}")
    return f"RESULT {name} " + " ".join(parts)


def parse_result(line: str) -> tuple[str, dict[str, str]]:
    """Split a RESULT line into (name, {field: value}); raises ValueError when it is not well-formed."""
    m = RESULT_RE.match(line.strip())
    if not m:
        raise ValueError(f"not a RESULT line: {line!r}")
    fields = dict(item.split("=", 1) for item in m.group("fields").split())
    return m.group("name"), fields


def mib(nbytes: float) -> float:
    return nbytes / 2**20
