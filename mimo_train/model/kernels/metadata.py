"""Per-micro-batch attention metadata: document boundaries, computed once and handed to every layer.

`MiMoForCausalLM.prepare` builds one `AttentionMetadata` per micro-batch; every attention core reads what it
needs from it (the reference reads `doc_ids`; fused kernels read `cu_seqlens` or a block mask), and derived tables
are cached on it, so a 48-layer trunk builds each of them once. Nothing here reads a device value on the host:
there is no device-to-host sync, which is why the variable-length tables have a static size (see `cu_seqlens`).

Context parallelism hands a kernel a chunk of the sequence; `slice` gives the metadata of such a chunk.
"""

from __future__ import annotations

import torch


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Packed documents restart their positions at 0; number the documents of each row from there (a row that
    starts mid-document, at a position other than 0, begins with document 0)."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)


class AttentionMetadata:
    """Document layout of a micro-batch of B rows of S tokens.

    doc_ids [B, S] (None: one document per row, positions 0..S-1). `max_documents` bounds the document ids of a row
    (ids lie in [0, max_documents)) when the caller knows it from the host side (the data loader does). The default
    is what is always correct without reading the device: 1 without document ids (the row is one document), S + 1
    with them (a row of S one-token documents, after a leading partial one). The variable-length tables, and the
    kernels' grids, grow with it: at S = 32k the S + 1 default costs a flash backward tens of GB."""

    def __init__(self, doc_ids: torch.Tensor | None, batch: int, seq_len: int, device,
                 max_documents: int | None = None) -> None:
        self.doc_ids = doc_ids
        self.batch, self.seq_len, self.device = batch, seq_len, torch.device(device)
        if max_documents is None:
            max_documents = 1 if doc_ids is None else seq_len + 1
        self.max_documents = max_documents
        self._cache: dict = {}

    @classmethod
    def from_positions(cls, position_ids: torch.Tensor | None, batch: int, seq_len: int, device,
                       max_documents: int | None = None) -> "AttentionMetadata":
        doc_ids = document_ids(position_ids) if position_ids is not None else None
        return cls(doc_ids, batch, seq_len, device, max_documents)

    def slice(self, start: int, end: int) -> "AttentionMetadata":
        """The metadata of positions [start, end) of every row (a context-parallel chunk)."""
        key = ("slice", start, end)
        if key not in self._cache:
            docs = None
            if self.doc_ids is not None:  # renumbered from the chunk's first document, so ids stay < L + 1
                docs = self.doc_ids[:, start:end]
                docs = docs - docs[:, :1]
            self._cache[key] = AttentionMetadata(docs, self.batch, end - start, self.device,
                                                 min(self.max_documents, end - start + 1))
        return self._cache[key]

    def cached(self, key, build):
        """`build()` once per micro-batch and key (masks, block masks, tables of one kernel)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # ---- variable-length tables (flash / efficient attention) -------------------------------------------------
    def row_document_index(self) -> torch.Tensor:
        """[B, S] int64: a batch-wide document index, row b's documents numbered from b * max_documents."""
        def build():
            docs = self.doc_ids if self.doc_ids is not None else torch.zeros(  # document 0 of each row
                self.batch, self.seq_len, dtype=torch.int32, device=self.device)
            rows = torch.arange(self.batch, device=self.device).view(-1, 1) * self.max_documents
            return docs.long() + rows
        return self.cached("row_document_index", build)

    def cu_seqlens(self, start: int = 0) -> torch.Tensor:
        """int32 [B * max_documents + 1]: cumulative document lengths of positions [start, S) of the B rows laid
        end to end, with a static size (empty documents repeat the previous offset), so no document count is read
        to the host. Varlen kernels take it with max_seqlen = S. The numbering is the same for every `start`, so
        queries of a chunk ending at S (start > 0) and their keys (start = 0) pair document by document."""
        def build():
            n = self.batch * self.max_documents
            index = self.row_document_index()[:, start:].reshape(-1)
            lengths = torch.zeros(n, dtype=torch.int32, device=self.device)
            lengths.scatter_add_(0, index, torch.ones_like(index, dtype=torch.int32))
            return torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        return self.cached(("cu_seqlens", start), build)
