"""Tests for samtone_ray.evaluation.retrieval against independent oracles.

Oracles: pytrec_eval (trec_eval) for the metrics, a full-matrix ``topk`` for exact search,
hand-computed values, and a naive Lucene BM25 written here.
"""

from __future__ import annotations

import math
import random
import re

import pytest
import pytrec_eval
import torch

from samtone_ray.evaluation.retrieval import (
    bm25_run,
    evaluate_encoder,
    exact_search,
    format_metrics_table,
    retrieval_metrics,
    search_run,
)

KS = (1, 10, 100)


def trec_order(docs: dict[str, float]) -> list[tuple[str, float]]:
    """trec_eval's ranking: score descending, then doc_id descending."""
    return sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)


def pytrec_means(run, qrels, ks) -> dict[str, float]:
    """pytrec_eval's per-query metrics averaged over every qrels query (0 when pytrec skips it)."""
    cuts = ",".join(map(str, ks))
    measures = {f"ndcg_cut.{cuts}", f"recall.{cuts}", f"P.{cuts}", f"map_cut.{cuts}"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    ours_to_trec = {"ndcg": "ndcg_cut", "recall": "recall", "p": "P", "map": "map_cut"}
    out = {}
    for k in ks:
        for ours, trec in ours_to_trec.items():
            out[f"{ours}@{k}"] = sum(per_query.get(q, {}).get(f"{trec}_{k}", 0.0) for q in qrels) / len(qrels)
        # recip_rank has no cutoff in trec_eval: cut the run at k first.
        cut_run = {q: dict(trec_order(docs)[:k]) for q, docs in run.items()}
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut_run)
        out[f"mrr@{k}"] = sum(rr.get(q, {}).get("recip_rank", 0.0) for q in qrels) / len(qrels)
    return out


def random_run_and_qrels(seed: int):
    rng = random.Random(seed)
    docs = [f"d{i:03d}" for i in range(300)]
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    for qi in range(80):
        qid = f"q{qi:02d}"
        judged = rng.sample(docs, rng.randint(1, 12))
        qrels[qid] = {d: rng.choice([0, 0, 1, 2, 3]) for d in judged}
        if qi % 10 == 0:
            continue  # in qrels, absent from the run
        n = rng.choice([0, 5, 60, 150])
        # Scores on a coarse grid so many ties need trec_eval's doc_id tie-break.
        run[qid] = {d: rng.randint(0, 20) / 4 for d in rng.sample(docs, n)}
        if qi % 7 == 0:
            # A relevant doc that the run misses.
            missed = next(d for d in docs if d not in run[qid])
            qrels[qid][missed] = 2
    qrels["no_relevant"] = {"d000": 0, "d001": 0}
    run["no_relevant"] = {"d000": 1.0, "d001": 0.5}
    run["not_in_qrels"] = {"d002": 1.0}
    return run, qrels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_metrics_match_pytrec_eval(seed):
    run, qrels = random_run_and_qrels(seed)
    ours = retrieval_metrics(run, qrels, KS)
    expected = pytrec_means(run, qrels, KS)
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


def test_default_keys_cover_the_reported_metrics():
    run, qrels = random_run_and_qrels(3)
    metrics = retrieval_metrics(run, qrels)
    required = {"mrr@10", "ndcg@10", "recall@10", "recall@100", "p@1", "mrr@1", "ndcg@1",
                "recall@1", "p@10", "p@100", "ndcg@100", "mrr@100"}
    assert required <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())


def test_ties_break_by_doc_id_descending_and_negative_relevance_has_no_gain():
    qrels = {"q": {"a": 2, "b": 1, "c": 0, "d": -1}}
    run = {"q": {"d": 5.0, "a": 1.0, "b": 3.0, "c": 3.0, "e": 3.0}}
    # trec_eval ranks d, e, c, b, a.
    dcg = 1 / math.log2(5) + 2 / math.log2(6)
    idcg = 2 + 1 / math.log2(3)
    m = retrieval_metrics(run, qrels, k_values=(1, 3, 5))
    assert m["ndcg@1"] == 0.0  # d has relevance -1: gain 0, not -1
    assert m["mrr@3"] == 0.0
    assert m["mrr@5"] == pytest.approx(1 / 4)
    assert m["ndcg@5"] == pytest.approx(dcg / idcg)
    assert m["p@5"] == pytest.approx(2 / 5)
    assert m["map@5"] == pytest.approx((1 / 4 + 2 / 5) / 2)
    expected = pytrec_means(run, qrels, (1, 3, 5))
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key


