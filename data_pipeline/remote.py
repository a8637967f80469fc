"""Shards in an object store (any fsspec filesystem: s3://, gs://, ...): fetched whole into the cache, with retries.

A remote shard is copied once into ``<cache>/remote-shards/<sha256>.tar`` (its name is its verified checksum, so
every process and run of a node shares it) and then read like a local file. A transient read failure is retried
with exponential backoff; one that persists through every attempt raises ``ShardUnavailable``, which the source
handles like a corrupt shard (skipped, counted, reported).
"""

from __future__ import annotations

import hashlib
import os
import time

import fsspec

from .shards import ShardInfo, write_atomically

ATTEMPTS = 4
FIRST_BACKOFF_S = 0.2  # then 0.4, 0.8: about 1.4 s in all before a shard is given up


class ShardUnavailable(Exception):
    """A shard that cannot be used: the reason is the message."""


def read_remote(url: str, *, attempts: int = ATTEMPTS, first_backoff_s: float = FIRST_BACKOFF_S) -> bytes:
    """The bytes of a remote file; transient errors are retried, a missing file is not."""
    for attempt in range(attempts):
        try:
            with fsspec.open(url, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ShardUnavailable("missing") from None
        except Exception as error:  # noqa: BLE001 - connection resets, timeouts, 5xx: each client names them its own way
            if attempt == attempts - 1:
                raise ShardUnavailable(f"unreadable after {attempts} attempts: {error}") from None
            time.sleep(first_backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def cached_remote_shard(url: str, info: ShardInfo, cache_dir: str, verify_checksum: bool) -> str:
    """Local path of a verified copy of a remote shard, fetched on first use."""
    path = os.path.join(cache_dir, "remote-shards", f"{info.sha256}.tar")
    if os.path.exists(path):
        return path
    data = read_remote(url)
    if len(data) != info.filesize:
        raise ShardUnavailable(f"truncated or resized: {len(data)} bytes, manifest says {info.filesize}")
    if verify_checksum and hashlib.sha256(data).hexdigest() != info.sha256:
        raise ShardUnavailable("sha256 mismatch")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, data)
    return path
