"""Retrieval evaluation: trec_eval-compatible metrics, exact dense search, a BM25 baseline.

A *run* maps ``query_id -> {doc_id: score}`` and *qrels* map ``query_id -> {doc_id: relevance}``.

Metrics follow trec_eval (as exposed by pytrec_eval) so numbers are comparable with published
BEIR/MS MARCO tables:

* Ranking: documents are sorted by score descending, ties broken by doc_id descending
  (trec_eval's ``strcmp`` order), then cut at ``k``.
* A document is relevant iff its relevance is ``>= 1``; unjudged documents count as 0.
  ``R`` is the number of relevant documents of the query in qrels.
* ``p@k      = |relevant in top k| / k`` (k, not the number retrieved: trec_eval's ``P_k``).
* ``recall@k = |relevant in top k| / R`` (``recall_k``).
* ``mrr@k    = 1 / rank of the first relevant document in the top k``, else 0
  (``recip_rank`` on the run cut at k).
* ``ndcg@k   = DCG@k / IDCG@k`` with ``DCG@k = sum_{i=1..k} max(rel_i, 0) / log2(i + 1)`` and
  IDCG@k the same sum over the qrels' positive relevances sorted descending (``ndcg_cut_k``).
* ``map@k    = (1/R) sum_{i<=k, doc_i relevant} precision@i`` (``map_cut_k``).

Averaging differs from pytrec_eval on purpose: the mean is over *every* query in qrels.
A qrels query absent from the run scores 0 on every metric (pytrec_eval drops it, which
flatters a system that fails to answer); a qrels query with no relevant document scores 0 on
every metric (as pytrec_eval does, since every ratio above has a zero numerator or R = 0).
Queries in the run but not in qrels are ignored.
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections.abc import Callable, Mapping, Sequence

import bm25s
import torch

Run = dict[str, dict[str, float]]
Qrels = Mapping[str, Mapping[str, int]]

DEFAULT_K_VALUES: tuple[int, ...] = (1, 10, 100)
METRIC_NAMES: tuple[str, ...] = ("mrr", "ndcg", "recall", "p", "map")
DEFAULT_TABLE_KEYS: tuple[str, ...] = ("mrr@10", "ndcg@10", "recall@10", "recall@100", "p@1")


def _check_k_values(k_values: Sequence[int]) -> list[int]:
    if len(k_values) == 0:
        raise ValueError("k_values is empty: give at least one cutoff")
    for k in k_values:
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k_values must be positive integers, got {k!r} in {tuple(k_values)}")
    return sorted({int(k) for k in k_values})


def _query_metrics(ranked_gains: list[int], qrel: Mapping[str, int], ks: list[int]) -> dict[str, float]:
    """Metrics of one query, given the relevance of its ranked documents (length <= max(ks))."""
    ideal = sorted((r for r in qrel.values() if r > 0), reverse=True)
    num_rel = len(ideal)
    out: dict[str, float] = {}
    if num_rel == 0:
        for k in ks:
            for name in METRIC_NAMES:
                out[f"{name}@{k}"] = 0.0
        return out

    # Prefix sums over ranks let every cutoff be read off in O(1).
    hits, dcg, ap_sum, first_hit = 0, 0.0, 0.0, 0
    hits_at: list[int] = []
    dcg_at: list[float] = []
    ap_at: list[float] = []
    for i, rel in enumerate(ranked_gains):
        if rel > 0:
            hits += 1
            dcg += rel / math.log2(i + 2)
            ap_sum += hits / (i + 1)
            if first_hit == 0:
                first_hit = i + 1
        hits_at.append(hits)
        dcg_at.append(dcg)
        ap_at.append(ap_sum)

    idcg, idcg_at = 0.0, []
    for i, rel in enumerate(ideal[: ks[-1]]):
        idcg += rel / math.log2(i + 2)
        idcg_at.append(idcg)

    n = len(ranked_gains)
    for k in ks:
        last = min(k, n) - 1
        h = hits_at[last] if last >= 0 else 0
        out[f"p@{k}"] = h / k
        out[f"recall@{k}"] = h / num_rel
        out[f"mrr@{k}"] = 1.0 / first_hit if 0 < first_hit <= k else 0.0
        out[f"ndcg@{k}"] = (dcg_at[last] if last >= 0 else 0.0) / idcg_at[min(k, num_rel) - 1]
        out[f"map@{k}"] = (ap_at[last] if last >= 0 else 0.0) / num_rel
    return out


def retrieval_metrics(
    run: Mapping[str, Mapping[str, float]],
    qrels: Qrels,
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    *,
    per_query: bool = False,
):
    """Mean ``mrr@k``, ``ndcg@k``, ``recall@k``, ``p@k`` and ``map@k`` over the queries in qrels.

    Semantics (trec_eval-compatible, see the module docstring): ties broken by doc_id
    descending; relevant iff relevance >= 1; graded gain ``max(rel, 0)`` with a ``log2(i + 1)``
    discount; the mean runs over every qrels query, missing ones scoring 0.

    ``per_query=True`` returns ``(means, {query_id: {metric: value}})`` instead: the values
    whose means these are, for confidence intervals and paired tests over queries.
    """
    ks = _check_k_values(k_values)
    if len(qrels) == 0:
        raise ValueError("qrels is empty: there is no query to average over")
    max_k = ks[-1]
    totals = dict.fromkeys((f"{name}@{k}" for k in ks for name in METRIC_NAMES), 0.0)
    rows: dict[str, dict[str, float]] = {}
    for qid, qrel in qrels.items():
        scored = run.get(qid, {})
        # (score, doc_id) descending is trec_eval's order; nlargest avoids sorting long runs.
        top = heapq.nlargest(max_k, scored.items(), key=lambda item: (item[1], item[0]))
        gains = [qrel.get(doc_id, 0) for doc_id, _ in top]
        values = _query_metrics(gains, qrel, ks)
        if per_query:
            rows[qid] = values
        for key, value in values.items():
            totals[key] += value
    means = {key: value / len(qrels) for key, value in totals.items()}
    return (means, rows) if per_query else means


@torch.no_grad()
def exact_search(
    query_emb: torch.Tensor,
    doc_emb: torch.Tensor,
    k: int,
    *,
    query_chunk: int = 1024,
    doc_chunk: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product ``score[q, n] = query_emb[q] . doc_emb[n]``.

    Returns ``(scores [Q, k'], indices [Q, k'])`` with ``k' = min(k, N)``, each row sorted by
    score descending, on the tensors' device. Peak extra memory is about
    ``query_chunk * (doc_chunk + 2k)`` scores: each query chunk keeps a running top-k that is
    merged with the top-k of every doc chunk, so the Q x N matrix is never built.
    """
    if query_emb.dim() != 2 or doc_emb.dim() != 2:
        raise ValueError(
            f"query_emb and doc_emb must be 2-D [rows, dim], got shapes "
            f"{tuple(query_emb.shape)} and {tuple(doc_emb.shape)}"
        )
    if query_emb.shape[1] != doc_emb.shape[1]:
        raise ValueError(
            f"embedding dims differ: query_emb {tuple(query_emb.shape)} vs doc_emb {tuple(doc_emb.shape)}"
        )
    if query_emb.device != doc_emb.device or query_emb.dtype != doc_emb.dtype:
        raise ValueError(
            f"query_emb ({query_emb.dtype}, {query_emb.device}) and doc_emb "
            f"({doc_emb.dtype}, {doc_emb.device}) must share dtype and device"
        )
    if doc_emb.shape[0] == 0:
        raise ValueError("doc_emb has no rows: cannot search an empty corpus")
    if k < 1 or query_chunk < 1 or doc_chunk < 1:
        raise ValueError(f"k, query_chunk and doc_chunk must be >= 1, got {k}, {query_chunk}, {doc_chunk}")

    num_docs = doc_emb.shape[0]
    k = min(k, num_docs)
    all_scores, all_indices = [], []
    for q_start in range(0, query_emb.shape[0], query_chunk):
        queries = query_emb[q_start : q_start + query_chunk]
        best_scores = queries.new_empty((queries.shape[0], 0))
        best_indices = torch.empty((queries.shape[0], 0), dtype=torch.long, device=queries.device)
        for d_start in range(0, num_docs, doc_chunk):
            chunk_scores = queries @ doc_emb[d_start : d_start + doc_chunk].T
            top_scores, top_idx = chunk_scores.topk(min(k, chunk_scores.shape[1]), dim=1)
            merged_scores = torch.cat([best_scores, top_scores], dim=1)
            merged_indices = torch.cat([best_indices, top_idx + d_start], dim=1)
            best_scores, pos = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
            best_indices = merged_indices.gather(1, pos)
        all_scores.append(best_scores)
        all_indices.append(best_indices)
    return torch.cat(all_scores), torch.cat(all_indices)


