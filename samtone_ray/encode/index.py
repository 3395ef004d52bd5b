"""A document index for top-k search, stamped with the model that encoded it.

On disk an index is a folder:

* ``index.json``: format version, kind, dim, count and the encoding model
  (``model_uri.ResolvedModel.as_dict()``: uri, name, version, run_id, fingerprint);
* ``docs.parquet``: ``id`` (string), ``title``, ``text`` and ``embedding``
  (``fixed_size_list<float32>[dim]``, L2-normalised), one row per document;
* ``faiss.index`` (approximate kinds only): the faiss index over the same rows, in row order.

Kinds, all behind ``SearchIndex.search(query_emb, k)`` (inner product = cosine on unit vectors):

* ``exact``: the chunked inner-product top-k that evaluation uses;
* ``faiss-ivf``: ``IndexIVFFlat`` (k-means lists, ``nlist`` default ~4 sqrt(N), ``nprobe`` probed);
* ``faiss-hnsw``: ``IndexHNSWFlat`` (graph with ``M`` links per node, ``ef_search`` breadth).

The folder is written atomically, and an index whose model fingerprint differs from the served
model's is refused, so a query encoder is never paired with documents encoded by another model
version. ``build_from_encoded`` makes an index from a ``samtone encode`` output folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from samtone_ray.encode.job import embedding_array, embedding_matrix
from samtone_ray.evaluation.retrieval import exact_search
from samtone_ray.core.files import atomic_write_dir

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
DOCS_FILE = "docs.parquet"
FAISS_FILE = "faiss.index"
KINDS = ("exact", "faiss-ivf", "faiss-hnsw")
IVF_MIN_POINTS_PER_LIST = 39  # faiss warns (and k-means degrades) below this


class IndexError_(ValueError):
    """An index folder that cannot be used: missing files, wrong format, or another model's."""


@dataclass
class SearchIndex:
    ids: list[str]
    embeddings: torch.Tensor  # [N, D] float32, L2-normalised
    titles: list[str]
    texts: list[str]
    model: dict[str, Any] = field(default_factory=dict)  # ResolvedModel.as_dict() of the encoder
    kind: str = "exact"
    params: dict[str, Any] = field(default_factory=dict)  # faiss settings (nlist, nprobe, m, ef_search)
    ann: Any = field(default=None, repr=False, compare=False)  # the faiss index of approximate kinds

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.embeddings.dim() != 2 or self.embeddings.shape[0] != n:
            raise IndexError_(f"index: {n} ids but embeddings of shape {tuple(self.embeddings.shape)}")
        if len(self.titles) != n or len(self.texts) != n:
            raise IndexError_(f"index: {n} ids but {len(self.titles)} titles and {len(self.texts)} texts")
        if n == 0:
            raise IndexError_("index: no documents")
        if self.kind not in KINDS:
            raise IndexError_(f"index kind {self.kind!r} is not one of {KINDS}")
        if self.kind != "exact" and self.ann is None:
            self.ann, self.params = build_faiss(self.embeddings, self.kind, self.params)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, query_emb: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [Q, k'], row indices [Q, k']) of the top ``k' = min(k, N)`` documents per query."""
        if self.ann is None:
            return exact_search(query_emb.to(self.embeddings.dtype), self.embeddings, k)
        k = min(k, len(self))
        queries = np.ascontiguousarray(query_emb.detach().float().cpu().numpy())
        scores, rows = self.ann.search(queries, k)
        short = (rows < 0).any(axis=1)  # IVF can find fewer than k in the probed lists
        if short.any():
            exact_scores, exact_rows = exact_search(torch.from_numpy(queries[short]), self.embeddings, k)
            scores[short], rows[short] = exact_scores.numpy(), exact_rows.numpy()
        return torch.from_numpy(scores), torch.from_numpy(rows.astype(np.int64))

    def check_model(self, fingerprint: str, label: str = "") -> None:
        """Refuse to serve this index beside a query encoder with other weights."""
        ours = self.model.get("fingerprint")
        if ours != fingerprint:
            made_by = self.model.get("uri") or "an unknown model"
            if self.model.get("version"):
                made_by += f" (version {self.model['version']})"
            raise IndexError_(
                f"index was encoded by {made_by} (fingerprint {ours}), not by the served model "
                f"{label} (fingerprint {fingerprint}); re-encode the corpus with this model"
            )

    def save(self, directory: str | Path) -> Path:
        def write(tmp: Path) -> None:
            table = pa.table(
                {
                    "id": pa.array(self.ids, pa.string()),
                    "title": pa.array(self.titles, pa.string()),
                    "text": pa.array(self.texts, pa.string()),
                    "embedding": embedding_array(self.embeddings.to(torch.float32).numpy()),
                }
            )
            pq.write_table(table, tmp / DOCS_FILE)
            if self.ann is not None:
                import faiss

                faiss.write_index(self.ann, str(tmp / FAISS_FILE))
            meta = {
                "format_version": FORMAT_VERSION, "kind": self.kind, "dim": self.dim, "count": len(self),
                "model": self.model, "params": self.params,
            }
            (tmp / INDEX_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))

        return atomic_write_dir(Path(directory), write)

    @classmethod
    def load(cls, directory: str | Path) -> SearchIndex:
        root = Path(directory)
        meta_path = root / INDEX_FILE
        if not meta_path.is_file():
            raise IndexError_(f"{root} is not a samtone index: {INDEX_FILE} is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise IndexError_(f"{meta_path}: not valid JSON ({exc})") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise IndexError_(f"{meta_path}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}")
        table = pq.read_table(root / DOCS_FILE)
        values = embedding_matrix(table.column("embedding"))
        kind, params = meta.get("kind", "exact"), meta.get("params") or {}
        ann = None
        if kind != "exact":
            ann = _load_faiss(root / FAISS_FILE, kind, params, table.num_rows)
        return cls(
            ids=table.column("id").to_pylist(),
            embeddings=torch.from_numpy(values.copy()),
            titles=table.column("title").to_pylist(),
            texts=table.column("text").to_pylist(),
            model=meta.get("model") or {},
            kind=kind,
            params=params,
            ann=ann,
        )


