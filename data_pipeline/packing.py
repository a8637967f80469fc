"""Packing: how a source's token stream becomes training windows, and how a window becomes model inputs.

Documents are concatenated, each followed by EOS, and the stream is cut into windows of ``seq_len + 1``
tokens with a stride of ``seq_len``: window ``k`` covers stream tokens ``[k*seq_len, (k+1)*seq_len]``. A
window's last token is the next window's first, so every token is an input exactly once and a target
exactly once; nothing is padded or dropped.

A document longer than the rest of a window continues at the start of the source's next window. That next
window restarts ``position_ids`` at 0, so the model treats the continuation as a new document: with
document-masked attention it cannot see the part in the previous window (as in Megatron with reset position
ids). A stage boundary behaves the same way: the source's next stage window starts at the first token that
was not yet an input, whatever the new ``seq_len``.

What travels from the host to the training device is only the windows as int32 token ids and each window's EOS
id: 4 bytes per token (plus one per window). Labels and positions are derived from them where the batch lands
(``windows_to_batch`` runs on the device of its input), so the host builds and copies 4 bytes per token instead
of the 24 of three int64 tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from .labels import IGNORE_INDEX  # noqa: F401 (re-exported: the pipeline's labels)


def windows_to_batch(windows, eos_ids) -> dict[str, torch.Tensor]:
    """Model inputs (int64) from windows ``[n, seq_len + 1]`` (``eos_ids``: the EOS id of each window's source).

    Runs on the device of ``windows`` (numpy arrays are taken as CPU tensors). input_ids are the first seq_len
    tokens and labels the next token. No loss is taken where the input is EOS: the token after it opens another
    document, which the attention mask keeps out of sight. position_ids count tokens since the last document
    start (window start or the token after an EOS); the model reads document boundaries from position_ids == 0.
    """
    windows = torch.as_tensor(windows)
    eos = torch.as_tensor(eos_ids, device=windows.device).reshape(-1, 1)
    inputs = windows[:, :-1].long()
    at_eos = inputs == eos
    labels = windows[:, 1:].long().masked_fill(at_eos, IGNORE_INDEX)

    seq_len = inputs.shape[1]
    columns = torch.arange(seq_len, device=windows.device).expand_as(inputs)
    document_start = torch.zeros_like(at_eos)
    document_start[:, 0] = True
    document_start[:, 1:] = at_eos[:, :-1]
    last_start = torch.cummax(torch.where(document_start, columns, 0), dim=1).values
    return {"input_ids": inputs.contiguous(), "labels": labels, "position_ids": columns - last_start}


def documents_bound(windows, eos_ids) -> int:
    """A bound on the document ids of any row of these windows (AttentionMetadata.max_documents: ids lie in
    [0, bound)), read from the host copy before it goes to the device, so it costs no device-to-host sync. A
    document starts at the first input and after every EOS among the inputs but the last; they are numbered from 1
    (0 is kept for a row that starts mid-document). Variable-length attention kernels size their tables by it."""
    windows = torch.as_tensor(windows)
    if windows.device.type != "cpu" or windows.shape[0] == 0:
        return windows.shape[1]  # no host copy to read: the bound that always holds (seq_len + 1)
    # numpy, because this is host arithmetic on host memory, not a read of a device tensor
    inputs, eos = windows[:, :-1].numpy(), torch.as_tensor(eos_ids).numpy().reshape(-1, 1)
    return 2 + int((inputs[:, :-1] == eos).sum(axis=1).max())


def to_device(windows: torch.Tensor, eos_ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The compact form on the training device: pinned memory and an asynchronous copy for CUDA."""
    if device is None or torch.device(device).type == "cpu":
        return windows, eos_ids
    if torch.device(device).type == "cuda":
        windows, eos_ids = windows.pin_memory(), eos_ids.pin_memory()
    return windows.to(device, non_blocking=True), eos_ids.to(device, non_blocking=True)