def _check_ids(ids: Sequence[str], emb: torch.Tensor, name: str) -> None:
    if len(ids) != emb.shape[0]:
        raise ValueError(f"{name}_ids has {len(ids)} ids but {name}_emb has {emb.shape[0]} rows")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}_ids contains duplicates: the run would silently merge them")


def search_run(
    query_ids: Sequence[str],
    query_emb: torch.Tensor,
    doc_ids: Sequence[str],
    doc_emb: torch.Tensor,
    k: int = 100,
    *,
    query_chunk: int = 1024,
    doc_chunk: int = 65536,
) -> Run:
    """Run ``{query_id: {doc_id: score}}`` of the exact top-k inner-product neighbours."""
    _check_ids(query_ids, query_emb, "query")
    _check_ids(doc_ids, doc_emb, "doc")
    scores, indices = exact_search(query_emb, doc_emb, k, query_chunk=query_chunk, doc_chunk=doc_chunk)
    return {
        qid: {doc_ids[j]: s for j, s in zip(row_idx, row_scores)}
        for qid, row_idx, row_scores in zip(query_ids, indices.tolist(), scores.tolist())
    }


def _encode(encode: Callable[[list[str]], torch.Tensor], texts: list[str], name: str) -> torch.Tensor:
    emb = encode(texts)
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != len(texts):
        shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise ValueError(f"{name} must return a Tensor [{len(texts)}, dim] for {len(texts)} texts, got {shape}")
    return emb