def test_average_runs_over_qrels_queries_only():
    qrels = {"hit": {"a": 1}, "unanswered": {"b": 1}}
    run = {"hit": {"a": 1.0, "x": 0.5}, "ignored": {"b": 9.0}}
    m = retrieval_metrics(run, qrels, k_values=(1, 2))
    assert m["mrr@1"] == 0.5
    assert m["recall@2"] == 0.5
    assert m["p@2"] == 0.25
    assert m["ndcg@2"] == 0.5


@pytest.mark.parametrize("k_values", [(), (0,), (1, -3), (2.5,)])
def test_bad_k_values_raise(k_values):
    with pytest.raises(ValueError, match="k_values"):
        retrieval_metrics({}, {"q": {"a": 1}}, k_values=k_values)


def test_empty_qrels_raise():
    with pytest.raises(ValueError, match="qrels is empty"):
        retrieval_metrics({"q": {"a": 1.0}}, {})


# ---------------------------------------------------------------- exact search

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k, query_chunk, doc_chunk", [(10, 8, 96), (10, 16, 7), (25, 1000, 1000)])
def test_exact_search_matches_full_topk(device, k, query_chunk, doc_chunk):
    gen = torch.Generator().manual_seed(k + doc_chunk)
    # Integer-valued float64: dot products are exact whatever the summation order, so chunked
    # and full-matrix scores must be bitwise equal.
    queries = torch.randint(-1000, 1000, (37, 16), generator=gen).double().to(device)
    docs = torch.randint(-1000, 1000, (500, 16), generator=gen).double().to(device)
    full = queries @ docs.T
    expected_scores, expected_idx = full.topk(k + 1, dim=1)
    assert (expected_scores[:, k - 1] > expected_scores[:, k]).all(), "tie at the cut: change the seed"

    scores, idx = exact_search(queries, docs, k, query_chunk=query_chunk, doc_chunk=doc_chunk)
    assert scores.shape == idx.shape == (37, k)
    assert scores.device.type == idx.device.type == device
    assert torch.equal(scores, expected_scores[:, :k])
    assert torch.equal(idx.sort(dim=1).values, expected_idx[:, :k].sort(dim=1).values)
    assert torch.equal(full.gather(1, idx), scores)


def test_exact_search_float32_continuous():
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(20, 8, generator=gen)
    docs = torch.randn(300, 8, generator=gen)
    expected_scores, expected_idx = (queries @ docs.T).topk(5, dim=1)
    scores, idx = exact_search(queries, docs, 5, query_chunk=6, doc_chunk=64)
    torch.testing.assert_close(scores, expected_scores)
    assert torch.equal(idx.sort(dim=1).values, expected_idx.sort(dim=1).values)


def test_exact_search_clamps_k_to_corpus_size():
    queries = torch.randn(3, 4)
    docs = torch.randn(5, 4)
    scores, idx = exact_search(queries, docs, 50, doc_chunk=2)
    assert idx.shape == (3, 5)
    assert torch.equal(idx.sort(dim=1).values, torch.arange(5).expand(3, 5))
    assert (scores[:, :-1] >= scores[:, 1:]).all()


@pytest.mark.parametrize(
    "queries, docs, k, match",
    [
        (torch.randn(3, 4), torch.randn(5, 3), 2, "dims differ"),
        (torch.randn(4), torch.randn(5, 4), 2, "2-D"),
        (torch.randn(3, 4), torch.randn(5, 4).double(), 2, "dtype"),
        (torch.randn(3, 4), torch.randn(0, 4), 2, "empty corpus"),
        (torch.randn(3, 4), torch.randn(5, 4), 0, ">= 1"),
    ],
)
def test_exact_search_rejects_bad_input(queries, docs, k, match):
    with pytest.raises(ValueError, match=match):
        exact_search(queries, docs, k)


def test_search_run_maps_ids_and_scores():
    gen = torch.Generator().manual_seed(1)
    queries = torch.randn(4, 6, generator=gen)
    docs = torch.randn(30, 6, generator=gen)
    qids = [f"q{i}" for i in range(4)]
    dids = [f"doc-{i}" for i in range(30)]
    run = search_run(qids, queries, dids, docs, k=3, query_chunk=3, doc_chunk=8)
    assert list(run) == qids
    for qi, qid in enumerate(qids):
        brute = sorted(((float(queries[qi] @ docs[j]), dids[j]) for j in range(30)), reverse=True)[:3]
        assert set(run[qid]) == {d for _, d in brute}
        for score, did in brute:
            assert run[qid][did] == pytest.approx(score, rel=1e-5)


