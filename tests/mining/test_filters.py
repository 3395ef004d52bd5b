"""The positive-aware filters: hand-computed cases, and sentence-transformers' ``mine_hard_negatives``
as an independent implementation of the same rules."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest

from samtone_ray.core.config import ConfigError, MiningConfig
from samtone_ray.mining.filters import FILTERS, QueryCandidates, mine_negatives, select_negatives


def candidates(scores: list[float], positives: dict[int, float], index: int = 0) -> QueryCandidates:
    """Candidates 0..n-1 scored ``scores`` (already best first); ``positives`` {row: score}."""
    return QueryCandidates(index=index, doc_ids=np.arange(len(scores)), scores=np.array(scores),
                           positive_ids=np.array(list(positives)), positive_scores=np.array(list(positives.values())))


def distinct(n: int) -> np.ndarray:
    return np.arange(n)


# Rows 0..9, scores falling by 0.1; row 1 is the positive (0.8); rows 0 and 1 are the lowest
# positive's neighbours.
SCORES = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]


def test_the_positive_and_equal_texts_are_never_negatives():
    codes = np.array([0, 1, 2, 1, 4, 5, 6, 4, 8, 9])  # row 3 has the positive's text, row 7 repeats row 4's
    ids, scores, removed = select_negatives(candidates(SCORES, {1: 0.8}), codes, query_code=5,
                                            config=MiningConfig(num_negatives=4), window=10)
    # Without the positive (1), its twin (3), the query's own text (5) and the repeat (7):
    assert ids.tolist() == [0, 2, 4, 6]
    assert scores.tolist() == [0.9, 0.7, 0.5, 0.3]
    assert {k: v for k, v in removed.items() if v} == {"positive": 1, "positive_text": 1, "query_text": 1,
                                                       "duplicate_text": 1}


@pytest.mark.parametrize(("config", "expected", "counts"), [
    # p = 0.5 (the lowest of the two positives 0.8 and 0.5 at rows 1 and 4).
    # absolute 0.2: keep score + 0.2 <= 0.5, i.e. <= 0.3 (0.3 itself kept).
    (MiningConfig(absolute_margin=0.2), [6, 7, 8], {"absolute_margin": 4}),
    # relative 0.2: keep score <= 0.5 - 0.5 * 0.2 = 0.4.
    (MiningConfig(relative_margin=0.2), [5, 6, 7], {"relative_margin": 3}),
    (MiningConfig(max_score=0.65), [3, 5, 6], {"max_score": 2}),
    (MiningConfig(min_score=0.65), [0, 2], {"min_score": 6}),
    # range over the survivors 0 2 3 5 6 7 8 9: skip 2, pick among the next 3.
    (MiningConfig(range_min=2, range_max=5, num_negatives=2), [3, 5], {"range_min": 2, "range_max": 3}),
])
def test_each_filter_by_hand(config, expected, counts):
    ids, _, removed = select_negatives(candidates(SCORES, {1: 0.8, 4: 0.5}), distinct(10), -1, config,
                                       window=config.window(max_positives=2))
    assert ids.tolist() == expected
    assert {k: v for k, v in removed.items() if v} == {"positive": 2, **counts}


def test_relative_margin_of_a_negative_positive_score_lowers_the_bar():
    # p = -0.5, margin 0.5: keep score <= -0.5 - 0.25 = -0.75 (p * (1 - margin) = -0.25 would keep row 1).
    ids, _, _ = select_negatives(candidates([0.0, -0.25, -0.5, -0.75, -1.0], {0: -0.5}), distinct(5), -1,
                                 MiningConfig(relative_margin=0.5, num_negatives=5), window=5)
    assert ids.tolist() == [3, 4]


def test_default_window_is_wider_when_scores_are_filtered():
    assert MiningConfig(num_negatives=3).window(max_positives=2) == 5
    assert MiningConfig(num_negatives=3, range_min=4, max_score=0.9).window(max_positives=2) == 36
    assert MiningConfig(num_negatives=3, range_max=7).window(max_positives=2) == 7


def test_random_sampling_is_seeded_per_query_and_stays_in_the_pool():
    config = MiningConfig(num_negatives=3, range_min=1, range_max=8, sampling="random", seed=7)
    query = candidates(SCORES, {9: 0.05}, index=4)
    pool = list(range(1, 8))
    picks = [select_negatives(query, distinct(10), -1, config, 8)[0].tolist() for _ in range(2)]
    assert picks[0] == picks[1] and len(picks[0]) == 3
    assert set(picks[0]) <= set(pool) and picks[0] == sorted(picks[0])  # best (lowest row) first
    # Over seeds every pool member gets drawn, about 3/7 of the time each (400 draws: 171 +- 3 sd).
    counts = np.zeros(10, int)
    for seed in range(400):
        seeded = MiningConfig(num_negatives=3, range_min=1, range_max=8, sampling="random", seed=seed)
        counts[select_negatives(query, distinct(10), -1, seeded, 8)[0]] += 1
    assert counts[0] == 0 and counts[8:].sum() == 0
    assert all(171 - 45 < c < 171 + 45 for c in counts[1:8])


def test_random_sampling_does_not_depend_on_the_other_queries():
    config = MiningConfig(num_negatives=2, range_max=9, sampling="random", seed=3)
    queries = [candidates(SCORES, {9: 0.0}, index=i) for i in range(5)]
    together, _ = mine_negatives(queries, distinct(10), np.full(5, -1), config, 9)
    alone, _ = mine_negatives(queries[3:4], distinct(10), np.full(5, -1), config, 9)
    assert together[3].tolist() == alone[0].tolist()
    assert len({tuple(ids) for ids in together}) > 1  # queries do get different samples


def test_report_counts_queries_short_of_negatives():
    config = MiningConfig(num_negatives=3, max_score=0.45)
    queries = [candidates(SCORES, {0: 0.9}, index=0), candidates(SCORES[:3], {0: 0.9}, index=1)]
    negatives, report = mine_negatives(queries, distinct(10), np.full(2, -1), config, config.window(1))
    assert [n.tolist() for n in negatives] == [[5, 6, 7], []]
    assert report.as_dict() == {
        "queries": 2, "candidates": 13, "negatives": 3, "num_negatives": 3, "short_queries": 1, "empty_queries": 1,
        "removed": dict.fromkeys(FILTERS, 0) | {"positive": 2, "max_score": 6}}


def test_a_query_without_positive_is_refused():
    with pytest.raises(ValueError, match="query #0 has no positive"):
        select_negatives(candidates(SCORES, {}), distinct(10), -1, MiningConfig(), 5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_negatives": 0}, "mining.num_negatives must be an integer >= 1"),
    ({"range_min": -1}, "mining.range_min must be an integer >= 0"),
    ({"range_min": 3, "range_max": 5}, "mining.range_max=5 leaves 2 candidates after mining.range_min=3"),
    ({"absolute_margin": -0.1}, "mining.absolute_margin must be >= 0"),
    ({"relative_margin": float("nan")}, "mining.relative_margin must be a finite number"),
    ({"min_score": 0.9, "max_score": 0.5}, "mining.min_score=0.9 is above mining.max_score=0.5"),
    ({"sampling": "best"}, "mining.sampling must be one of"),
])
def test_config_is_checked_once_with_the_key_named(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        MiningConfig(**kwargs)


# ----------------------------------------------------------------------------- the oracle

WORDS = "apt dpkg kernel python rust gnome kde editor font audio video network firewall mail shell".split()


def _texts(rng: np.random.Generator, n: int, words: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=words)) + f" {i}" for i in range(n)]


@pytest.fixture(scope="module")
def st_setup(tiny_model_dir):
    """A tiny random BERT as a sentence-transformers model, 40 documents, 12 queries with 1-3
    positives each; query 0's text is also a document."""
    from sentence_transformers import SentenceTransformer

    rng = np.random.default_rng(0)
    corpus = _texts(rng, 40, 6)
    queries = _texts(rng, 12, 3)
    corpus[39] = queries[0]
    positives = [sorted(rng.choice(38, size=1 + i % 3, replace=False).tolist()) for i in range(12)]
    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    return model, corpus, queries, positives


