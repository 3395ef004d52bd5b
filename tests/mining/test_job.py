"""``run_mine`` end to end on (a slice of) the bundled sample: the output train reads, the
negatives against independent rankings (bm25s' own retrieve, sentence-transformers'
``mine_hard_negatives``), faiss against exact search, the embedding cache, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from samtone_ray.core.config import MiningConfig
from samtone_ray.data.sources import DataError, load_beir, load_training_pairs
from samtone_ray.mining.job import MineOptions, format_report, run_mine
from samtone_ray.tracking.model_uri import ModelURIError


def mine(data: Path, out: Path, **kwargs) -> dict:
    mining = kwargs.pop("mining", MiningConfig(num_negatives=3))
    return run_mine(MineOptions(data=str(data), out=out, mining=mining, **kwargs)).summary


def negatives_by_query(out: Path) -> dict[str, list[str]]:
    table = pq.read_table(out, columns=["query_id", "negative_ids"]).to_pylist()
    return {row["query_id"]: row["negative_ids"] for row in table}


def agreement(ours: dict[str, list], theirs: dict[str, list]) -> float:
    assert ours.keys() == theirs.keys()
    return sum(ours[q] == theirs[q] for q in ours) / len(ours)


@pytest.fixture(scope="module")
def bm25_out(small_sample, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bm25") / "mined.parquet"
    return out, mine(small_sample, out, retriever="bm25")


def test_train_reads_the_output_as_it_is(small_sample, bm25_out):
    out, summary = bm25_out
    mined = load_training_pairs(out, num_negatives=3)  # train's reader, with data.num_hard_negatives=3
    plain = load_training_pairs(small_sample, "train")
    for column in ("query", "document", "query_id", "doc_id"):
        assert mined.table.column(column).to_pylist() == plain.table.column(column).to_pylist()
    assert summary["report"]["empty_queries"] == 0 and summary["pairs"] == 300
    assert json.loads(out.with_name("mined.summary.json").read_text())["report"] == summary["report"]


def test_no_negative_is_a_positive_or_a_positive_s_text(small_sample, bm25_out):
    out, summary = bm25_out
    split = load_beir(small_sample, "train")
    rows = pq.read_table(out).to_pylist()
    short = set()
    for row in rows:
        positives = {d for d, rel in split.qrels[row["query_id"]].items() if rel > 0}
        assert not positives & set(row["negative_ids"])
        assert not {split.corpus[d] for d in positives} & set(row["negatives"])
        assert row["negatives"] == [split.corpus[d] for d in row["negative_ids"]]
        assert len(row["negatives"]) <= 3
        if len(row["negatives"]) < 3:
            short.add(row["query_id"])
    assert len(short) == summary["report"]["short_queries"]


def test_bm25_negatives_follow_bm25s_own_ranking(small_sample, bm25_out):
    import bm25s

    out, _ = bm25_out
    split = load_beir(small_sample, "train")
    doc_ids, qids = list(split.corpus), list(split.qrels)
    tokenize = lambda texts: bm25s.tokenize(texts, lower=True, stopwords="en", return_ids=False, show_progress=False)  # noqa: E731
    index = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
    index.index(tokenize(list(split.corpus.values())), show_progress=False)
    tokens = tokenize([split.queries[q] for q in qids])
    rows, _ = index.retrieve(tokens, k=20, show_progress=False)
    ours = negatives_by_query(out)
    for q, row, query_tokens in zip(qids, rows.tolist(), tokens):
        score = dict(zip(doc_ids, index.get_scores(query_tokens).tolist()))
        expected = [doc_ids[r] for r in row if score[doc_ids[r]] > 0 and split.qrels[q].get(doc_ids[r], 0) <= 0][:3]
        # Equal up to ties: BM25 ties often on short texts, and either tied document is right.
        assert [score[d] for d in ours[q]] == pytest.approx([score[d] for d in expected], rel=1e-6), q


def _st_negatives(data: Path, model_dir: Path, config: MiningConfig) -> dict[str, list[str]]:
    """sentence-transformers' negatives of each train query (as corpus ids; the sample's texts are unique)."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    split = load_beir(data, "train")
    pairs = load_training_pairs(data, "train").table
    dataset = Dataset.from_dict({"query": pairs.column("query").to_pylist(),
                                 "positive": pairs.column("document").to_pylist()})
    mined = mine_hard_negatives(
        dataset, SentenceTransformer(str(model_dir), device="cpu"), corpus=list(split.corpus.values()),
        range_min=config.range_min, range_max=config.range_max, absolute_margin=config.absolute_margin,
        relative_margin=config.relative_margin, num_negatives=config.num_negatives, sampling_strategy="top",
        output_format="triplet", batch_size=64, verbose=False)
    id_of_doc = {text: doc_id for doc_id, text in split.corpus.items()}
    id_of_query = {text: qid for qid, text in split.queries.items()}
    found = {qid: [] for qid in dict.fromkeys(pairs.column("query_id").to_pylist())}
    first_positive = {}
    for row in mined:
        qid = id_of_query[row["query"]]
        if first_positive.setdefault(qid, row["positive"]) == row["positive"]:
            found[qid].append(id_of_doc[row["negative"]])
    return found


