"""A document index for top-k search, stamped with the model that encoded it.

On disk an index is a folder:

* ``index.json``: format version, kind, dim, count and the encoding model
  (``model_uri.ResolvedModel.as_dict()``: uri, name, version, run_id, fingerprint);
* ``docs.parquet``: ``id`` (string), ``title``, ``text`` and ``embedding``
  (``fixed_size_list<float32>[dim]``, L2-normalised), one row per document.

``exact`` search is the chunked inner-product top-k that evaluation uses. The folder is written
atomically, and an index whose model fingerprint differs from the served model's is refused, so a
query encoder is never paired with documents encoded by another model version.
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

from samtone_ray.evaluation import exact_search
from samtone_ray.files import atomic_write_dir

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
DOCS_FILE = "docs.parquet"
KINDS = ("exact",)


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

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, query_emb: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [Q, k'], row indices [Q, k']) of the top ``k' = min(k, N)`` documents per query."""
        return exact_search(query_emb.to(self.embeddings.dtype), self.embeddings, k)

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
            dim = self.dim
            flat = pa.array(self.embeddings.to(torch.float32).contiguous().numpy().reshape(-1), pa.float32())
            table = pa.table(
                {
                    "id": pa.array(self.ids, pa.string()),
                    "title": pa.array(self.titles, pa.string()),
                    "text": pa.array(self.texts, pa.string()),
                    "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
                }
            )
            pq.write_table(table, tmp / DOCS_FILE)
            meta = {"format_version": FORMAT_VERSION, "kind": self.kind, "dim": dim, "count": len(self), "model": self.model}
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
        emb = table.column("embedding").combine_chunks()
        dim = emb.type.list_size
        values = np.asarray(emb.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
        return cls(
            ids=table.column("id").to_pylist(),
            embeddings=torch.from_numpy(values.copy()),
            titles=table.column("title").to_pylist(),
            texts=table.column("text").to_pylist(),
            model=meta.get("model") or {},
            kind=meta.get("kind", "exact"),
        )