def test_search_run_rejects_mismatched_or_duplicate_ids():
    q, d = torch.randn(2, 3), torch.randn(3, 3)
    with pytest.raises(ValueError, match="query_ids has 1 ids"):
        search_run(["q"], q, ["a", "b", "c"], d)
    with pytest.raises(ValueError, match="doc_ids contains duplicates"):
        search_run(["q1", "q2"], q, ["a", "b", "a"], d)


# ---------------------------------------------------------------- encoder evaluation

def bag_of_chars(texts: list[str]) -> torch.Tensor:
    vecs = torch.zeros(len(texts), 26)
    for i, text in enumerate(texts):
        for ch in text:
            if "a" <= ch <= "z":
                vecs[i, ord(ch) - ord("a")] += 1
    return torch.nn.functional.normalize(vecs, dim=1)


def test_evaluate_encoder_matches_brute_force_oracle():
    rng = random.Random(5)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def word() -> str:
        return "".join(rng.choice(letters) for _ in range(rng.randint(3, 12)))

    corpus = {f"d{i}": " ".join(word() for _ in range(rng.randint(1, 4))) for i in range(40)}
    queries = {f"q{i}": word() for i in range(15)}
    qrels = {}
    for i in range(12):
        relevant, unjudged = rng.sample(range(40), 2)  # distinct: both judgements must survive
        qrels[f"q{i}"] = {f"d{relevant}": rng.randint(1, 2), f"d{unjudged}": 0}

    seen_queries: list[str] = []

    def encode_queries(texts):
        seen_queries.extend(texts)
        return bag_of_chars(texts)

    ks = (1, 5, 10)
    metrics = evaluate_encoder(encode_queries, bag_of_chars, corpus, queries, qrels, k_values=ks)
    assert sorted(seen_queries) == sorted(queries[q] for q in qrels)

    def counts(text):
        return [text.count(c) for c in letters]

    def cosine(a, b):
        ca, cb = counts(a), counts(b)
        return sum(x * y for x, y in zip(ca, cb)) / math.sqrt(sum(x * x for x in ca) * sum(y * y for y in cb))

    oracle_run = {q: dict(trec_order({d: cosine(queries[q], t) for d, t in corpus.items()})[:10]) for q in qrels}
    expected = pytrec_means(oracle_run, qrels, ks)
    assert set(metrics) >= set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key


def test_evaluate_encoder_requires_query_text_for_every_qrels_query():
    with pytest.raises(ValueError, match="no text in queries"):
        evaluate_encoder(bag_of_chars, bag_of_chars, {"d": "abc"}, {"q1": "abc"}, {"q1": {"d": 1}, "q2": {"d": 1}})


def test_evaluate_encoder_rejects_wrong_embedding_rows():
    with pytest.raises(ValueError, match="encode_documents must return"):
        evaluate_encoder(bag_of_chars, lambda texts: torch.zeros(1, 26), {"a": "x", "b": "y"}, {"q": "x"}, {"q": {"a": 1}})


# ---------------------------------------------------------------- BM25

STOPWORDS_IN_TEXTS = {"the", "a", "of", "and", "is", "in"}  # all in bm25s' English list


def naive_lucene_bm25(corpus, query, k1, b):
    def tokens(text):
        return [t for t in re.findall(r"\b\w\w+\b", text.lower()) if t not in STOPWORDS_IN_TEXTS]

    docs = {d: tokens(t) for d, t in corpus.items()}
    n = len(docs)
    avgdl = sum(len(t) for t in docs.values()) / n
    scores = {}
    for d, dt in docs.items():
        s = 0.0
        for term in tokens(query):
            df = sum(term in other for other in docs.values())
            if df == 0:
                continue
            tf = dt.count(term)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            s += idf * tf / (tf + k1 * (1 - b + b * len(dt) / avgdl))
        scores[d] = s
    return scores


CORPUS = {
    "zoo": "The zoo is home of a platypus and many animal species",
    "farm": "Animal farm animal pens and animal feed in the barn",
    "city": "The city is busy and the traffic is heavy",
    "forest": "A forest animal hides in the trees of the forest",
    "river": "The river flows and the fish swim in the river river",
}