@torch.no_grad()
def evaluate_encoder(
    encode_queries: Callable[[list[str]], torch.Tensor],
    encode_documents: Callable[[list[str]], torch.Tensor],
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    qrels: Qrels,
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    *,
    query_chunk: int = 1024,
    doc_chunk: int = 65536,
    per_query: bool = False,
):
    """Encode the qrels' queries and the whole corpus, search exactly, return ``retrieval_metrics``
    (with ``per_query=True``: its ``(means, per-query values)``).

    Retrieval depth is ``max(k_values)``. Every qrels query must have a text in ``queries``.
    Query embeddings are moved to the documents' device and dtype before searching.
    """
    ks = _check_k_values(k_values)
    query_ids, doc_ids = _check_eval_inputs(corpus, queries, qrels)
    query_emb = _encode(encode_queries, [queries[qid] for qid in query_ids], "encode_queries")
    doc_emb = _encode(encode_documents, [corpus[did] for did in doc_ids], "encode_documents")
    query_emb = query_emb.to(device=doc_emb.device, dtype=doc_emb.dtype)
    run = search_run(
        query_ids, query_emb, doc_ids, doc_emb, k=ks[-1], query_chunk=query_chunk, doc_chunk=doc_chunk
    )
    return retrieval_metrics(run, qrels, ks, per_query=per_query)