# ------------------------------------------------------------------------------ faiss


def build_faiss(embeddings: torch.Tensor, kind: str, params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A faiss index of ``kind`` over the rows of ``embeddings`` (inner product), and the
    settings it was built with (``params`` completed with defaults)."""
    import faiss

    x = np.ascontiguousarray(embeddings.detach().float().cpu().numpy())
    n, dim = x.shape
    params = dict(params)
    if kind == "faiss-ivf":
        nlist = params.get("nlist") or max(1, min(int(4 * n**0.5), n // IVF_MIN_POINTS_PER_LIST))
        if not 1 <= nlist <= n:
            raise IndexError_(f"faiss-ivf: nlist must be in 1..{n} (the number of documents); got {nlist}")
        params |= {"nlist": nlist, "nprobe": min(params.get("nprobe") or 32, nlist)}
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
    elif kind == "faiss-hnsw":
        params |= {"m": params.get("m") or 32, "ef_construction": params.get("ef_construction") or 80,
                   "ef_search": params.get("ef_search") or 128}
        index = faiss.IndexHNSWFlat(dim, params["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
    else:
        raise IndexError_(f"no faiss index for kind {kind!r}")
    index.add(x)
    _apply_search_params(index, kind, params)
    return index, params


def _apply_search_params(index: Any, kind: str, params: dict[str, Any]) -> None:
    # Search-time settings are not all serialised by faiss: set them from index.json each load.
    if kind == "faiss-ivf":
        index.nprobe = int(params["nprobe"])
    else:
        index.hnsw.efSearch = int(params["ef_search"])


def _load_faiss(path: Path, kind: str, params: dict[str, Any], rows: int) -> Any:
    import faiss

    if not path.is_file():
        raise IndexError_(f"{path.parent}: a {kind} index needs {FAISS_FILE}, which is missing")
    index = faiss.read_index(str(path))
    if index.ntotal != rows:
        raise IndexError_(f"{path}: {index.ntotal} vectors but {DOCS_FILE} has {rows} rows")
    _apply_search_params(index, kind, params)
    return index


# ------------------------------------------------------------------------------ from `samtone encode`


def build_from_encoded(embeddings_dir: str | Path, kind: str = "exact", params: dict[str, Any] | None = None) -> SearchIndex:
    """A SearchIndex over a complete ``samtone encode`` output: its ids and embeddings, the
    documents' title and text re-read from the input the manifest names, its model info."""
    from samtone_ray.encode.corpus import plan_shards, read_shard
    from samtone_ray.data.sources import join_text
    from samtone_ray.encode.job import part_files, read_manifest

    root = Path(embeddings_dir)
    manifest = read_manifest(root)
    if manifest is None:
        raise IndexError_(f"{root} is not a `samtone encode` output: manifest.json is missing")
    if manifest.get("status") != "complete":
        raise IndexError_(f"{root}: encoding did not finish (status {manifest.get('status')!r}); rerun `samtone encode`")
    if manifest.get("tower") != "document":
        raise IndexError_(f"{root} holds {manifest.get('tower')}-tower embeddings; an index needs the document tower")
    ids: list[str] = []
    blocks = []
    for path in part_files(root):
        table = pq.read_table(path, columns=["id", "embedding"])
        ids.extend(table.column("id").to_pylist())
        blocks.append(embedding_matrix(table.column("embedding")))
    if not ids:
        raise IndexError_(f"{root}: no embeddings")
    source = manifest["input"]
    plan = plan_shards(source["uri"], manifest["rows_per_file"])
    if plan.fingerprint != source["fingerprint"]:
        raise IndexError_(
            f"{source['uri']} changed since {root} was encoded (fingerprint {plan.fingerprint}, "
            f"was {source['fingerprint']}); re-encode it"
        )
    text_fields = tuple(source["text_fields"])
    body_fields = tuple(f for f in text_fields if f != "title")
    wanted = set(ids)
    docs: dict[str, tuple[str, str]] = {}
    for shard in plan.shards:
        good, _ = read_shard(shard, source["id_field"], text_fields)
        for _, doc_id, fields in good:
            if doc_id in wanted and doc_id not in docs:
                docs[doc_id] = (fields.get("title", ""), join_text(fields, body_fields))
    return SearchIndex(
        ids=ids,
        embeddings=torch.from_numpy(np.concatenate(blocks)),
        titles=[docs[i][0] for i in ids],
        texts=[docs[i][1] for i in ids],
        model=manifest["model"],
        kind=kind,
        params=params or {},
    )


def recall_at_k(index: SearchIndex, queries: torch.Tensor, k: int = 10) -> float:
    """Mean fraction of the exact top-k (by inner product) that ``index.search`` returns."""
    _, exact = exact_search(queries.float(), index.embeddings, k)
    _, approx = index.search(queries, k)
    hits = [len(set(a.tolist()) & set(e.tolist())) / len(e) for a, e in zip(approx, exact)]
    return float(np.mean(hits))


def recall_queries(index: SearchIndex, manifest: dict[str, Any], queries: str | None, sample: int,
                    tracking_uri: str | None) -> tuple[torch.Tensor, str]:
    """Query embeddings for the recall check, and where they came from: the query tower on
    ``queries`` (default: queries.jsonl beside a BEIR corpus), else a sample of documents."""
    from samtone_ray.data.sources import iter_jsonl
    from samtone_ray.tracking.model_uri import resolve_model
    from samtone_ray.model.towers import DualEncoder

    generator = torch.Generator().manual_seed(0)
    uri = manifest["input"]["uri"]
    if queries is None and "://" not in uri and Path(uri).name == "corpus.jsonl":
        beside = Path(uri).with_name("queries.jsonl")
        queries = str(beside) if beside.is_file() else None
    if queries is None:
        rows = torch.randperm(len(index), generator=generator)[:sample]
        return index.embeddings[rows], f"{len(rows)} sampled documents"
    texts = [rec["text"] for _, rec in iter_jsonl(queries) if isinstance(rec.get("text"), str) and rec["text"].strip()]
    picked = torch.randperm(len(texts), generator=generator)[:sample].tolist()
    resolved = resolve_model(manifest["model"]["uri"], tracking_uri)
    index.check_model(resolved.fingerprint, resolved.label)
    model = DualEncoder.from_pretrained(resolved.path)
    return model.encode_queries([texts[i] for i in picked]), f"{len(picked)} queries from {queries}"