def test_bm25_rare_term_ranks_first():
    run = bm25_run(CORPUS, {"q": "platypus animal"}, k=5)
    ranking = [d for d, _ in trec_order(run["q"])]
    assert ranking[0] == "zoo"
    assert "city" not in run["q"] and "river" not in run["q"]  # no shared term: score 0, dropped


@pytest.mark.parametrize("k1, b", [(0.9, 0.4), (1.5, 0.75)])
def test_bm25_scores_match_naive_lucene_formula(k1, b):
    queries = {"q1": "animal farm", "q2": "river fish the", "q3": "forest forest trees", "q4": "unicorn"}
    run = bm25_run(CORPUS, queries, k=3, k1=k1, b=b)
    assert set(run) == set(queries)
    for qid, text in queries.items():
        naive = naive_lucene_bm25(CORPUS, text, k1, b)
        expected_top = [d for d, s in trec_order(naive)[:3] if s > 0]
        assert set(run[qid]) == set(expected_top), qid
        for did, score in run[qid].items():
            assert score == pytest.approx(naive[did], rel=1e-5), (qid, did)
    assert run["q4"] == {}


# ---------------------------------------------------------------- table

def test_format_metrics_table_layout():
    rows = {"bm25": {"mrr@10": 0.5, "p@1": 0.25}, "samtone-long": {"mrr@10": 1 / 3, "p@1": 1.0, "extra": 9.0}}
    expected = (
        "name          mrr@10     p@1\n"
        "------------  ------  ------\n"
        "bm25          0.5000  0.2500\n"
        "samtone-long  0.3333  1.0000"
    )
    assert format_metrics_table(rows, keys=("mrr@10", "p@1")) == expected


def test_format_metrics_table_names_missing_metric():
    with pytest.raises(ValueError, match="'bm25' lacks metrics \\['ndcg@10'\\]"):
        format_metrics_table({"bm25": {"mrr@10": 0.5}}, keys=("mrr@10", "ndcg@10"))


# ---------------------------------------------------------------- a bounded eval corpus


@pytest.mark.model
def test_evaluate_model_on_a_bounded_corpus_matches_pytrec_eval_over_that_corpus(tiny_model_dir):
    """``evaluate_model`` on a ``bound_eval_corpus`` split equals pytrec_eval on a brute-force run
    over the kept documents; and searching fewer distractors can only raise every metric."""
    from samtone_ray.data.sources import BeirSplit, bound_eval_corpus, bundled_sample_path, load_beir
    from samtone_ray.evaluation.retrieval import evaluate_model
    from samtone_ray.model.towers import DualEncoder

    dev = load_beir(bundled_sample_path(), "dev")
    qids = sorted(dev.qrels)[:30]
    qrels = {q: dict(dev.qrels[q]) for q in qids}
    judged = {d for q in qids for d in qrels[q]}
    docs = [d for d in dev.corpus if d in judged] + [d for d in dev.corpus if d not in judged][:400]
    full = BeirSplit(corpus={d: dev.corpus[d] for d in docs}, queries={q: dev.queries[q] for q in qids}, qrels=qrels)
    bounded = bound_eval_corpus(full, 120)
    assert len(bounded.corpus) == 120 and judged <= set(bounded.corpus)

    model = DualEncoder.from_base(str(tiny_model_dir), query_max_length=16, doc_max_length=32)
    got = evaluate_model(model, bounded, 16, "fp32")

    # The oracle: every document of the full corpus encoded once, scored by a full matrix product,
    # then restricted to the kept ids and ranked by trec_eval's order.
    q_emb = model.encode_queries([full.queries[q] for q in qids], batch_size=16)
    d_emb = model.encode_documents([full.corpus[d] for d in docs], batch_size=16)
    scores = (q_emb @ d_emb.T).tolist()

    def oracle_run(keep: set[str]) -> dict[str, dict[str, float]]:
        return {q: dict(trec_order({d: s for d, s in zip(docs, row) if d in keep})[:100]) for q, row in zip(qids, scores)}

    expected = pytrec_means(oracle_run(set(bounded.corpus)), qrels, KS)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    whole = pytrec_means(oracle_run(set(docs)), qrels, KS)
    assert all(expected[k] >= whole[k] - 1e-12 for k in whole)
    assert expected["mrr@10"] > whole["mrr@10"]  # with 400 distractors cut to 90 the ranks do move