def _ours(model, corpus, queries, positives, config: MiningConfig) -> tuple[list[list[str]], dict]:
    """Our filters on candidates scored with the model's own embeddings (all documents ranked)."""
    c = model.encode(corpus, normalize_embeddings=True, convert_to_numpy=True)
    q = model.encode(queries, normalize_embeddings=True, convert_to_numpy=True)
    scores = q @ c.T
    window = config.window(max(len(p) for p in positives))
    depth = window + max(len(p) for p in positives) + 1  # what sentence-transformers ranks
    text_codes = np.arange(len(corpus))
    query_codes = np.array([corpus.index(t) if t in corpus else -1 for t in queries])
    found = []
    for i, pos in enumerate(positives):
        order = np.argsort(-scores[i], kind="stable")[:depth]
        found.append(QueryCandidates(i, order, scores[i, order], np.array(pos), scores[i, pos]))
    negatives, report = mine_negatives(found, text_codes, query_codes, config, window)
    return [[corpus[j] for j in ids] for ids in negatives], report.as_dict()


def _theirs(model, corpus, queries, positives, config: MiningConfig) -> tuple[list[list[str]], dict]:
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    rows = [(queries[i], corpus[j]) for i, pos in enumerate(positives) for j in pos]
    dataset = Dataset.from_dict({"query": [r[0] for r in rows], "positive": [r[1] for r in rows]})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        mined = mine_hard_negatives(
            dataset, model, corpus=corpus, range_min=config.range_min, range_max=config.range_max,
            max_score=config.max_score, min_score=config.min_score, absolute_margin=config.absolute_margin,
            relative_margin=config.relative_margin, num_negatives=config.num_negatives, sampling_strategy="top",
            output_format="triplet", batch_size=16, verbose=True)
    by_pair: dict[tuple[str, str], list[str]] = {}
    for row in mined:
        by_pair.setdefault((row["query"], row["positive"]), []).append(row["negative"])
    negatives = [by_pair.get((queries[i], corpus[pos[0]]), []) for i, pos in enumerate(positives)]
    skipped = {name: int(n.replace(",", "")) for n, name in
               re.findall(r"Skipped ([\d,]+) potential negatives \(.*?\) due to the (\w+) of", out.getvalue())}
    return negatives, skipped


@pytest.mark.parametrize("config", [
    MiningConfig(num_negatives=3),
    MiningConfig(num_negatives=4, range_min=2, range_max=12),
    MiningConfig(num_negatives=3, relative_margin=0.05),
    MiningConfig(num_negatives=3, absolute_margin=0.002, max_score=0.95),
    MiningConfig(num_negatives=2, relative_margin=0.01, min_score=0.88, range_min=1),
], ids=["plain", "range", "relative", "absolute-max", "relative-min"])
def test_same_negatives_and_counts_as_sentence_transformers(st_setup, config):
    ours, report = _ours(*st_setup, config)
    theirs, skipped = _theirs(*st_setup, config)
    assert ours == theirs
    assert {name: report["removed"][name] for name in skipped} == skipped
    assert any(ours)
    assert bool(skipped) == (config.filters_scores or config.min_score is not None)  # the filters did bite
