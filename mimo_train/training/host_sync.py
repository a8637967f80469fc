"""One device-to-host read per step: the step's small device tensors (the skip decision, the gradient norm, the
loss parts, expert loads, ...) are packed into one float64 vector, copied to the host at once, and handed back by
name. Each separate `.item()` or `.tolist()` would wait for the device on its own."""

from __future__ import annotations

import torch


class HostSync:
    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Read `tensor` (any shape, flattened; exactly representable in float64) with the others."""
        self._tensors[name] = tensor.reshape(-1).double()

    def read(self) -> dict[str, list[float]]:
        """{name: its values}, from one copy of all of them."""
        host = torch.cat(list(self._tensors.values())).tolist()
        values, start = {}, 0
        for name, t in self._tensors.items():
            values[name] = host[start:start + t.numel()]
            start += t.numel()
        return values
