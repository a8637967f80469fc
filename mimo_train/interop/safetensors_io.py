"""safetensors files read and written one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape, data_offsets}}, padded
with spaces to 8 bytes) and the tensors' bytes back to back. Reading with `readinto` (not a memory map) and
writing from a header computed up front keeps exactly one tensor in memory and no file pages in the process's
resident set, which is what makes conversion at 309B possible on a training node; `safetensors.torch` would need
a whole shard's dict to write one.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SafetensorsFile:
    """The header of one file, and its tensors read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.data_start = 8 + n
        header.pop("__metadata__", None)
        self.entries = {name: (TensorInfo(name, _DTYPES[h["dtype"]], tuple(h["shape"])), h["data_offsets"])
                        for name, h in header.items()}

    def info(self, name: str) -> TensorInfo:
        return self.entries[name][0]

    def read(self, name: str) -> torch.Tensor:
        info, (start, end) = self.entries[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        if end > start:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.data_start + start)
                view = memoryview(out.view(-1).view(torch.uint8).numpy())
                while view:
                    n = f.readinto(view)
                    if not n:
                        raise OSError(f"{self.path}: {name} is truncated")
                    view = view[n:]
        return out


def header_bytes(infos: Iterable[TensorInfo]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in infos:
        header[t.name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_file(path: str | Path, infos: list[TensorInfo], produce: Callable[[TensorInfo], torch.Tensor],
               checksum=None) -> int:
    """Write `infos` in their order, asking `produce` for each tensor just before its bytes are written; the
    bytes pass through `checksum.update` on the way. Returns the file size."""
    size = 0
    with open(path, "wb", buffering=0) as f:
        for chunk in _chunks(infos, produce):
            if checksum is not None:
                checksum.update(chunk)
            while chunk:
                n = f.write(chunk)
                size += n
                chunk = chunk[n:]
    return size


def _chunks(infos: list[TensorInfo], produce):
    yield memoryview(header_bytes(infos))
    for info in infos:
        t = produce(info)
        if t.dtype != info.dtype or tuple(t.shape) != info.shape:
            raise ValueError(f"{info.name}: produced {t.dtype} {tuple(t.shape)}, planned {info.dtype} {info.shape}")
        yield memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())
