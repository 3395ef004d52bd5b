"""Training pairs in memory: a columnar Arrow table for the whole set, Python lists for a batch.

:class:`PairTable` holds a training set as one ``pyarrow.Table`` (``query``, ``document`` and
optionally ``negatives`` ``list<string>``, ``query_id``, ``doc_id``) plus its duplicate keys.
Put in the Ray object store it is shared, not copied: Arrow and numpy buffers are deserialised as
views of the store's shared memory, so a worker's private memory does not grow with the set
(tests/data/test_pairs.py checks the buffers' addresses; benchmarks/results/pairs_memory.json holds the
measurement against the Python lists it replaced).
A step reads only its batch's rows (:meth:`PairTable.subset`) as :class:`TrainingPairs`.

The duplicate keys (:class:`PairKeys`) are dictionary codes of the texts, computed once per set
with Arrow's hash table in C++: equal texts get equal codes and different texts different codes,
exactly (no hash collisions). Queries have their own code space; documents and hard negatives
share one, because a hard negative is compared with the positive documents.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

# Column types of a pair table; files are cast to these when read.
TABLE_TYPES = {
    "query": pa.string(),
    "document": pa.string(),
    "negatives": pa.list_(pa.string()),
    "query_id": pa.string(),
    "doc_id": pa.string(),
}


@dataclass
class TrainingPairs:
    """Aligned (query, positive document) pairs as Python lists: one batch, or a small hand-made set.

    Item ``i`` is ``(queries[i], documents[i])``; ``negatives[i]`` is that pair's own list of hard
    negative texts (lists may differ in length); ``query_ids[i]`` / ``doc_ids[i]`` name the texts.
    """

    queries: list[str]
    documents: list[str]
    negatives: list[list[str]] | None = None
    query_ids: list[str] | None = None
    doc_ids: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.queries)
        for name in ("documents", "negatives", "query_ids", "doc_ids"):
            column = getattr(self, name)
            if column is not None and len(column) != n:
                raise ValueError(f"TrainingPairs.{name} has {len(column)} items, queries has {n}")

    def __len__(self) -> int:
        return len(self.queries)

    def subset(self, indices: Iterable[int]) -> TrainingPairs:
        """The pairs at ``indices`` (in that order, repeats allowed); negative indices refused."""
        picked = _check_indices(indices, len(self)).tolist()

        def take(column: list | None) -> list | None:
            return None if column is None else [column[i] for i in picked]

        return TrainingPairs(
            queries=take(self.queries),
            documents=take(self.documents),
            negatives=take(self.negatives),
            query_ids=take(self.query_ids),
            doc_ids=take(self.doc_ids),
        )


def _check_indices(indices: Iterable[int], n: int) -> np.ndarray:
    picked = np.asarray(indices.tolist() if isinstance(indices, torch.Tensor) else list(indices), dtype=np.int64)
    bad = picked[(picked < 0) | (picked >= n)]
    if bad.size:
        raise IndexError(f"index {int(bad[0])} out of range for {n} training pairs")
    return picked


@dataclass(frozen=True)
class PairKeys:
    """Duplicate-detection keys of every pair of a set (int64 codes; equal codes = equal texts).

    ``negative_offsets`` [N+1] and ``negative_codes`` [M] hold every pair's hard-negative codes
    in the layout of an Arrow list column: pair ``i``'s are ``codes[offsets[i]:offsets[i+1]]``.
    ``num_negatives`` is how many of them a batch uses (the first K, cycling; see
    ``batching.pick_negatives``), set by :meth:`build`.
    """

    query: np.ndarray  # [N] int64
    doc: np.ndarray  # [N] int64, in the code space of negative_codes
    negative_offsets: np.ndarray | None = None  # [N+1] int64
    negative_codes: np.ndarray | None = None  # [M] int64
    num_negatives: int = 0

    @classmethod
    def build(cls, pairs: PairTable | TrainingPairs, num_negatives: int) -> PairKeys:
        """The keys of ``pairs`` for batches using ``num_negatives`` hard negatives per pair. A
        :class:`PairTable` already holds them (computed once when it was built)."""
        table = PairTable.of(pairs)
        if num_negatives and table.keys.negative_codes is None:
            raise ValueError(f"data.num_hard_negatives={num_negatives} but the training pairs have no negatives")
        return replace(table.keys, num_negatives=num_negatives)

    @classmethod
    def of_table(cls, table: pa.Table) -> PairKeys:
        query = _codes([table.column("query")])[0]
        if "negatives" not in table.column_names:
            return cls(query=query, doc=_codes([table.column("document")])[0])
        lists = table.column("negatives")
        lengths = np.concatenate(
            [np.asarray(pc.list_value_length(c).fill_null(0), dtype=np.int64) for c in lists.chunks] or [[]]
        )
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # flatten() skips the slots of null lists, matching their length 0 above.
        values = pa.chunked_array([c.flatten() for c in lists.chunks], type=pa.string())
        doc, negatives = _codes([table.column("document"), values])
        return cls(query=query, doc=doc, negative_offsets=offsets, negative_codes=negatives)

    def take(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """The keys of the pairs at ``indices``: ``query`` [B], ``doc`` [B] and, with
        ``num_negatives`` K > 0, ``negatives`` [B, K] (each pair's first K, cycling)."""
        idx = np.asarray(indices, dtype=np.int64)
        keys = {"query": torch.from_numpy(self.query[idx]), "doc": torch.from_numpy(self.doc[idx])}
        if self.num_negatives:
            start = self.negative_offsets[idx]
            length = self.negative_offsets[idx + 1] - start
            if (length == 0).any():
                raise ValueError(f"data.num_hard_negatives={self.num_negatives} but a training pair has no negatives")
            slots = start[:, None] + np.arange(self.num_negatives)[None, :] % length[:, None]  # [B, K]
            keys["negatives"] = torch.from_numpy(self.negative_codes[slots])
        return keys


def _codes(columns: list[pa.ChunkedArray]) -> list[np.ndarray]:
    """Dictionary codes (int64) of the texts of ``columns`` in ONE code space, one array per column.

    Arrow encodes a chunked array with a single memo table, so codes agree across chunks; the
    dictionary itself (a copy of the distinct texts) is dropped at once."""
    chunks = [c.cast(pa.string()) for column in columns for c in column.chunks]
    encoded = pa.chunked_array(chunks, type=pa.string()).dictionary_encode()
    flat = np.concatenate([np.asarray(c.indices, dtype=np.int64) for c in encoded.chunks] or [np.zeros(0, np.int64)])
    bounds = np.cumsum([0] + [len(column) for column in columns])
    return [flat[a:b] for a, b in itertools.pairwise(bounds)]


@dataclass(frozen=True)
class PairTable:
    """A whole training set: the Arrow ``table`` and the ``keys`` of its texts, computed once."""

    table: pa.Table
    keys: PairKeys

    @classmethod
    def from_table(cls, table: pa.Table) -> PairTable:
        return cls(table=table, keys=PairKeys.of_table(table))

    @classmethod
    def from_pairs(cls, pairs: TrainingPairs) -> PairTable:
        columns = {"query": pairs.queries, "document": pairs.documents, "negatives": pairs.negatives,
                   "query_id": pairs.query_ids, "doc_id": pairs.doc_ids}
        return cls.from_table(pa.table({k: pa.array(v, TABLE_TYPES[k]) for k, v in columns.items() if v is not None}))

    @classmethod
    def of(cls, pairs: PairTable | TrainingPairs) -> PairTable:
        """``pairs`` as a table (converted when given as Python lists)."""
        return pairs if isinstance(pairs, PairTable) else cls.from_pairs(pairs)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def has_negatives(self) -> bool:
        return "negatives" in self.table.column_names

    def subset(self, indices: Iterable[int]) -> TrainingPairs:
        """The pairs at ``indices`` (in that order, repeats allowed) as Python lists: only these
        rows are copied out of the shared table."""
        picked = _check_indices(indices, len(self))
        names = ("query", "document", "negatives", "query_id", "doc_id")
        got = {k: _take(self.table.column(k), picked) if k in self.table.column_names else None for k in names}
        if got["negatives"] is not None:
            got["negatives"] = [row or [] for row in got["negatives"]]  # a null list: no negatives
        return TrainingPairs(queries=got["query"], documents=got["document"], negatives=got["negatives"],
                             query_ids=got["query_id"], doc_ids=got["doc_id"])

    def to_pairs(self) -> TrainingPairs:
        """Every pair as Python lists (small sets, inspection and tests: a large set does not fit)."""
        return self.subset(range(len(self)))


def _take(column: pa.ChunkedArray, indices: np.ndarray) -> list:
    """``column[indices]`` as Python objects, chunk by chunk: ``ChunkedArray.take`` concatenates
    every chunk first (pyarrow 25), copying the whole column for a batch of 64 rows (measured
    0.5-6 s at 1M documents against ~1 ms this way)."""
    if not len(indices):
        return []
    bounds = np.cumsum([0] + [len(c) for c in column.chunks])
    which = np.searchsorted(bounds, indices, side="right") - 1  # chunk of each index
    order = np.argsort(which, kind="stable")
    pieces = [column.chunk(int(c)).take(pa.array(indices[order[which[order] == c]] - bounds[c]))
              for c in np.unique(which)]
    # The pieces hold the rows grouped by chunk; put them back in the order asked for.
    return pa.concat_arrays(pieces).take(pa.array(np.argsort(order))).to_pylist()
