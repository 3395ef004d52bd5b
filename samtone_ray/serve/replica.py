"""What a serving replica holds, without Ray: a loaded, warmed model version and its search index.

A :class:`Served` pairs one model version with the index its documents were encoded by (or none),
so ``/search`` always encodes queries with the weights that encoded the documents. Replacing the
whole object is the atomic swap; requests keep the object they started with.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from samtone_ray.data.sources import join_text, read_corpus
from samtone_ray.encode.index import INDEX_FILE, IndexError_, SearchIndex
from samtone_ray.tracking.model_uri import ResolvedModel, resolve_model
from samtone_ray.core.runtime import autocast, prepare_inference
from samtone_ray.model.towers import DualEncoder

log = logging.getLogger(__name__)
SIDES = {"query": "query", "document": "doc"}


@dataclass(frozen=True)
class Served:
    model: DualEncoder
    resolved: ResolvedModel
    index: SearchIndex | None = None
    # A fast tokenizer is not thread-safe (padding/truncation are state of the Rust object): the
    # event loop counts tokens with this copy while the batch thread encodes with the model's own.
    counter: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.counter is None:
            object.__setattr__(self, "counter", copy.deepcopy(self.model.tokenizer))

    @property
    def name(self) -> str:
        """The ``model`` clients send: the registered name, else the last part of the URI as given."""
        return self.resolved.name or Path(self.resolved.uri.rstrip("/")).name

    @property
    def version(self) -> str | None:
        return self.resolved.version

    def max_length(self, input_type: str) -> int:
        return self.model.query_max_length if input_type == "query" else self.model.doc_max_length

    def token_counts(self, texts: list[str], input_type: str) -> list[int]:
        """Tokens each text is embedded with: truncated at the tower's max length, special tokens included."""
        ids = self.counter(
            texts, truncation=True, max_length=self.max_length(input_type), return_attention_mask=False, return_token_type_ids=False
        )["input_ids"]
        return [len(row) for row in ids]

    def embed(self, texts: list[str], input_type: str, precision: str, batch_size: int) -> torch.Tensor:
        encode = self.model.encode_queries if input_type == "query" else self.model.encode_documents
        with autocast(self.model.device, precision):
            return encode(texts, batch_size=batch_size, show_progress=False)


def load_model(uri: str, tracking_uri: str | None, device: str = "cpu", precision: str = "fp32") -> Served:
    """Resolve ``uri`` (files only, nothing unpickled), load it (int8: quantised here, once per loaded
    version) and run a warm-up batch on both towers."""
    resolved = resolve_model(uri, tracking_uri)
    model = DualEncoder.from_pretrained(resolved.path).to(device)
    prepare_inference(model, precision)
    served = Served(model, resolved)
    for input_type in SIDES:
        served.embed(["warm-up"], input_type, precision, 1)
    log.info("loaded %s from %s", resolved.label, resolved.path)
    return served


def with_index(served: Served, source: IndexSource | None, precision: str, batch_size: int) -> Served:
    if source is None:
        return served
    return Served(served.model, served.resolved, source.index_for(served, precision, batch_size), served.counter)


class IndexSource:
    """Where ``/search`` documents come from (``--index DIR``).

    * a BEIR folder (``corpus.jsonl``): the corpus is encoded with each model version served;
    * an index folder written by ``samtone index`` (``index.json``), or a folder of such folders:
      the index whose recorded model fingerprint is the served model's is used, so a new champion
      switches to the re-encoding job's output for its version; an index of other weights is refused.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if (self.path / "corpus.jsonl").is_file():
            self.kind = "beir"
        elif (self.path / INDEX_FILE).is_file() or _index_folders(self.path):
            self.kind = "index"
        else:
            raise IndexError_(f"--index {self.path}: neither a BEIR folder (corpus.jsonl) nor a samtone index folder ({INDEX_FILE})")

    @property
    def rebuilds(self) -> bool:
        """True when a new model version needs its corpus encoded (slow: done in the background)."""
        return self.kind == "beir"

    def index_for(self, served: Served, precision: str, batch_size: int) -> SearchIndex:
        fp = served.resolved.fingerprint
        if self.kind == "beir":
            ids, titles, texts = read_corpus(self.path / "corpus.jsonl")
            joined = [join_text({"title": t, "text": x}) for t, x in zip(titles, texts)]
            log.info("encoding %d documents of %s with %s", len(ids), self.path, served.resolved.label)
            with autocast(served.model.device, precision):
                emb = served.model.encode_documents(joined, batch_size=batch_size)
            return SearchIndex(ids, emb, titles, texts, model=served.resolved.as_dict())
        candidates = [self.path] if (self.path / INDEX_FILE).is_file() else _index_folders(self.path)
        for folder in candidates:
            if _index_fingerprint(folder) == fp:
                index = SearchIndex.load(folder)
                index.check_model(fp, served.resolved.label)
                return index
        found = ", ".join(f"{p} ({_index_fingerprint(p)})" for p in candidates)
        raise IndexError_(
            f"no index under {self.path} was encoded by the served model {served.resolved.label} (fingerprint {fp}); "
            f"found {found}. Re-encode the corpus with this model (samtone index)"
        )


def _index_fingerprint(folder: Path) -> str | None:
    try:
        return (json.loads((folder / INDEX_FILE).read_text()).get("model") or {}).get("fingerprint")
    except (OSError, json.JSONDecodeError):
        return None


def _index_folders(root: Path) -> list[Path]:
    """Index folders directly under ``root``, skipping hidden ones: ``atomic_write_dir`` stages a
    new index in ``.NAME.tmp-*`` beside its target, and a half-written one must never be served."""
    return sorted(p.parent for p in root.glob(f"*/{INDEX_FILE}") if not p.parent.name.startswith("."))
