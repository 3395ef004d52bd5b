"""Positive-aware selection of hard negatives from a query's retrieved candidates (numpy only).

The rules are those of sentence-transformers' ``mine_hard_negatives`` (and NV-Retriever's
positive-aware mining), applied to each query's candidates, best first, in this order; each
filter is counted over the candidates that survived the ones before it:

1. ``positive``: a document the split's qrels judge relevant (relevance > 0) to the query;
   ``positive_text``: a document whose text equals a positive's; ``query_text``: one whose text
   equals the query's (sentence-transformers drops the query itself from its corpus);
   ``duplicate_text``: a text already seen higher in the list (sentence-transformers de-duplicates
   its corpus by text, so one text is one candidate).
2. ``absolute_margin``: dropped when ``score + margin > p``, ``p`` the query's lowest positive score;
   ``relative_margin``: dropped when ``score > p - |p| * margin`` (``p * (1 - margin)`` for ``p >= 0``);
   ``max_score``: dropped when ``score > max_score``; ``min_score``: when ``score < min_score``.
3. The survivors ranked ``range_min`` .. ``window - 1`` (``MiningConfig.window``) are the pool;
   ``range_min`` / ``range_max`` count the survivors outside it.
4. ``sampling: top`` takes the pool's first ``num_negatives``; ``random`` a sample of that many
   (the whole pool when smaller), drawn with a generator seeded by ``(seed, query index)`` so a
   query's negatives do not depend on how the queries were batched; returned best first.

Texts are compared through integer codes (equal codes = equal texts) that the caller computes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from samtone_ray.core.config import MiningConfig

FILTERS = ("positive", "positive_text", "query_text", "duplicate_text", "absolute_margin", "relative_margin",
           "max_score", "min_score", "range_min", "range_max")


@dataclass(frozen=True)
class QueryCandidates:
    """One query's retrieved candidates (best first) and its judged positives."""

    index: int  # the query's position in the mining run (seeds its random sample)
    doc_ids: np.ndarray  # [C] int64 corpus rows, by score descending
    scores: np.ndarray  # [C] float
    positive_ids: np.ndarray  # [P] int64 corpus rows of the relevant documents (P >= 1)
    positive_scores: np.ndarray  # [P] the query's score for each of them


@dataclass
class MiningReport:
    """What the filters did over a whole run."""

    num_negatives: int
    queries: int = 0
    candidates: int = 0  # retrieved candidates examined
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    negatives: int = 0  # negatives kept, all queries
    short_queries: int = 0  # queries given fewer than num_negatives
    empty_queries: int = 0  # queries given none

    def add(self, candidates: int, removed: dict[str, int], kept: int) -> None:
        self.queries += 1
        self.candidates += candidates
        for name, count in removed.items():
            self.removed[name] += count
        self.negatives += kept
        self.short_queries += kept < self.num_negatives
        self.empty_queries += kept == 0

    def as_dict(self) -> dict:
        return {"queries": self.queries, "candidates": self.candidates, "removed": dict(self.removed),
                "negatives": self.negatives, "num_negatives": self.num_negatives,
                "short_queries": self.short_queries, "empty_queries": self.empty_queries}


def select_negatives(
    query: QueryCandidates,
    text_codes: np.ndarray,
    query_code: int,
    config: MiningConfig,
    window: int,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """``(doc_ids, scores, removed)`` of ``query``'s negatives, best first, and the count each
    filter removed. ``text_codes[row]`` is the text code of corpus row ``row``; ``query_code`` the
    query text's code in the same code space (-1 when it equals no document)."""
    if query.positive_ids.size == 0:
        raise ValueError(f"query #{query.index} has no positive: positive-aware mining needs at least one")
    removed = dict.fromkeys(FILTERS, 0)
    ids, scores = np.asarray(query.doc_ids, np.int64), np.asarray(query.scores, np.float64)

    def drop(name: str, mask: np.ndarray) -> None:
        nonlocal ids, scores
        removed[name] += int(mask.sum())
        ids, scores = ids[~mask], scores[~mask]

    positive_codes = text_codes[query.positive_ids]
    drop("positive", np.isin(ids, query.positive_ids))
    drop("positive_text", np.isin(text_codes[ids], positive_codes))
    drop("query_text", text_codes[ids] == query_code)
    _, first = np.unique(text_codes[ids], return_index=True)
    drop("duplicate_text", ~np.isin(np.arange(ids.size), first))

    lowest = float(np.min(query.positive_scores))
    if config.absolute_margin is not None:
        drop("absolute_margin", scores + config.absolute_margin > lowest)
    if config.relative_margin is not None:
        drop("relative_margin", scores > lowest - abs(lowest) * config.relative_margin)
    if config.max_score is not None:
        drop("max_score", scores > config.max_score)
    if config.min_score is not None:
        drop("min_score", scores < config.min_score)

    removed["range_min"] = min(config.range_min, ids.size)
    removed["range_max"] = max(0, ids.size - window)
    ids, scores = ids[config.range_min:window], scores[config.range_min:window]
    if config.sampling == "random" and ids.size > config.num_negatives:
        rng = np.random.default_rng([config.seed, query.index])
        picked = np.sort(rng.choice(ids.size, size=config.num_negatives, replace=False))
        ids, scores = ids[picked], scores[picked]  # sorted positions keep the best-first order
    return ids[: config.num_negatives], scores[: config.num_negatives], removed


def mine_negatives(
    queries: Iterable[QueryCandidates],
    text_codes: np.ndarray,
    query_codes: np.ndarray,
    config: MiningConfig,
    window: int,
) -> tuple[list[np.ndarray], MiningReport]:
    """Each query's negative doc rows (best first) and the report of the whole run;
    ``query_codes[query.index]`` is that query's text code."""
    report = MiningReport(num_negatives=config.num_negatives)
    negatives = []
    for query in queries:
        ids, _, removed = select_negatives(query, text_codes, int(query_codes[query.index]), config, window)
        report.add(len(query.doc_ids), removed, ids.size)
        negatives.append(ids)
    return negatives, report
