"""Shard verification without a start-up pass over the corpus.

The stream trusts the manifest (per-shard size, document and token counts, sha256 recorded by prepare-data).
A shard is checked when a process first opens it: its size at once (a stat), its sha256 on that first read.
Verdicts are remembered in a ledger under the cache directory, one small file per (shard, size, mtime), so the
other ranks of a node, the DataLoader workers and every restart reuse them instead of hashing again; one file per
verdict needs no lock, and a changed file gets a new key.

``mimo-train verify-data DIR`` checks a whole corpus ahead of a run (in parallel threads, with a progress bar; with
``--part K/N`` on N machines at once, each taking every N-th shard) and fills the same ledger, so the run then
hashes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import fsspec
from tqdm import tqdm

from .shards import ShardInfo, is_local, join_url, local_path, read_manifest, write_atomically

HASH_BLOCK = 1 << 22


def sha256_of_file(path: str, progress=None) -> str:
    digest = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            digest.update(block)  # hashlib releases the GIL on large blocks: threads hash in parallel
            if progress is not None:
                progress(len(block))
    return digest.hexdigest()


class ChecksumLedger:
    """sha256 verdicts of local shard files, keyed by path, size, modification time and expected checksum."""

    def __init__(self, cache_dir: str | None):
        self.directory = os.path.join(cache_dir, "verified-shards") if cache_dir else None

    def _entry(self, path: str, expected_sha256: str) -> str | None:
        if self.directory is None:
            return None
        stat = os.stat(path)
        name = hashlib.sha256(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{expected_sha256}".encode())
        return os.path.join(self.directory, name.hexdigest()[:32])

    def checksum_problem(self, path: str, expected_sha256: str, progress=None) -> str | None:
        """None if the file's sha256 is the expected one, else the reason; hashes only files not seen before."""
        entry = self._entry(path, expected_sha256)
        if entry is not None and os.path.exists(entry):
            with open(entry) as f:
                return f.read() or None
        problem = None if sha256_of_file(path, progress) == expected_sha256 else "sha256 mismatch"
        if entry is not None:
            os.makedirs(self.directory, exist_ok=True)
            write_atomically(entry, (problem or "").encode())
        return problem


def size_problem(url: str, info: ShardInfo) -> str | None:
    """'missing' or 'truncated or resized' when the file does not have the manifest's size, else None."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        return "missing"
    if size != info.filesize:
        return f"truncated or resized: {size} bytes, manifest says {info.filesize}"
    return None


def shard_problem(url: str, info: ShardInfo, ledger: ChecksumLedger, progress=None) -> str | None:
    """Why a shard cannot be used (missing, wrong size, checksum mismatch), or None if it is sound."""
    problem = size_problem(url, info)
    if problem is not None:
        return problem
    if is_local(url):
        return ledger.checksum_problem(local_path(url), info.sha256, progress)
    return None if sha256_of_file(url, progress) == info.sha256 else "sha256 mismatch"


def verify_directory(directory: str, *, workers: int, cache_dir: str | None, progress: bool = True,
                     part: tuple[int, int] = (0, 1)) -> tuple[int, dict[str, str]]:
    """Check the shards of a source directory (those of ``part`` = (k, n): every n-th from the k-th); returns how
    many were checked and {shard url: problem} for the unusable ones."""
    k, n = part
    fs, path = fsspec.core.url_to_fs(directory)
    if not fs.isdir(path):
        raise ValueError(f"{directory}: no such directory")
    shards = read_manifest(directory).shards[k::n]
    ledger = ChecksumLedger(cache_dir)
    total = sum(s.filesize for s in shards)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"verify-data {directory}", disable=not progress) as bar:
        def check(info: ShardInfo) -> str | None:
            return shard_problem(join_url(directory, info.url), info, ledger, bar.update)

        with ThreadPoolExecutor(max(1, workers)) as pool:
            verdicts = list(pool.map(check, shards))
    return len(shards), {info.url: problem for info, problem in zip(shards, verdicts) if problem is not None}


# ---- command line --------------------------------------------------------------------------------------------

def add_verify_data_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "verify-data", help="check every shard of prepared data directories (size and sha256) ahead of a run",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directories", nargs="+", metavar="DIR", help="shard directories (local or fsspec URLs)")
    parser.add_argument("--workers", type=int, default=max(1, min(16, os.cpu_count() or 1)),
                        help="shards hashed at the same time")
    parser.add_argument("--part", default="0/1", metavar="K/N",
                        help="check only every N-th shard from the K-th (run K = 0..N-1 on N machines)")
    parser.add_argument("--cache-dir", default=None,
                        help="where verdicts are remembered for training runs (default: $MIMO_TRAIN_CACHE; the "
                             "run uses <run.dir>/cache unless data.cache_dir or $MIMO_TRAIN_CACHE say otherwise)")
    parser.set_defaults(func=run_verify_data)
    return parser


def run_verify_data(args) -> int:
    cache_dir = args.cache_dir or os.environ.get("MIMO_TRAIN_CACHE")
    cache_dir = os.path.abspath(cache_dir) if cache_dir else None  # a path typed on the command line
    try:
        k, n = (int(x) for x in args.part.split("/"))
        if not 0 <= k < n:
            raise ValueError
    except ValueError:
        print(f"verify-data: error: --part: must be K/N with 0 <= K < N, got {args.part!r}", file=sys.stderr)
        return 2
    bad_total = 0
    for directory in args.directories:
        try:
            checked, bad = verify_directory(directory, workers=args.workers, cache_dir=cache_dir, progress=True,
                                            part=(k, n))
        except ValueError as error:
            print(f"verify-data: error: {error}", file=sys.stderr)
            return 2
        for url, problem in sorted(bad.items()):
            print(f"verify-data: {directory}: {url}: {problem}")
        print(f"verify-data: {directory}: {checked - len(bad)} of {checked} shards sound"
              + (f" (part {k}/{n})" if n > 1 else ""))
        bad_total += len(bad)
    return 1 if bad_total else 0