@pytest.mark.parametrize("config", [
    MiningConfig(num_negatives=3, relative_margin=0.01),
    MiningConfig(num_negatives=4, range_min=2, range_max=30, absolute_margin=0.005),
], ids=["relative", "range-absolute"])
def test_dense_negatives_match_sentence_transformers(small_sample, st_model_dir, embedding_cache, tmp_path, config):
    out = tmp_path / "mined.parquet"
    mine(small_sample, out, retriever="dense", model=str(st_model_dir), mining=config, cache_dir=embedding_cache)
    ours, theirs = negatives_by_query(out), _st_negatives(small_sample, st_model_dir, config)
    assert agreement(ours, theirs) >= 0.99
    # A random model ranks the positives low, so the margins leave few negatives; but some.
    assert sum(map(bool, ours.values())) >= 30


def test_faiss_gives_the_exact_search_negatives_up_to_ties(small_sample, st_model_dir, embedding_cache, tmp_path):
    found = {}
    for search in ("exact", "faiss", "faiss-hnsw"):
        out = tmp_path / f"{search}.parquet"
        mine(small_sample, out, retriever="dense", model=str(st_model_dir), search=search, cache_dir=embedding_cache,
             mining=MiningConfig(num_negatives=4, range_min=1))
        found[search] = negatives_by_query(out)
    assert agreement(found["faiss"], found["exact"]) >= 0.99
    # HNSW is approximate: on this random model's crowded embeddings it still finds most.
    assert agreement(found["faiss-hnsw"], found["exact"]) >= 0.8


def test_mining_again_with_other_filters_does_not_encode(tiny_sample, st_model_dir, tmp_path):
    forwards = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: forwards.append(type(module).__name__) if type(module).__name__ == "BertModel" else None)
    try:
        first = mine(tiny_sample, tmp_path / "a.parquet", retriever="dense", model=str(st_model_dir),
                     cache_dir=tmp_path / "cache")
        encoded = len(forwards)
        second = mine(tiny_sample, tmp_path / "b.parquet", retriever="dense", model=str(st_model_dir),
                      cache_dir=tmp_path / "cache", mining=MiningConfig(num_negatives=2, max_score=0.95, range_min=3))
    finally:
        hook.remove()
    assert encoded > 0 and len(forwards) == encoded  # the second run: no forward pass at all
    assert first["model"]["cached"] == {"documents": False, "queries": False}
    assert second["model"]["cached"] == {"documents": True, "queries": True}
    assert negatives_by_query(tmp_path / "a.parquet") != negatives_by_query(tmp_path / "b.parquet")


def test_random_sampling_is_seeded(tiny_sample, tmp_path):
    def sampled(seed: int) -> dict:
        out = tmp_path / f"{seed}.parquet"
        mine(tiny_sample, out, retriever="bm25", mining=MiningConfig(num_negatives=2, range_max=12, sampling="random",
                                                                      seed=seed))
        return negatives_by_query(out)

    assert sampled(1) == sampled(1)
    assert agreement(sampled(1), sampled(2)) < 0.5


def test_a_folder_output_holds_the_pairs_and_the_summary(small_sample, tmp_path):
    out = tmp_path / "mined"
    mine(small_sample, out, retriever="bm25")
    assert sorted(p.name for p in out.iterdir()) == ["pairs.parquet", "summary.json"]
    assert len(load_training_pairs(out, num_negatives=3)) == 300


def test_the_report_names_each_filter_and_the_short_queries(bm25_out):
    text = format_report(bm25_out[1]["report"])
    assert "removed by positive" in text
    assert f"{bm25_out[1]['report']['short_queries']} queries got fewer than 3 negatives" in text


# ----------------------------------------------------------------------------- bad input


def _nothing_written(out: Path) -> None:
    assert [p.name for p in out.parent.iterdir()] == ["old.parquet"]
    assert out.read_bytes() == b"old"


@pytest.fixture
def out(tmp_path) -> Path:
    path = tmp_path / "out" / "old.parquet"
    path.parent.mkdir()
    path.write_bytes(b"old")
    return path


def test_an_unknown_doc_id_in_the_qrels_names_the_file_and_line(sample_copy, out):
    qrels = sample_copy / "qrels" / "train.tsv"
    lines = qrels.read_text().splitlines()
    qrels.write_text("\n".join(lines + ["dqe620f1beead2\tno-such-doc\t1"]) + "\n")
    with pytest.raises(DataError, match=rf"{qrels}:{len(lines) + 1}: unknown doc id 'no-such-doc'"):
        mine(sample_copy, out, retriever="bm25")
    _nothing_written(out)


def test_an_empty_corpus_is_named(sample_copy, out):
    (sample_copy / "corpus.jsonl").write_text("\n")
    with pytest.raises(DataError, match=rf"{sample_copy / 'corpus.jsonl'}: no documents"):
        mine(sample_copy, out, retriever="bm25")
    _nothing_written(out)


def test_a_model_uri_that_does_not_resolve_is_named(small_sample, out, tmp_path):
    with pytest.raises(ModelURIError, match=f"model '{tmp_path}/nope'"):
        mine(small_sample, out, retriever="dense", model=str(tmp_path / "nope"), cache_dir=None)
    _nothing_written(out)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"retriever": "dense"}, "the dense retriever needs a model"),
    ({"retriever": "bm25", "model": "m"}, "--model m is only used by the dense retriever"),
    ({"retriever": "splade"}, "retriever must be one of"),
])
def test_options_are_checked(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        MineOptions(data="bundled:debian", out=tmp_path / "x.parquet", **kwargs)
