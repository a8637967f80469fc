"""The on-disk format: webdataset tar shards of tokenized documents, and the manifest that indexes them.

A shard is a plain (uncompressed) tar written by ``webdataset.TarWriter``: one member ``<key>.tokens.bin`` per
document, holding its token ids as little-endian uint32 (the real MiMo vocabulary does not fit in 16 bits).
Any tar tool and the upstream ``webdataset`` reader can read it; ``np.frombuffer(sample["tokens.bin"], "<u4")``
decodes a document.

``manifest.json`` sits next to the shards. It is a wids dataset descriptor (``wids_version``/``shardlist`` with
``url`` and ``nsamples``), extended with what the stream needs to address tokens without reading them: per shard
the number of documents and tokens, its size and its sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import webdataset as wds
from wids.wids import IndexedTarSamples

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mimo-train/tokenized-documents/v1"
TOKEN_MEMBER = "tokens.bin"
TOKEN_DTYPE = np.dtype("<u4")


@dataclass
class ShardInfo:
    url: str  # relative to the manifest's directory
    nsamples: int  # documents (wids calls them samples)
    tokens: int  # token ids in the documents, not counting the EOS the stream inserts between them
    filesize: int
    sha256: str


@dataclass
class Manifest:
    shards: list[ShardInfo]
    eos_id: int
    tokenizer: dict  # {"sha256": ..., "vocab_size": ..., "file": ...}: which tokenizer produced the ids

    def to_json(self) -> str:
        document = {
            "wids_version": 1,
            "format": MANIFEST_FORMAT,
            "token_member": TOKEN_MEMBER,
            "token_dtype": "uint32-le",
            "eos_id": self.eos_id,
            "tokenizer": self.tokenizer,
            "documents": sum(s.nsamples for s in self.shards),
            "tokens": sum(s.tokens for s in self.shards),
            "shardlist": [asdict(s) for s in self.shards],
        }
        return json.dumps(document, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        document = json.loads(text)
        if document.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{where}: not a mimo-train token manifest (format={document.get('format')!r})")
        shards = [ShardInfo(**{k: s[k] for k in ShardInfo.__dataclass_fields__}) for s in document["shardlist"]]
        return cls(shards=shards, eos_id=int(document["eos_id"]), tokenizer=document.get("tokenizer", {}))


def join_url(directory: str, name: str) -> str:
    """Join a shard name to a local directory or an fsspec URL (URLs always use '/')."""
    if "://" in directory:
        return posixpath.join(directory, name)
    return os.path.join(directory, name)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def read_manifest(directory: str) -> Manifest:
    url = join_url(directory, MANIFEST_NAME)
    try:
        with fsspec.open(url, "rt") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"no {MANIFEST_NAME} in {directory!r}: run `mimo-train prepare-data` first") from None
    return Manifest.from_json(text, url)


def write_atomically(path: str, data: bytes) -> None:
    """Write a file so that readers see either nothing or all of it (rename is atomic on POSIX)."""
    partial = f"{os.path.dirname(path) or '.'}/.{os.path.basename(path)}.partial-{os.getpid()}"
    with open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def write_token_shard(path: str, documents: Iterable[np.ndarray]) -> ShardInfo:
    """Write one shard of tokenized documents; the shard appears under ``path`` only once it is complete."""
    buffer = io.BytesIO()
    n_docs = n_tokens = 0
    # mtime=0 makes the bytes (and so the sha256) a function of the content: a rerun reproduces the shard
    with wds.TarWriter(buffer, mtime=0) as writer:
        for tokens in documents:
            tokens = np.asarray(tokens)
            writer.write({"__key__": f"doc{n_docs:08d}", TOKEN_MEMBER: tokens.astype(TOKEN_DTYPE).tobytes()})
            n_docs += 1
            n_tokens += len(tokens)
    data = buffer.getvalue()
    write_atomically(path, data)
    return ShardInfo(
        url=os.path.basename(path), nsamples=n_docs, tokens=n_tokens, filesize=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


class TokenShard:
    """Random access to the documents of one local shard, by index, without reading the others.

    wids indexes the tar (it walks the 512-byte member headers of an mmap, so it learns every document's size,
    i.e. its token count, without touching the payloads). Payloads are then read straight from that mmap by
    offset, as a zero-copy numpy view: wids' own ``__getitem__`` would copy each document twice (bytes, BytesIO),
    which is the dominant cost when packing windows.
    """

    def __init__(self, path: str, expected_documents: int):
        self._samples = IndexedTarSamples(path=path, expected_size=expected_documents)
        tar = self._samples.reader
        members = []
        for member_indices in self._samples.samples:
            if len(member_indices) != 1:
                raise ValueError(f"{path}: each document must have exactly one member ({TOKEN_MEMBER})")
            name, offset, size = tar.by_index[member_indices[0]]
            if not name.endswith("." + TOKEN_MEMBER) or size % TOKEN_DTYPE.itemsize:
                raise ValueError(f"{path}: unexpected member {name!r} of {size} bytes")
            members.append((offset + 512, size // TOKEN_DTYPE.itemsize))  # payload follows its 512-byte header
        table = np.array(members, dtype=np.int64).reshape(-1, 2)
        self._payload_offsets = table[:, 0]
        self.document_lengths = table[:, 1]
        self._buffer = memoryview(tar.mmapped_file)

    def document(self, index: int) -> np.ndarray:
        start = int(self._payload_offsets[index])
        return np.frombuffer(self._buffer, dtype=TOKEN_DTYPE, count=int(self.document_lengths[index]), offset=start)

    def close(self) -> None:
        try:
            self._buffer.release()
            self._samples.close()
        except BufferError:
            pass  # a caller still holds a view of a document; the mmap is freed with the last view
