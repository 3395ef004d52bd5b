"""The Arrow pair table against a naive reference built from Python lists: same rows, same
duplicate structure, same loss inputs; and its buffers really are shared through Ray."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from samtone_ray.data import sources as data
from samtone_ray.data.batching import PairKeys, Schedule, make_shard, pick_negatives
from samtone_ray.data.sources import DataError, load_training_pairs, text_keys
from samtone_ray.model.losses import contrastive_loss
from samtone_ray.data.pairs import PairTable, TrainingPairs
from samtone_ray.train.trainer import batch_keys


def naive_pairs(n: int = 60, seed: int = 0) -> TrainingPairs:
    """Pairs drawn from small vocabularies, so that queries, documents and hard negatives repeat
    (within and across columns) and some negative lists are empty or shorter than K."""
    rng = random.Random(seed)
    queries = [f"query {rng.randrange(15)} é" for _ in range(n)]
    documents = [f"document {rng.randrange(25)}" for _ in range(n)]
    negatives = [[f"document {rng.randrange(30)}" for _ in range(rng.choice([0, 1, 2, 3]))] for _ in range(n)]
    negatives[7] = [documents[7]]  # a hard negative equal to its own positive
    return TrainingPairs(queries=queries, documents=documents, negatives=negatives,
                         query_ids=[f"q{i}" for i in range(n)], doc_ids=[f"d{i}" for i in range(n)])


@pytest.fixture
def parquet_folder(tmp_path, monkeypatch):
    """The naive pairs as two Parquet files read in 7-row batches: a table of many chunks."""
    monkeypatch.setattr(data, "_PARQUET_BATCH_ROWS", 7)
    ref = naive_pairs()
    columns = {"query": ref.queries, "document": ref.documents, "negatives": ref.negatives,
               "query_id": ref.query_ids, "doc_id": ref.doc_ids}
    folder = tmp_path / "pairs"
    folder.mkdir()
    split = 25
    pq.write_table(pa.table({k: v[:split] for k, v in columns.items()}), folder / "a.parquet", row_group_size=10)
    # large_string in the second file: the table must still have one schema.
    second = pa.table({k: v[split:] for k, v in columns.items()})
    second = second.cast(pa.schema([(f.name, pa.large_string() if f.type == pa.string() else f.type) for f in second.schema]))
    pq.write_table(second, folder / "b.parquet")
    return folder, ref


def test_subset_matches_the_python_lists_across_chunks(parquet_folder):
    folder, ref = parquet_folder
    table = load_training_pairs(folder)
    assert table.table.column("document").num_chunks > 5
    indices = np.random.default_rng(0).integers(0, len(ref), 200)  # repeats, every chunk, any order
    assert table.subset(indices) == ref.subset(indices)
    assert table.subset([]) == ref.subset([])
    assert table.to_pairs() == ref
    with pytest.raises(IndexError, match="60"):
        table.subset([3, 60])
    with pytest.raises(IndexError, match="-1"):
        table.subset([-1])


def _same_structure(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal keys exactly where the reference keys are equal (codes need not equal hashes)."""
    got, expected = got.reshape(-1), expected.reshape(-1)
    assert torch.equal(got[:, None] == got[None, :], expected[:, None] == expected[None, :])


@pytest.mark.parametrize("k", [0, 1, 3])
def test_keys_have_the_duplicate_structure_of_text_hashes(parquet_folder, k):
    folder, ref = parquet_folder
    table = load_training_pairs(folder)
    rows = [i for i in range(len(ref)) if ref.negatives[i]] if k else list(range(len(ref)))
    indices = np.asarray(rows)[np.random.default_rng(k).permutation(len(rows))[:40]]
    got = batch_keys(PairKeys.build(table, k), indices)
    batch = ref.subset(indices)
    assert set(got) == ({"query", "doc", "negatives"} if k else {"query", "doc"})
    assert got["query"].dtype == got["doc"].dtype == torch.int64
    _same_structure(got["query"], text_keys(batch.queries))
    if k:
        assert got["negatives"].shape == (len(indices), k)
        negatives = [t for row in batch.negatives for t in pick_negatives(row, k)]
        # Documents and hard negatives share one code space: a negative equal to a positive is seen.
        _same_structure(torch.cat([got["doc"], got["negatives"].reshape(-1)]),
                        torch.cat([text_keys(batch.documents), text_keys(negatives)]))
    else:
        _same_structure(got["doc"], text_keys(batch.documents))


