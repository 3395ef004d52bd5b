"""Tests for samtone_ray.data.sources against naive, independent readings of the files."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from samtone_ray.data import sources as data
from samtone_ray.data.sources import (
    BeirSplit,
    DataError,
    TrainingPairs,
    bundled_sample_path,
    iter_jsonl,
    load_beir,
    load_training_pairs,
    read_qrels,
    text_key,
    text_keys,
)

# --------------------------------------------------------------------------------------------
# Naive oracles: read the BEIR files with nothing but str.split and json.loads.
# --------------------------------------------------------------------------------------------


def naive_corpus(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        title = rec.get("title", "")
        out[rec["_id"]] = (title + " " + rec["text"]) if title else rec["text"]
    return out


def naive_queries(path: Path) -> dict[str, str]:
    return {json.loads(line)["_id"]: json.loads(line)["text"] for line in path.read_text("utf-8").splitlines()}


def naive_qrels_rows(path: Path) -> list[tuple[str, str, int]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "query-id\tcorpus-id\tscore"
    return [(q, d, int(s)) for q, d, s in (line.split("\t") for line in lines[1:])]


def readme_counts(path: Path) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^\| ([a-z ]+) \| (\d+) \|$", path.read_text("utf-8"), re.M)}


# --------------------------------------------------------------------------------------------
# Bundled sample
# --------------------------------------------------------------------------------------------

SAMPLE = bundled_sample_path()


def test_bundled_sample_lives_in_the_package():
    assert SAMPLE == Path(data.__file__).parents[1] / "sample" / "debian"
    for name in ("README.md", "corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/dev.tsv"):
        assert (SAMPLE / name).is_file(), name


def test_bundled_sample_counts_match_readme_and_files():
    counts = readme_counts(SAMPLE / "README.md")
    corpus = naive_corpus(SAMPLE / "corpus.jsonl")
    queries = naive_queries(SAMPLE / "queries.jsonl")
    assert counts["corpus documents"] == len(corpus)
    assert counts["queries"] == len(queries)
    assert "Debian package descriptions (Debian 12)" in (SAMPLE / "README.md").read_text("utf-8")

    splits = {}
    names = {"train": ("train queries", "train pairs"), "dev": ("dev queries", "dev qrels rows")}
    for split, (n_queries, n_rows) in names.items():
        rows = naive_qrels_rows(SAMPLE / "qrels" / f"{split}.tsv")
        loaded = load_beir(SAMPLE, split)
        assert isinstance(loaded, BeirSplit)
        assert counts[n_rows] == len(rows) == sum(len(d) for d in loaded.qrels.values())
        assert counts[n_queries] == len({q for q, _, _ in rows}) == len(loaded.queries)
        assert loaded.corpus == corpus
        assert loaded.queries == {q: queries[q] for q, _, _ in rows}
        assert loaded.qrels == {q: {d: s for q2, d, s in rows if q2 == q} for q, _, _ in rows}
        assert all(d in corpus for _, d, _ in rows)
        splits[split] = rows
    # Disjoint splits, as in the source.
    assert not {q for q, _, _ in splits["train"]} & {q for q, _, _ in splits["dev"]}
    assert not {d for _, d, _ in splits["train"]} & {d for _, d, _ in splits["dev"]}
    # Sized as asked: ~3000 train pairs, ~300 dev queries.
    assert 2500 <= counts["train pairs"] <= 3500 and 250 <= counts["dev queries"] <= 350


def test_training_pairs_from_bundled_sample_match_naive_reading():
    pairs = load_training_pairs(SAMPLE, "train").to_pairs()
    rows = [r for r in naive_qrels_rows(SAMPLE / "qrels" / "train.tsv") if r[2] > 0]
    corpus = naive_corpus(SAMPLE / "corpus.jsonl")
    queries = naive_queries(SAMPLE / "queries.jsonl")
    assert len(pairs) == len(rows)
    assert pairs.negatives is None
    for i in random.Random(0).sample(range(len(rows)), 25):
        q, d, _ = rows[i]
        assert (pairs.query_ids[i], pairs.doc_ids[i]) == (q, d)
        assert pairs.queries[i] == queries[q]
        assert pairs.documents[i] == corpus[d]


# --------------------------------------------------------------------------------------------
# Tiny hand-written BEIR folder
# --------------------------------------------------------------------------------------------

CORPUS = [
    '{"_id": "d1", "title": "T1", "text": "doc one"}',
    '{"_id": "d2", "title": "", "text": "doc two é"}',
    '{"_id": "d3", "text": "doc three"}',
    '{"_id": "d4", "title": "", "text": "unjudged"}',
]
QUERIES = [
    '{"_id": "q1", "text": "query one"}',
    '{"_id": "q2", "text": "query two"}',
    '{"_id": "q3", "text": "query 3"}',
]
TRAIN = ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\td2\t1", "q2\td2\t0", "q2\td3\t2"]
DEV = ["query-id\tcorpus-id\tscore", "q3\td3\t1"]


def make_beir(root: Path, corpus=CORPUS, queries=QUERIES, train=TRAIN, dev=DEV) -> Path:
    (root / "qrels").mkdir(parents=True)
    files = {"corpus.jsonl": corpus, "queries.jsonl": queries, "qrels/train.tsv": train, "qrels/dev.tsv": dev}
    for name, lines in files.items():
        (root / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return root


@pytest.fixture
def beir(tmp_path: Path) -> Path:
    return make_beir(tmp_path / "beir")


def test_load_beir_tiny(beir):
    split = load_beir(beir, "train")
    assert split.corpus == {"d1": "T1 doc one", "d2": "doc two é", "d3": "doc three", "d4": "unjudged"}
    assert split.queries == {"q1": "query one", "q2": "query two"}
    assert split.qrels == {"q1": {"d1": 1, "d2": 1}, "q2": {"d2": 0, "d3": 2}}
    dev = load_beir(str(beir), "dev")
    assert dev.queries == {"q3": "query 3"} and dev.qrels == {"q3": {"d3": 1}}


def test_read_qrels_tiny(beir):
    assert read_qrels(beir / "qrels" / "train.tsv") == {"q1": {"d1": 1, "d2": 1}, "q2": {"d2": 0, "d3": 2}}


def test_training_pairs_tiny_keep_positive_rows_in_file_order(beir):
    pairs = load_training_pairs(beir).to_pairs()
    assert pairs.queries == ["query one", "query one", "query two"]
    assert pairs.documents == ["T1 doc one", "doc two é", "doc three"]
    assert pairs.query_ids == ["q1", "q1", "q2"] and pairs.doc_ids == ["d1", "d2", "d3"]
    assert load_training_pairs(beir, "dev").to_pairs().documents == ["doc three"]


@pytest.mark.parametrize("load", [lambda p: load_beir(p, "train"), lambda p: load_training_pairs(p, "train")])
def test_corpus_is_read_once(beir, monkeypatch, load):
    opened = []
    real = data.iter_jsonl

    def spy(path):
        opened.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(data, "iter_jsonl", spy)
    load(beir)
    assert opened.count("corpus.jsonl") == 1 and opened.count("queries.jsonl") == 1


def test_iter_jsonl_numbers_lines_and_skips_blank(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (3, {"a": 2})]


def test_iter_jsonl_reads_a_file_saved_with_a_utf8_byte_order_mark(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n', encoding="utf-8-sig")
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (2, {"a": 2})]


# --------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------

PAIRS = {
    "query": ["q a", "q b", "q c", "q d", "q e"],
    "document": ["d a", "d b", "d c", "d d", "d e"],
    "negatives": [["n1", "n2"], [], None, ["n3"], ["n4", "n5", "n6"]],
    "query_id": ["qa", "qb", "qc", "qd", "qe"],
    "doc_id": ["da", "db", "dc", "dd", "de"],
}


def write_parquet(path: Path, columns: dict, row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_parquet_round_trip_with_negatives_and_ids(tmp_path):
    path = write_parquet(tmp_path / "pairs.parquet", PAIRS, row_group_size=2)
    pairs = load_training_pairs(path).to_pairs()
    assert len(pairs) == 5
    assert pairs.queries == PAIRS["query"] and pairs.documents == PAIRS["document"]
    # A null list means "no negatives for this pair".
    assert pairs.negatives == [["n1", "n2"], [], [], ["n3"], ["n4", "n5", "n6"]]
    assert pairs.query_ids == PAIRS["query_id"] and pairs.doc_ids == PAIRS["doc_id"]


def test_parquet_folder_is_read_in_name_order(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_PARQUET_BATCH_ROWS", 2)
    folder = tmp_path / "pairs"
    folder.mkdir()
    write_parquet(folder / "part-1.parquet", {k: v[3:] for k, v in PAIRS.items()})
    write_parquet(folder / "part-0.parquet", {k: v[:3] for k, v in PAIRS.items()})
    pairs = load_training_pairs(folder).to_pairs()
    assert pairs.queries == PAIRS["query"] and pairs.doc_ids == PAIRS["doc_id"]


def test_parquet_without_optional_columns(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", {"document": ["d"], "query": ["q"], "extra": [1]})
    pairs = load_training_pairs(path).to_pairs()
    assert (pairs.queries, pairs.documents) == (["q"], ["d"])
    assert pairs.negatives is None and pairs.query_ids is None and pairs.doc_ids is None


# --------------------------------------------------------------------------------------------
# TrainingPairs
# --------------------------------------------------------------------------------------------


def test_subset_keeps_columns_aligned():
    pairs = TrainingPairs(
        queries=["a", "b", "c"], documents=["A", "B", "C"], negatives=[["x"], [], ["y", "z"]], doc_ids=["1", "2", "3"]
    )
    sub = pairs.subset([2, 0, 2])
    assert sub.queries == ["c", "a", "c"] and sub.documents == ["C", "A", "C"]
    assert sub.negatives == [["y", "z"], ["x"], ["y", "z"]] and sub.doc_ids == ["3", "1", "3"]
    assert sub.query_ids is None and len(sub) == 3
    assert pairs.subset(torch.tensor([1])).queries == ["b"]
    with pytest.raises(IndexError, match="3"):
        pairs.subset([3])
    with pytest.raises(IndexError, match="-1"):
        pairs.subset([-1])


def test_training_pairs_refuse_ragged_columns():
    with pytest.raises(ValueError, match="documents"):
        TrainingPairs(queries=["a", "b"], documents=["A"])
    with pytest.raises(ValueError, match="negatives"):
        TrainingPairs(queries=["a"], documents=["A"], negatives=[[], []])


# --------------------------------------------------------------------------------------------
# Errors: each names the file and the line or column
# --------------------------------------------------------------------------------------------

LOADERS = pytest.mark.parametrize(
    "load", [lambda p: load_beir(p, "train"), lambda p: load_training_pairs(p, "train")], ids=["beir", "pairs"]
)


def raises(pattern_parts: list[str]):
    """pytest.raises(DataError) whose message contains every part (literal match)."""
    return pytest.raises(DataError, match="(?s)" + "".join(f"(?=.*{re.escape(p)})" for p in pattern_parts))


@LOADERS
@pytest.mark.parametrize(
    "file, lines, expected",
    [
        ("corpus", [CORPUS[0], "{not json", *CORPUS[2:]], ["corpus.jsonl:2", "invalid JSON"]),
        ("corpus", [CORPUS[0], '{"title": "", "text": "t"}', *CORPUS[1:]], ["corpus.jsonl:2", "'_id'"]),
        ("corpus", [*CORPUS[:2], '{"_id": "d3", "title": "x"}', CORPUS[3]], ["corpus.jsonl:3", "'text'"]),
        ("corpus", [*CORPUS, '["a list"]'], ["corpus.jsonl:5", "JSON object"]),
        ("corpus", [CORPUS[0], CORPUS[1], CORPUS[0], *CORPUS[2:]], ["corpus.jsonl:3", "duplicate", "d1", "line 1"]),
        ("corpus", [*CORPUS, '{"_id": "d9", "text": 7}'], ["corpus.jsonl:5", "'text'", "string"]),
        ("queries", [*QUERIES[:2], '{"_id": "q3", "text": "x"'], ["queries.jsonl:3", "invalid JSON"]),
        ("queries", [QUERIES[0], '{"_id": "q2"}', QUERIES[2]], ["queries.jsonl:2", "'text'"]),
        ("queries", [*QUERIES, QUERIES[1]], ["queries.jsonl:4", "duplicate", "q2"]),
        ("train", [*TRAIN[:2], "q1\td2", *TRAIN[3:]], ["train.tsv:3", "3 tab-separated fields", "got 2"]),
        ("train", [*TRAIN[:3], "q2\td2\t0\textra", TRAIN[4]], ["train.tsv:4", "got 4"]),
        ("train", [*TRAIN[:3], "q2\td2\tone", TRAIN[4]], ["train.tsv:4", "integer", "'one'"]),
        ("train", [*TRAIN[:2], "q1\td2\t1.5"], ["train.tsv:3", "integer", "'1.5'"]),
        ("train", [*TRAIN, "q1\td1\t1"], ["train.tsv:6", "duplicate", "q1", "d1"]),
        ("train", [*TRAIN[:2], "q9\td2\t1", *TRAIN[3:]], ["train.tsv:3", "unknown query id", "'q9'"]),
        ("train", [*TRAIN[:4], "q2\td9\t2"], ["train.tsv:5", "unknown doc id", "'d9'"]),
    ],
)
def test_malformed_beir_files(tmp_path, load, file, lines, expected):
    root = make_beir(tmp_path / "beir", **{file: lines})
    with raises(expected):
        load(root)


@LOADERS
def test_invalid_utf8_names_the_line(tmp_path, load):
    root = make_beir(tmp_path / "beir")
    (root / "corpus.jsonl").write_bytes(b'{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": "\xff"}\n')
    with raises(["corpus.jsonl:2", "UTF-8"]):
        load(root)


def test_empty_split_names_the_file(tmp_path):
    root = make_beir(tmp_path / "beir", train=[TRAIN[0]])
    with raises(["train.tsv", "empty"]):
        load_beir(root, "train")
    with raises(["train.tsv", "no positive pairs"]):
        load_training_pairs(root)


def test_split_with_only_zero_scores_has_no_training_pairs(tmp_path):
    root = make_beir(tmp_path / "beir", train=[TRAIN[0], "q2\td2\t0"])
    assert load_beir(root, "train").qrels == {"q2": {"d2": 0}}
    with raises(["train.tsv", "no positive pairs"]):
        load_training_pairs(root)


@LOADERS
@pytest.mark.parametrize("missing", ["corpus.jsonl", "queries.jsonl"])
def test_missing_file_is_named(tmp_path, load, missing):
    root = make_beir(tmp_path / "beir")
    (root / missing).unlink()
    with raises([missing, "not found"]):
        load(root)


def test_missing_folder_and_split_are_named(tmp_path, beir):
    with raises(["no-such-folder", "not found"]):
        load_beir(tmp_path / "no-such-folder", "train")
    with raises(["no-such-folder"]):
        load_training_pairs(tmp_path / "no-such-folder")
    with raises(["test.tsv", "'test'", "['dev', 'train']"]):
        load_beir(beir, "test")
    with raises(["test.tsv"]):
        load_training_pairs(beir, "test")
    with raises(["nothing.tsv", "not found"]):
        read_qrels(tmp_path / "nothing.tsv")
    with raises(["nothing.jsonl", "not found"]):
        next(iter_jsonl(tmp_path / "nothing.jsonl"))
    (tmp_path / "empty").mkdir()
    with raises(["empty", "parquet"]):
        load_training_pairs(tmp_path / "empty")


def test_qrels_without_header_is_read_as_data(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text("q1\td1\t1\nq1\td2\t0\n", encoding="utf-8")
    assert read_qrels(path) == {"q1": {"d1": 1, "d2": 0}}


def test_parquet_missing_column_names_file_and_present_columns(tmp_path):
    path = write_parquet(tmp_path / "pairs.parquet", {"query": ["q"], "doc": ["d"]})
    with raises(["pairs.parquet", "'document'", "'query'", "'doc'"]):
        load_training_pairs(path)


@pytest.mark.parametrize("column", ["query", "document", "query_id"])
def test_parquet_null_names_file_row_and_column(tmp_path, monkeypatch, column):
    # Small batches so that the reported row index must include the offset of earlier batches.
    monkeypatch.setattr(data, "_PARQUET_BATCH_ROWS", 2)
    columns = {k: list(v) for k, v in PAIRS.items()}
    columns[column][3] = None
    path = write_parquet(tmp_path / "nulls.parquet", columns, row_group_size=2)
    with raises(["nulls.parquet", "row index 3", f"'{column}'"]):
        load_training_pairs(path)


def test_parquet_null_inside_negatives_is_an_error(tmp_path):
    columns = {k: list(v) for k, v in PAIRS.items()}
    columns["negatives"][4] = ["ok", None]
    path = write_parquet(tmp_path / "neg.parquet", columns)
    with raises(["neg.parquet", "row index 4", "'negatives'"]):
        load_training_pairs(path)


def test_parquet_wrong_types_and_files(tmp_path):
    with raises(["ints.parquet", "'query'", "string"]):
        load_training_pairs(write_parquet(tmp_path / "ints.parquet", {"query": [1], "document": ["d"]}))
    with raises(["negs.parquet", "'negatives'", "list<string>"]):
        flat = {"query": ["q"], "document": ["d"], "negatives": ["n"]}
        load_training_pairs(write_parquet(tmp_path / "negs.parquet", flat))
    empty = pa.table({"query": pa.array([], pa.string()), "document": pa.array([], pa.string())})
    pq.write_table(empty, tmp_path / "zero.parquet")
    with raises(["zero.parquet", "zero rows"]):
        load_training_pairs(tmp_path / "zero.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with raises(["junk.parquet", "Parquet"]):
        load_training_pairs(tmp_path / "junk.parquet")
    with raises(["missing.parquet", "not found"]):
        load_training_pairs(tmp_path / "missing.parquet")


def test_parquet_folder_with_mismatched_optional_columns(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_parquet(folder / "a.parquet", PAIRS)
    write_parquet(folder / "b.parquet", {"query": ["q"], "document": ["d"]})
    with raises(["b.parquet", "a.parquet"]):
        load_training_pairs(folder)


@pytest.mark.parametrize("empty", [[], None], ids=["empty-list", "null-list"])
def test_parquet_row_without_negatives_fails_at_load_when_negatives_are_trained(tmp_path, monkeypatch, empty):
    from samtone_ray.core.config import from_dict

    monkeypatch.setattr(data, "_PARQUET_BATCH_ROWS", 2)  # the row index must include earlier batches
    columns = {k: list(v) for k, v in PAIRS.items()}
    columns["negatives"] = [["n1"], ["n2"], ["n3"], empty, ["n5"]]
    path = write_parquet(tmp_path / "holes.parquet", columns, row_group_size=2)
    cfg = from_dict({"data": {"train": str(path), "eval": "", "num_hard_negatives": 2}})
    with raises(["holes.parquet", "row index 3", "'negatives'", "data.num_hard_negatives=2"]):
        data.load_data(cfg)
    # Without hard negatives in training the same file loads: the lists are unused.
    assert load_training_pairs(path).to_pairs().negatives[3] == []


def test_hard_negatives_need_a_negatives_column(tmp_path, beir):
    path = write_parquet(tmp_path / "plain.parquet", {"query": ["q"], "document": ["d"]})
    with raises(["plain.parquet", "'negatives'", "data.num_hard_negatives=1"]):
        load_training_pairs(path, num_negatives=1)
    with raises([str(beir), "data.num_hard_negatives=1", "BEIR"]):
        load_training_pairs(beir, num_negatives=1)


# --------------------------------------------------------------------------------------------
# Text keys
# --------------------------------------------------------------------------------------------


def test_text_key_known_values():
    # Pinned so that any change of hash function (which would silently change masking across
    # saved artefacts) fails here: blake2b, 8-byte digest, little endian, signed.
    assert text_key("hello") == 9022087748821825191
    assert text_key("") == -5426141060434712860
    assert text_key("Real-time strategy game of ancient warfare") == 7506274084302688888


def test_text_key_stable_and_distinct():
    texts = [f"text {i}" for i in range(2000)] + ["é ü 漢字", "hello ", "Hello"]
    keys = [text_key(t) for t in texts]
    assert keys == [text_key(t) for t in list(texts)]  # same text -> same key
    assert len(set(keys)) == len(texts)  # different texts -> different keys
    assert all(-(2**63) <= k < 2**63 for k in keys) and min(keys) < 0 < max(keys)
    assert text_key("a" * 3) == text_key("".join(["a", "a", "a"]))


def test_text_keys_tensor():
    texts = ["a", "b", "a", "é"]
    keys = text_keys(texts)
    assert isinstance(keys, torch.Tensor) and keys.dtype == torch.int64 and keys.shape == (4,)
    assert keys.tolist() == [text_key(t) for t in texts]
    assert keys[0] == keys[2] and keys[0] != keys[1]
    assert text_keys([]).dtype == torch.int64 and text_keys([]).shape == (0,)


# --------------------------------------------------------------------------------------------
# A bounded eval corpus (train.eval_max_docs)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dev_split() -> BeirSplit:
    return load_beir(bundled_sample_path(), "dev")


def test_bounded_eval_corpus_keeps_every_judged_document_and_has_the_requested_size(dev_split):
    judged = {d for qrel in dev_split.qrels.values() for d in qrel}  # naive: straight from the qrels
    bounded = data.bound_eval_corpus(dev_split, 1000)
    assert len(bounded.corpus) == 1000
    assert judged <= set(bounded.corpus)
    assert all(bounded.corpus[d] == dev_split.corpus[d] for d in bounded.corpus)  # texts untouched
    assert list(bounded.corpus) == [d for d in dev_split.corpus if d in bounded.corpus]  # corpus order kept
    assert bounded.queries == dev_split.queries and bounded.qrels == dev_split.qrels
    assert bounded.corpus_total == len(dev_split.corpus) == 5317
    assert bounded.corpus_params() == {"eval_docs": 1000, "eval_docs_total": 5317}
    assert bounded.corpus_summary() == "1000 of 5317 documents (relevant + fixed sample)"
    # The others are a random sample, not the head of the file.
    others = [d for d in bounded.corpus if d not in judged]
    head = [d for d in dev_split.corpus if d not in judged][: len(others)]
    assert others != head


def test_bounded_eval_corpus_is_fixed_by_the_document_ids_alone(dev_split):
    first = data.bound_eval_corpus(dev_split, 700)
    assert first.corpus == data.bound_eval_corpus(dev_split, 700).corpus
    shuffled = list(dev_split.corpus.items())
    random.Random(3).shuffle(shuffled)
    reordered = BeirSplit(corpus=dict(shuffled), queries=dev_split.queries, qrels=dev_split.qrels)
    assert set(data.bound_eval_corpus(reordered, 700).corpus) == set(first.corpus)
    # Bounding again keeps the original total.
    again = data.bound_eval_corpus(first, 500)
    assert again.corpus_total == 5317 and len(again.corpus) == 500


def test_load_data_bounds_the_eval_corpus_once_independently_of_the_seed(dev_split):
    from samtone_ray.core.config import load_config

    _, a = data.load_data(load_config(None, ["train.eval_max_docs=800", "train.seed=1"]))
    _, b = data.load_data(load_config(None, ["train.eval_max_docs=800", "train.seed=12345"]))
    assert len(a.corpus) == 800 and a.corpus == b.corpus
    assert a.corpus == data.bound_eval_corpus(dev_split, 800).corpus
    # 0 = the whole corpus, as loaded.
    _, whole = data.load_data(load_config(None, ["train.eval_max_docs=0"]))
    assert whole.corpus == dev_split.corpus and whole.corpus_total is None
    assert whole.corpus_params() == {"eval_docs": 5317, "eval_docs_total": 5317}
    assert whole.corpus_summary() == "all 5317 documents"
    assert data.bound_eval_corpus(dev_split, 6000) is dev_split  # a cap above the corpus changes nothing


def test_bounded_eval_corpus_below_the_judged_documents_keeps_them_all_and_says_so(dev_split, caplog):
    judged = {d for qrel in dev_split.qrels.values() for d in qrel}
    with caplog.at_level("WARNING", logger="samtone_ray.data.sources"):
        bounded = data.bound_eval_corpus(dev_split, 10)
    assert set(bounded.corpus) == judged
    assert "train.eval_max_docs=10" in caplog.text and f"{len(judged)} documents" in caplog.text
    with pytest.raises(ValueError, match="max_docs must be >= 0"):
        data.bound_eval_corpus(dev_split, -1)