def _check_eval_inputs(corpus: Mapping[str, str], queries: Mapping[str, str], qrels: Qrels) -> tuple[list[str], list[str]]:
    """(qrels query ids, corpus doc ids) after checking that each qrels query has a text."""
    missing = [qid for qid in qrels if qid not in queries]
    if missing:
        raise ValueError(f"{len(missing)} qrels queries have no text in queries, e.g. {missing[:5]}")
    if len(corpus) == 0:
        raise ValueError("corpus is empty: nothing to retrieve")
    return list(qrels), list(corpus)


def bm25_run(
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    k: int = 100,
    k1: float = 0.9,
    b: float = 0.4,
) -> Run:
    """BM25 run with bm25s, Lucene variant (Anserini/Pyserini's defaults k1=0.9, b=0.4).

    Text is lower-cased, split on ``\\b\\w\\w+\\b`` and stripped of bm25s' English stopwords;
    no stemming. For a query with terms ``t`` (repeats counted) and document ``d``::

        score(q, d) = sum_t idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
        idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

    (Lucene drops Robertson's constant ``k1 + 1`` factor, which does not change rankings.)
    Documents sharing no term with the query score 0 and are left out of the run, so a query
    may get fewer than ``k`` documents.
    """
    if len(corpus) == 0:
        raise ValueError("corpus is empty: nothing to retrieve")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    doc_ids = list(corpus)
    query_ids = list(queries)
    if not query_ids:
        return {}
    retriever = bm25_index([corpus[did] for did in doc_ids], k1, b)
    indices, scores = retriever.retrieve(
        bm25_tokenize([queries[qid] for qid in query_ids]), k=min(k, len(doc_ids)), show_progress=False
    )
    return {
        qid: {doc_ids[j]: s for j, s in zip(row_idx, row_scores) if s > 0}
        for qid, row_idx, row_scores in zip(query_ids, indices.tolist(), scores.tolist())
    }


def bm25_tokenize(texts: list[str], show_progress: bool = False) -> list[list[str]]:
    """``bm25_run``'s analysis of a text: lower-cased ``\\b\\w\\w+\\b`` tokens, English stopwords out."""
    # Strings, not ids: bm25s.tokenize numbers tokens per call, so query ids would not match the
    # corpus vocabulary.
    return bm25s.tokenize(texts, lower=True, stopwords="en", return_ids=False, show_progress=show_progress)


def bm25_index(texts: list[str], k1: float = 0.9, b: float = 0.4, show_progress: bool = False) -> bm25s.BM25:
    """A bm25s index (Lucene variant) of ``texts``, analysed by :func:`bm25_tokenize`."""
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(bm25_tokenize(texts, show_progress), show_progress=show_progress)
    return retriever


def format_metrics_table(
    rows: Mapping[str, Mapping[str, float]],
    keys: Sequence[str] = DEFAULT_TABLE_KEYS,
) -> str:
    """Plain-text table: one line per row name, one right-aligned 4-decimal column per key."""
    for name, metrics in rows.items():
        absent = [key for key in keys if key not in metrics]
        if absent:
            raise ValueError(f"row {name!r} lacks metrics {absent}; it has {sorted(metrics)}")
    name_width = max([len("name")] + [len(name) for name in rows])
    widths = [max(len(key), 6) for key in keys]  # 6 = len("0.0000")
    lines = ["  ".join(["name".ljust(name_width)] + [key.rjust(w) for key, w in zip(keys, widths)])]
    lines.append("  ".join(["-" * name_width] + ["-" * w for w in widths]))
    for name, metrics in rows.items():
        cells = [f"{metrics[key]:.4f}".rjust(w) for key, w in zip(keys, widths)]
        lines.append("  ".join([name.ljust(name_width)] + cells))
    return "\n".join(lines)


