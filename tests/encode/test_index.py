"""SearchIndex kinds (pure: no Ray): faiss IVF and HNSW against exact inner-product search,
save/load round trips and the model check that serving relies on."""

from __future__ import annotations

import pytest
import torch

from samtone_ray.encode.index import IndexError_, SearchIndex, recall_at_k


def _clustered(n: int, dim: int = 24, centers: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, dim, generator=g)
    x = c[torch.randint(0, centers, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def _index(kind: str, emb: torch.Tensor, **params) -> SearchIndex:
    n = emb.shape[0]
    ids = [f"d{i}" for i in range(n)]
    return SearchIndex(ids, emb, [""] * n, [f"t{i}" for i in range(n)], model={"uri": "m", "fingerprint": "f1"}, kind=kind, params=params)


@pytest.mark.parametrize("kind", ["faiss-ivf", "faiss-hnsw"])
def test_approximate_kinds_agree_with_naive_top_k_and_survive_save_load(tmp_path, kind):
    emb = _clustered(2000)
    index = _index(kind, emb)
    queries = _clustered(50, seed=1)
    # The oracle: a full score matrix sorted naively.
    naive = (queries @ emb.T).argsort(dim=1, descending=True)[:, :10]
    _, rows = index.search(queries, 10)
    recall = sum(len(set(r.tolist()) & set(t.tolist())) for r, t in zip(rows, naive)) / naive.numel()
    assert recall >= 0.9
    assert recall == pytest.approx(recall_at_k(index, queries, 10))
    loaded = SearchIndex.load(index.save(tmp_path / kind))
    assert loaded.kind == kind and loaded.params == index.params and loaded.ids == index.ids
    scores2, rows2 = loaded.search(queries, 10)
    assert torch.equal(rows2, rows)
    torch.testing.assert_close(scores2, (queries @ emb.T).gather(1, rows2), atol=1e-5, rtol=0)
    loaded.check_model("f1")
    with pytest.raises(IndexError_, match="re-encode"):
        loaded.check_model("f2", "other")


def test_ivf_with_fewer_than_k_in_probed_lists_falls_back_to_exact():
    emb = _clustered(400, centers=8)
    index = _index("faiss-ivf", emb, nlist=8, nprobe=1)
    queries = _clustered(20, centers=8, seed=2)
    _, rows = index.search(queries, 399)  # one list never holds 399 documents
    assert (rows >= 0).all() and rows.shape == (20, 399)
    assert all(len(set(r.tolist())) == 399 for r in rows)


def test_exact_kind_unchanged_and_unknown_kind_refused():
    emb = _clustered(30)
    index = _index("exact", emb)
    assert index.ann is None and recall_at_k(index, emb[:5], 10) == 1.0
    with pytest.raises(IndexError_, match="kind"):
        _index("annoy", emb)
