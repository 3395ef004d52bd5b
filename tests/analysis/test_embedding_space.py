"""Tests for samtone_ray.analysis.embedding_space against naive per-pair loops and closed forms."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from samtone_ray.analysis import embedding_space as analysis


def naive_cos(x, y) -> float:
    dot = sum(a * b for a, b in zip(x, y))
    return dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y)))


def naive_d2(x, y) -> float:
    return sum((a - b) ** 2 for a, b in zip(x, y))


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_pairwise_and_paired_cosines_match_loops(rng):
    x = rng.normal(size=(7, 5)) * rng.uniform(0.5, 3, size=(7, 1))  # unnormalised on purpose
    y = rng.normal(size=(7, 5))
    expected = [naive_cos(x[i], x[j]) for i in range(7) for j in range(i + 1, 7)]
    assert analysis.pairwise_cosines(x) == pytest.approx(expected, abs=1e-12)
    assert analysis.paired_cosines(x, y) == pytest.approx([naive_cos(a, b) for a, b in zip(x, y)], abs=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        analysis.paired_cosines(x, y[:3])


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_alignment_matches_a_loop(rng, alpha):
    x, y = rng.normal(size=(9, 4)), rng.normal(size=(9, 4))
    expected = sum(math.sqrt(naive_d2(a, b)) ** alpha for a, b in zip(x, y)) / 9
    assert analysis.alignment(x, y, alpha) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("t", [0.5, 2.0])
def test_uniformity_matches_a_loop(rng, t):
    x = rng.normal(size=(11, 6))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    terms = [math.exp(-t * naive_d2(x[i], x[j])) for i in range(11) for j in range(i + 1, 11)]
    assert analysis.uniformity(x, t) == pytest.approx(math.log(sum(terms) / len(terms)), rel=1e-10)


def test_uniformity_closed_forms():
    # Identical points: every distance 0, log(1) = 0. Antipodal unit vectors: d2 = 4, so -t * 4.
    assert analysis.uniformity(np.ones((3, 2))) == pytest.approx(0.0, abs=1e-12)
    assert analysis.uniformity(np.array([[1.0, 0.0], [-1.0, 0.0]]), t=2) == pytest.approx(-8.0)
    # Far apart points would underflow a plain exp; the shifted log-mean-exp stays finite.
    assert analysis.uniformity(np.array([[0.0], [100.0]]), t=2) == pytest.approx(-20000.0)
    with pytest.raises(ValueError, match="at least 2"):
        analysis.uniformity(np.ones((1, 3)))


def test_top1_and_relevant_match_a_loop(rng):
    q, d = rng.normal(size=(13, 8)), rng.normal(size=(40, 8))
    relevant = [list(rng.choice(40, size=rng.integers(1, 4), replace=False)) for _ in range(13)]
    top1, best = analysis.top1_and_relevant(q, d, relevant, chunk=5)  # several chunks
    for i in range(13):
        scores = [float(np.dot(q[i].astype(np.float32), d[j].astype(np.float32))) for j in range(40)]
        assert top1[i] == pytest.approx(max(scores), abs=1e-5)
        assert best[i] == pytest.approx(max(scores[j] for j in relevant[i]), abs=1e-5)
        assert top1[i] >= best[i]
        # The gap is exactly 0 when (and only when) a relevant document is the top-1.
        assert (top1[i] - best[i] == 0.0) == (int(np.argmax(scores)) in relevant[i])
    with pytest.raises(ValueError, match="no relevant"):
        analysis.top1_and_relevant(q[:1], d, [[]])


def test_distribution_matches_statistics_and_a_counting_loop(rng):
    values = rng.uniform(-1, 1, size=501)
    values[0] = 1.0 + 1e-7  # float rounding past the last edge still lands in the last bin
    edges = np.linspace(-1, 1, 11)
    out = analysis.distribution(values, edges)
    assert out["count"] == 501
    assert out["mean"] == pytest.approx(statistics.fmean(values))
    assert out["std"] == pytest.approx(statistics.pstdev(values))
    assert out["median"] == pytest.approx(statistics.median(values))
    assert (out["min"], out["max"]) == (min(values), max(values))
    q = statistics.quantiles(values, n=20, method="inclusive")
    assert (out["p05"], out["p95"]) == (pytest.approx(q[0]), pytest.approx(q[-1]))
    counts = [0] * 10
    for v in values:
        counts[min(9, max(0, math.floor((min(v, 1.0) + 1) / 0.2)))] += 1
    assert out["histogram"]["counts"] == counts
    assert analysis.distribution(np.array([]), edges) == {"count": 0}


def test_positives_keep_only_relevant_documents():
    qrels = {"a": {"d1": 1, "d2": 0}, "b": {"d3": 0}, "c": {"d4": 2, "d5": 1}}
    assert analysis.positives(qrels) == {"a": ["d1"], "c": ["d4", "d5"]}


def test_tsne_shape_and_determinism(rng):
    x = rng.normal(size=(40, 16))
    a = analysis.tsne_2d(x, seed=0)
    assert a.shape == (40, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, analysis.tsne_2d(x, seed=0))
    # Neighbours stay neighbours: the nearest 2-D neighbour of most points is among its 5 nearest in 16-D.
    d_hi = ((x[:, None] - x[None]) ** 2).sum(-1) + np.diag([np.inf] * 40)
    d_lo = ((a[:, None] - a[None]) ** 2).sum(-1) + np.diag([np.inf] * 40)
    near = np.argsort(d_hi, axis=1)[:, :5]
    assert np.mean([d_lo[i].argmin() in near[i] for i in range(40)]) > 0.5
    assert analysis.tsne_2d(x[:5], seed=0).shape == (5, 2)  # perplexity capped for tiny samples


def test_analyze_embeddings_summary_agrees_with_its_parts(rng):
    q, d = rng.normal(size=(6, 8)), rng.normal(size=(15, 8))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    relevant = [[0], [1, 2], [3], [4], [5, 6], [7]]
    summary, raw = analysis.analyze_embeddings(
        q, d, relevant, pair_queries=4, pair_docs=[2, 9, 11], tsne_queries=3, tsne_docs=[0, 1], seed=0
    )
    pairs = [(i, j) for i, docs in enumerate(relevant) for j in docs]
    assert summary["alignment"] == pytest.approx(sum(naive_d2(q[i], d[j]) for i, j in pairs) / len(pairs))
    both = np.concatenate([q[:4], d[[2, 9, 11]]])
    terms = [math.exp(-2 * naive_d2(both[i], both[j])) for i in range(7) for j in range(i + 1, 7)]
    assert summary["uniformity"]["both"] == pytest.approx(math.log(sum(terms) / len(terms)))
    assert summary["similarity"]["query_query"]["count"] == 6  # 4 choose 2
    assert summary["similarity"]["document_document"]["count"] == 3
    assert summary["similarity"]["query_document_positive"]["count"] == len(pairs)
    assert raw["tsne"].shape == (5, 2) and raw["tsne_is_query"].tolist() == [True] * 3 + [False] * 2
    assert summary["counts"]["positive_pairs"] == 8 and summary["top1"]["gap"]["min"] >= 0.0
