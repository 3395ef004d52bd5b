"""Candidate retrieval for mining: each query's ``depth`` best documents and its positives' scores.

* BM25 (``bm25s``, the analysis and Lucene scoring of ``evaluation.bm25_run``): one query's
  scores over the corpus at a time, so memory holds one corpus-long vector, never Q x N.
  Documents sharing no term with the query (score 0) are not candidates.
* Dense: inner products of L2-normalised embeddings (cosine). ``exact`` ranks with
  ``evaluation.exact_search`` (chunks of queries against chunks of documents: peak memory
  ``query_chunk x doc_chunk`` scores); ``faiss`` with faiss' exact ``IndexFlatIP`` (its BLAS
  kernels, as sentence-transformers' ``use_faiss``); ``faiss-hnsw`` / ``faiss-ivf`` with the
  approximate indexes of ``samtone index``, for corpora too large to scan per query chunk.

BM25 breaks ties by corpus row (the earlier document first); dense search leaves them in the
order ``torch.topk`` or faiss return.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from samtone_ray.evaluation.retrieval import bm25_index, bm25_tokenize, exact_search

DenseSearch = Literal["exact", "faiss", "faiss-hnsw", "faiss-ivf"]
DENSE_SEARCHES: tuple[str, ...] = ("exact", "faiss", "faiss-hnsw", "faiss-ivf")


@dataclass(frozen=True)
class Candidates:
    """Every query's candidates: ``rows[q]`` corpus rows best first (-1 pads a short list),
    ``scores[q]`` their scores (-inf pads), ``positive_scores[q]`` the query's score of each of
    its positives (in the order they were given)."""

    rows: np.ndarray  # [Q, depth] int64
    scores: np.ndarray  # [Q, depth] float32
    positive_scores: list[np.ndarray]

    def of(self, q: int) -> tuple[np.ndarray, np.ndarray]:
        """Query ``q``'s (rows, scores) without the padding."""
        keep = self.rows[q] >= 0
        return self.rows[q][keep], self.scores[q][keep]


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the ``k`` highest ``scores`` by score descending, ties by row: deterministic, O(N)."""
    k = min(k, scores.size)
    if k == 0:
        return np.zeros(0, np.int64)
    part = np.argpartition(-scores, k - 1)[:k]
    floor = scores[part].min()
    above = np.flatnonzero(scores > floor)
    tied = np.flatnonzero(scores == floor)[: k - above.size]  # the lowest rows among the tie at the cut
    picked = np.concatenate([above, tied])
    return picked[np.lexsort((picked, -scores[picked]))]


def bm25_candidates(
    corpus: Sequence[str],
    queries: Sequence[str],
    positives: Sequence[np.ndarray],
    depth: int,
    *,
    k1: float = 0.9,
    b: float = 0.4,
    show_progress: bool = False,
) -> Candidates:
    """BM25 candidates of each query in ``corpus`` (``positives[q]``: corpus rows of query q's positives)."""
    index = bm25_index(list(corpus), k1, b, show_progress=show_progress)
    tokens = bm25_tokenize(list(queries), show_progress=show_progress)
    rows = np.full((len(queries), depth), -1, np.int64)
    scores = np.full((len(queries), depth), -np.inf, np.float32)
    positive_scores = []
    for q, query_tokens in enumerate(tqdm(tokens, desc="bm25 queries", unit="query", disable=not show_progress)):
        # A query made only of stopwords matches nothing (bm25s refuses an empty token list).
        row_scores = index.get_scores(query_tokens) if query_tokens else np.zeros(len(corpus), np.float32)
        best = top_k(row_scores, depth)
        best = best[row_scores[best] > 0]
        rows[q, : best.size], scores[q, : best.size] = best, row_scores[best]
        positive_scores.append(np.asarray(row_scores[positives[q]], np.float32))
    return Candidates(rows, scores, positive_scores)


@torch.no_grad()
def dense_candidates(
    query_emb: torch.Tensor,
    doc_emb: torch.Tensor,
    positives: Sequence[np.ndarray],
    depth: int,
    *,
    search: DenseSearch = "exact",
    query_chunk: int = 256,
    doc_chunk: int = 65536,
    show_progress: bool = False,
) -> Candidates:
    """Dense candidates by inner product of ``query_emb`` [Q, D] with ``doc_emb`` [N, D]."""
    if search not in DENSE_SEARCHES:
        raise ValueError(f"search must be one of {DENSE_SEARCHES}; got {search!r}")
    depth_n = min(depth, doc_emb.shape[0])
    index = None
    if search == "faiss":
        import faiss

        index = faiss.IndexFlatIP(doc_emb.shape[1])
        index.add(np.ascontiguousarray(doc_emb.numpy(), np.float32))
    elif search != "exact":
        from samtone_ray.encode.index import build_faiss

        index, _ = build_faiss(doc_emb, search, {})
    rows = np.full((query_emb.shape[0], depth), -1, np.int64)
    scores = np.full((query_emb.shape[0], depth), -np.inf, np.float32)
    starts = range(0, query_emb.shape[0], query_chunk)
    for start in tqdm(starts, desc="dense top-k", unit="chunk", disable=not show_progress):
        chunk = query_emb[start : start + query_chunk]
        if index is None:
            top_scores, top_rows = exact_search(chunk, doc_emb, depth_n, query_chunk=query_chunk, doc_chunk=doc_chunk)
            top_scores, top_rows = top_scores.numpy(), top_rows.numpy()
        else:
            top_scores, top_rows = index.search(np.ascontiguousarray(chunk.numpy(), np.float32), depth_n)
        rows[start : start + len(chunk), :depth_n] = top_rows
        scores[start : start + len(chunk), :depth_n] = top_scores
    scores[rows < 0] = -np.inf  # faiss pads a short result with row -1
    positive_scores = [
        (doc_emb[torch.as_tensor(pos, dtype=torch.int64)] @ query_emb[q]).numpy() for q, pos in enumerate(positives)
    ]
    return Candidates(rows, scores, positive_scores)