def evaluate_model(
    model, split, batch_size: int, precision: str = "fp32", *, rank: int = 0, world: int = 1, per_query: bool = False
):
    """Exact-search retrieval metrics of ``model`` (a DualEncoder) on a BeirSplit.

    With ``world`` > 1 every rank of the initialised process group calls this together: the
    length-sorted encoding batches (the ones ``encode_*`` would form) are dealt round-robin over
    the ranks, each rank encodes its share, the embeddings are all-gathered and rank 0 searches
    and returns the metrics (other ranks return ``{}``). Every batch is the same tensor as in a
    single-process evaluation, so the metrics do not depend on ``world``. ``per_query=True``
    returns ``(means, {query_id: {metric: value}})`` as ``retrieval_metrics`` does (``({}, {})``
    off rank 0).

    ``precision="bf16"`` encodes under bf16 autocast (about 2.4x faster on AMX CPUs and on GPUs);
    ``"int8"`` quantises the model's linear layers in place first (``runtime.prepare_inference``:
    inference only, CPU only); embeddings are normalised and searched in float32 either way.
    """
    from samtone_ray.core.runtime import autocast, prepare_inference

    ks = _check_k_values(DEFAULT_K_VALUES)
    query_ids, doc_ids = _check_eval_inputs(split.corpus, split.queries, split.qrels)
    precision = prepare_inference(model, precision)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(model.device, precision):
            query_emb = _encode_shared(model, [split.queries[q] for q in query_ids], "query", batch_size, rank, world)
            doc_emb = _encode_shared(model, [split.corpus[d] for d in doc_ids], "doc", batch_size, rank, world)
    finally:
        model.train(was_training)
    if rank != 0:
        return ({}, {}) if per_query else {}
    run = search_run(query_ids, query_emb, doc_ids, doc_emb, k=ks[-1])
    return retrieval_metrics(run, split.qrels, ks, per_query=per_query)


def _encode_shared(model, texts: list[str], side: str, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """[len(texts), D] float32 CPU embeddings; rank r encodes length-sorted batches r, r+W, ..."""
    from tqdm.auto import tqdm

    from samtone_ray.model.tokenization import length_sorted_batches, token_lengths

    max_length = model.query_max_length if side == "query" else model.doc_max_length
    encode = model.encode_queries if side == "query" else model.encode_documents
    batches = length_sorted_batches(token_lengths(model.tokenizer, texts, max_length), batch_size)
    shares = [batches[r::world] for r in range(world)]
    label = "queries" if side == "query" else "documents"
    show = rank == 0 and len(texts) > 1000
    # A batch is passed in its sorted order as one batch, so encode_* pads it exactly as a
    # single-process run would.
    parts = [
        encode([texts[i] for i in batch], batch_size=len(batch), show_progress=False)
        for batch in tqdm(shares[rank], desc=f"eval: encode {label}", unit="batch", disable=not show)
    ]
    mine = torch.cat(parts) if parts else torch.empty(0, model.embedding_dim)
    gathered = _all_gather_rows(mine, [sum(len(b) for b in share) for share in shares]) if world > 1 else [mine]
    out = torch.empty(len(texts), model.embedding_dim, dtype=torch.float32)
    for share, rows in zip(shares, gathered):
        if share:
            out[torch.tensor([i for batch in share for i in batch], dtype=torch.int64)] = rows
    return out


def _all_gather_rows(mine: torch.Tensor, rows: list[int]) -> list[torch.Tensor]:
    """Each rank's [rows[r], D] tensor, gathered on every rank (padded to the longest for the collective)."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    longest = max(rows)
    padded = torch.zeros(longest, mine.shape[1], dtype=torch.float32, device=device)
    padded[: mine.shape[0]] = mine.to(device)
    buffers = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(buffers, padded)
    return [buffer[:n].cpu() for buffer, n in zip(buffers, rows)]
