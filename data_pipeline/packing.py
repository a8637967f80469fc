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
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100


def windows_to_batch(windows: np.ndarray, eos_ids: np.ndarray) -> dict[str, torch.Tensor]:
    """Model inputs from windows ``[n, seq_len + 1]`` (``eos_ids``: the EOS id of each window's source).

    input_ids are the first seq_len tokens and labels the next token. No loss is taken where the input is EOS:
    the token after it opens another document, which the attention mask keeps out of sight.
    position_ids count tokens since the last document start (window start or the token after an EOS); the
    model reads document boundaries from position_ids == 0.
    """
    windows = np.asarray(windows, dtype=np.int64)
    eos = np.asarray(eos_ids, dtype=np.int64).reshape(-1, 1)
    inputs = windows[:, :-1]
    labels = windows[:, 1:].copy()
    at_eos = inputs == eos
    labels[at_eos] = IGNORE_INDEX

    seq_len = inputs.shape[1]
    columns = np.broadcast_to(np.arange(seq_len, dtype=np.int64), inputs.shape)
    document_start = np.zeros(inputs.shape, dtype=bool)
    document_start[:, 0] = True
    document_start[:, 1:] = at_eos[:, :-1]
    last_start = np.maximum.accumulate(np.where(document_start, columns, 0), axis=1)
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(inputs)),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(columns - last_start),
    }
