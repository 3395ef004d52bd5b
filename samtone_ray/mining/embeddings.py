"""Embeddings for dense mining, cached on disk by what determines them.

The key hashes the model's weights fingerprint (``tracking.model_uri.fingerprint``), its layout
(towers, pooling, projection), the tower, the max length and every text in order; so mining the
same data again with other filters loads the embeddings instead of encoding, and any change of
model, length or text encodes afresh. Files are ``<key>.npy`` (float32 [N, D]), written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from samtone_ray.core.choices import Side
from samtone_ray.core.files import atomic_write_bytes
from samtone_ray.model.towers import DualEncoder

DEFAULT_CACHE_DIR = Path(".samtone/cache/embeddings")


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 of the texts in order (each length-prefixed, so no two lists collide by concatenation)."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def cache_key(fingerprint: str, model: DualEncoder, side: Side, texts: Sequence[str]) -> str:
    max_length = model.query_max_length if side == "query" else model.doc_max_length
    identity = {"fingerprint": fingerprint, "layout": model.config_dict(), "side": side,
                "max_length": max_length, "texts": texts_digest(texts)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class EmbeddingCache:
    root: Path = DEFAULT_CACHE_DIR

    def path(self, key: str) -> Path:
        return Path(self.root) / f"{key}.npy"

    def load(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        return torch.from_numpy(np.load(path)) if path.is_file() else None

    def save(self, key: str, emb: torch.Tensor) -> None:
        buffer = io.BytesIO()
        np.save(buffer, emb.numpy().astype(np.float32, copy=False))
        atomic_write_bytes(self.path(key), buffer.getvalue())


def encode_cached(
    model: DualEncoder,
    fingerprint: str,
    texts: Sequence[str],
    side: Side,
    cache: EmbeddingCache | None,
    *,
    batch_size: int = 128,
    show_progress: bool = False,
) -> tuple[torch.Tensor, bool]:
    """``(embeddings [N, D] float32 on CPU, whether they came from the cache)``."""
    key = cache_key(fingerprint, model, side, texts) if cache else ""
    if cache and (emb := cache.load(key)) is not None:
        return emb, True
    encode = model.encode_queries if side == "query" else model.encode_documents
    emb = encode(list(texts), batch_size=batch_size, show_progress=show_progress)
    if cache:
        cache.save(key, emb)
    return emb, False
