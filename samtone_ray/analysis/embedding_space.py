"""The SamToNe paper's embedding-space analyses, as pure computations on embedding arrays.

Embeddings are rows of float arrays (numpy); nothing here loads models, reads files or logs.
For rows ``x``, ``y`` (``cos`` is the cosine similarity, ``d2`` the squared Euclidean distance)::

    alignment(X, Y)  = mean_i ||x_i - y_i||_2 ** alpha            over aligned pairs, alpha = 2
    uniformity(X)    = log mean_{i<j} exp(-t ||x_i - x_j||_2 ** 2)  over distinct pairs, t = 2

(Wang & Isola, "Understanding Contrastive Representation Learning through Alignment and
Uniformity on the Hypersphere", ICML 2020: lower is better for both.) Similarity distributions
are the cosines of query-query and document-document pairs (i < j in a sample) and of positive
query-document pairs (qrels relevance > 0). Per query, the *top-1 score* is its best cosine over
the searched corpus and the *gap* is ``top1 - best cosine of its relevant documents`` (>= 0;
exactly 0 when the top-1 document is relevant, since both come from one score matrix).
The 2-D tower-alignment picture is a t-SNE (scikit-learn, fixed seed) of queries and documents
embedded together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SIMILARITY_EDGES = np.linspace(-1.0, 1.0, 201)  # cosines, 0.01 wide
GAP_EDGES = np.linspace(0.0, 2.0, 201)  # top-1 minus relevant cosine, 0.01 wide
QUANTILES = {"p05": 5, "p25": 25, "median": 50, "p75": 75, "p95": 95}


def _rows(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {x.shape}")
    return x


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pairwise_cosines(x: np.ndarray) -> np.ndarray:
    """Cosines of every distinct pair of rows (i < j, row-major order): ``n (n - 1) / 2`` values."""
    u = _unit(_rows(x, "x"))
    i, j = np.triu_indices(u.shape[0], k=1)
    return (u @ u.T)[i, j]


def paired_cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cosine of ``x[i]`` with ``y[i]`` for each row ``i``."""
    x, y = _rows(x, "x"), _rows(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"paired rows must have one shape, got {x.shape} and {y.shape}")
    return np.sum(_unit(x) * _unit(y), axis=1)


def alignment(x: np.ndarray, y: np.ndarray, alpha: float = 2.0) -> float:
    """Wang & Isola's alignment: mean ``||x_i - y_i|| ** alpha`` over the aligned (positive) rows."""
    x, y = _rows(x, "x"), _rows(y, "y")
    if x.shape != y.shape or x.shape[0] == 0:
        raise ValueError(f"alignment needs as many x rows as y rows (at least one), got {x.shape} and {y.shape}")
    return float(np.mean(np.linalg.norm(x - y, axis=1) ** alpha))


def uniformity(x: np.ndarray, t: float = 2.0) -> float:
    """Wang & Isola's uniformity: ``log`` of the mean over distinct pairs of ``exp(-t d2)``."""
    x = _rows(x, "x")
    if x.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 rows, got {x.shape[0]}")
    sq = np.sum(x * x, axis=1)
    i, j = np.triu_indices(x.shape[0], k=1)
    # |x|^2 + |y|^2 - 2 x.y can dip below 0 by rounding for near-identical rows.
    d2 = np.maximum(sq[i] + sq[j] - 2.0 * (x @ x.T)[i, j], 0.0)
    a = -t * d2
    top = a.max()  # log-mean-exp, shifted so exp never underflows to a log of 0
    return float(top + np.log(np.mean(np.exp(a - top))))