def test_loss_inputs_equal_those_of_the_python_reference(parquet_folder):
    """The masked SamToNe loss with hard negatives is the same number with table keys as with
    hashes of the Python strings (masking reads only which keys are equal)."""
    folder, ref = parquet_folder
    table = load_training_pairs(folder)
    indices = np.asarray([i for i in range(len(ref)) if ref.negatives[i]][:24])
    k, dim = 2, 8
    g = torch.Generator().manual_seed(0)
    q, d, hard = torch.randn(24, dim, generator=g), torch.randn(24, dim, generator=g), torch.randn(24, k, dim, generator=g)
    batch = ref.subset(indices)
    reference = {"query": text_keys(batch.queries), "doc": text_keys(batch.documents),
                 "negatives": text_keys([t for row in batch.negatives for t in pick_negatives(row, k)]).view(24, k)}
    losses = []
    for keys in (batch_keys(PairKeys.build(table, k), indices), reference):
        losses.append(contrastive_loss(q, d, same_tower="both", bidirectional=True, temperature=0.05,
                                       hard_negatives=hard, query_keys=keys["query"], doc_keys=keys["doc"],
                                       hard_negative_keys=keys["negatives"]))
    unmasked = contrastive_loss(q, d, same_tower="both", bidirectional=True, temperature=0.05, hard_negatives=hard)
    assert float(losses[0]) == float(losses[1])
    assert float(losses[0]) != pytest.approx(float(unmasked), abs=1e-4)  # the data does have duplicates


def test_global_batch_is_the_same_for_any_worker_count(parquet_folder):
    folder, ref = parquet_folder
    table = load_training_pairs(folder)
    schedule = Schedule(len(table), batch_size=12, seed=3, epochs=2)
    for step in range(schedule.total_steps):
        indices = schedule.batch(step)
        expected = ref.subset(indices)
        for world in (1, 2, 3, 4):
            per = len(indices) // world
            shards = [table.subset(indices[r * per : (r + 1) * per]) for r in range(world)]
            assert [q for s in shards for q in s.queries] == expected.queries
            assert [d for s in shards for d in s.documents] == expected.documents


def test_shard_from_the_table_equals_the_shard_from_lists(parquet_folder, tiny_model_dir):
    from transformers import AutoTokenizer

    folder, ref = parquet_folder
    table = load_training_pairs(folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    indices = np.asarray([i for i in range(len(ref)) if ref.negatives[i]][:10])
    shards = [make_shard(p, indices, tokenizer, query_max_length=8, doc_max_length=8, num_negatives=2, chunk_size=4)
              for p in (table, ref)]
    assert shards[0].num_tokens == shards[1].num_tokens
    for part in ("queries", "documents", "negatives"):
        a, b = getattr(shards[0], part), getattr(shards[1], part)
        assert torch.equal(a.order, b.order) and len(a.chunks) == len(b.chunks)
        for x, y in zip(a.chunks, b.chunks):
            assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)


def test_keys_refuse_missing_negatives():
    pairs = TrainingPairs(queries=["a", "b"], documents=["A", "B"], negatives=[["x"], []])
    with pytest.raises(ValueError, match="no negatives"):
        PairKeys.build(pairs, 1).take(np.array([0, 1]))
    cycled = PairKeys.build(pairs, 3).take(np.array([0]))["negatives"]  # one negative, K=3: cycled
    assert cycled.shape == (1, 3) and len(set(cycled.tolist()[0])) == 1
    with pytest.raises(ValueError, match="num_hard_negatives=2"):
        PairKeys.build(TrainingPairs(queries=["a"], documents=["A"]), 2)


@pytest.mark.parametrize("row", range(5))
def test_null_inside_negatives_names_its_row_in_any_batch(tmp_path, monkeypatch, row):
    """The row of a null text inside a list is found from the list lengths, null lists included."""
    monkeypatch.setattr(data, "_PARQUET_BATCH_ROWS", 2)
    negatives = [["n1", "n2"], None, [], ["n3"], ["n4", "n5", "n6"]]
    negatives[row] = ["ok", None]
    path = tmp_path / "neg.parquet"
    pq.write_table(pa.table({"query": list("abcde"), "document": list("ABCDE"), "negatives": negatives}), path,
                   row_group_size=2)
    with pytest.raises(DataError, match=f"neg.parquet: null text inside column 'negatives' at row index {row}$"):
        load_training_pairs(path)


def test_table_lives_in_the_object_store_not_in_the_worker(ray_cluster):
    """Every Arrow buffer and key array a worker gets lies in the shared mapping of Ray's object
    store: it was not copied into the worker's own heap."""
    pairs = PairTable.from_pairs(naive_pairs(400))
    ref = ray_cluster.put(pairs)

    @ray_cluster.remote
    def locate(box):
        got = ray_cluster.get(box[0])
        spans = []
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)  # address, perms, offset, dev, inode[, path]
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                spans.append((lo, hi, fields[5].strip() if len(fields) > 5 else ""))
        arrays = [got.keys.query, got.keys.doc, got.keys.negative_offsets, got.keys.negative_codes]
        addresses = [b.address for column in got.table.columns for chunk in column.chunks
                     for b in chunk.buffers() if b is not None and b.size]
        addresses += [a.ctypes.data for a in arrays]
        return [next((name for lo, hi, name in spans if lo <= a < hi), None) for a in addresses], got.to_pairs()

    places, copy = ray_cluster.get(locate.remote([ref]))
    assert copy == pairs.to_pairs()
    store = {p for p in places if p and "plasma" in p}
    assert len(store) == 1 and all(p in store for p in places), set(places)