def top1_and_relevant(
    query_emb: np.ndarray, doc_emb: np.ndarray, relevant: Sequence[Sequence[int]], *, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Per query: the best inner-product score over all documents and over its relevant ones.

    ``relevant[q]`` lists row indices of ``doc_emb`` (at least one each). Both come from the same
    float32 score rows, so the gap ``top1 - best_relevant`` is never negative by rounding.
    """
    q = np.asarray(query_emb, dtype=np.float32)
    d = np.asarray(doc_emb, dtype=np.float32)
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"query_emb and doc_emb must be [rows, dim] with one dim, got {q.shape} and {d.shape}")
    if len(relevant) != q.shape[0]:
        raise ValueError(f"relevant has {len(relevant)} entries for {q.shape[0]} queries")
    for row, docs in enumerate(relevant):
        if len(docs) == 0:
            raise ValueError(f"query row {row} has no relevant document")
    top1 = np.empty(q.shape[0], dtype=np.float64)
    best = np.empty(q.shape[0], dtype=np.float64)
    for start in range(0, q.shape[0], chunk):
        scores = q[start : start + chunk] @ d.T  # [chunk, N]
        top1[start : start + len(scores)] = scores.max(axis=1)
        for r, row_scores in enumerate(scores):
            best[start + r] = row_scores[np.asarray(relevant[start + r])].max()
    return top1, best


def distribution(values: np.ndarray, edges: np.ndarray) -> dict[str, Any]:
    """Summary of a 1-D sample: count, mean, std, min, quantiles, max and a fixed-edge histogram.

    Values are clipped into ``[edges[0], edges[-1]]`` for the histogram only, so a cosine of
    1 + 1e-7 from float rounding lands in the last bin rather than nowhere.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return {"count": 0}
    counts, _ = np.histogram(np.clip(v, edges[0], edges[-1]), bins=edges)
    out: dict[str, Any] = {"count": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min())}
    out |= {name: float(np.percentile(v, q)) for name, q in QUANTILES.items()}
    out["max"] = float(v.max())
    out["histogram"] = {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
    return out


def tsne_2d(x: np.ndarray, seed: int, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE of the rows of ``x`` (scikit-learn, PCA init, fixed ``random_state``).

    Perplexity is capped at ``(n - 1) / 3`` so small samples still project (t-SNE needs
    perplexity < n); the same input and seed give the same picture. With PCA initialisation the
    seed barely matters; it is fixed so that nothing random is left.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = _rows(x, "x")
    if x.shape[0] < 2:
        raise ValueError(f"t-SNE needs at least 2 points, got {x.shape[0]}")
    perplexity = max(1.0, min(perplexity, (x.shape[0] - 1) / 3))
    # One OpenMP thread: on a busy 2-core machine the Barnes-Hut threads spin-wait on each other
    # (measured: 40 points 15 s with 2 threads, 0.3 s with 1; 1,000 points 75 s vs 22 s), and a
    # single thread sums gradients in one order, so the picture is reproducible.
    with threadpool_limits(1):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


# --------------------------------------------------------------------------------------------
# Which queries and documents an analysis looks at
# --------------------------------------------------------------------------------------------


def positives(qrels: Mapping[str, Mapping[str, int]]) -> dict[str, list[str]]:
    """``query_id -> relevant doc ids`` (relevance > 0), for queries with at least one."""
    out = {qid: [did for did, rel in docs.items() if rel > 0] for qid, docs in qrels.items()}
    return {qid: docs for qid, docs in out.items() if docs}


def analyze_embeddings(
    query_emb: np.ndarray,
    doc_emb: np.ndarray,
    relevant: Sequence[Sequence[int]],
    *,
    pair_queries: int,
    pair_docs: Sequence[int],
    tsne_queries: int,
    tsne_docs: Sequence[int],
    seed: int,
    alpha: float = 2.0,
    t: float = 2.0,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every analysis of one model: ``(summary for JSON, raw values and t-SNE points for plots)``.

    ``query_emb`` rows are the analysed queries in sampled (random) order and ``relevant[q]`` their
    relevant rows of ``doc_emb`` (the searched corpus). Query-query pairs and uniformity use the
    first ``pair_queries`` queries, document-document pairs the ``pair_docs`` rows; the t-SNE
    embeds the first ``tsne_queries`` queries and the ``tsne_docs`` rows.
    """
    q, d = _rows(query_emb, "query_emb"), _rows(doc_emb, "doc_emb")
    pos_q = np.array([i for i, docs in enumerate(relevant) for _ in docs], dtype=np.int64)
    pos_d = np.array([j for docs in relevant for j in docs], dtype=np.int64)
    q_pairs, d_pairs = q[:pair_queries], d[np.asarray(pair_docs, dtype=np.int64)]
    raw = {
        "query_query": pairwise_cosines(q_pairs),
        "query_document_positive": paired_cosines(q[pos_q], d[pos_d]),
        "document_document": pairwise_cosines(d_pairs),
    }
    top1, best = top1_and_relevant(q, d, relevant)
    raw["top1_score"], raw["top1_gap"] = top1, top1 - best

    tsne_q, tsne_d = q[:tsne_queries], d[np.asarray(tsne_docs, dtype=np.int64)]
    raw["tsne"] = tsne_2d(np.concatenate([tsne_q, tsne_d]), seed)
    raw["tsne_is_query"] = np.arange(len(raw["tsne"])) < len(tsne_q)

    summary = {
        "alignment": alignment(q[pos_q], d[pos_d], alpha),
        "uniformity": {
            "query": uniformity(q_pairs, t),
            "document": uniformity(d_pairs, t),
            "both": uniformity(np.concatenate([q_pairs, d_pairs]), t),
        },
        "similarity": {key: distribution(raw[key], SIMILARITY_EDGES) for key in ("query_query", "query_document_positive", "document_document")},
        "top1": {
            "score": distribution(top1, SIMILARITY_EDGES),
            "gap": distribution(raw["top1_gap"], GAP_EDGES),
            "top1_relevant_fraction": float(np.mean(raw["top1_gap"] == 0.0)),
        },
        "counts": {
            "queries": int(q.shape[0]),
            "documents_searched": int(d.shape[0]),
            "positive_pairs": int(pos_q.size),
            "pair_sample_queries": int(q_pairs.shape[0]),
            "pair_sample_documents": int(d_pairs.shape[0]),
            "tsne_queries": int(tsne_q.shape[0]),
            "tsne_documents": int(tsne_d.shape[0]),
        },
    }
    return summary, raw
