"""What a serving replica holds, without Ray: a loaded, warmed model version and its search index.

A :class:`Served` pairs one model version with the index its documents were encoded by (or none),
so ``/search`` always encodes queries with the weights that encoded the documents. Replacing the
whole object is the atomic swap; requests keep the object they started with.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from samtone_ray.data.sources import join_text, read_corpus
from samtone_ray.encode.index import INDEX_FILE, IndexError_, SearchIndex
from samtone_ray.tracking.model_uri import ResolvedModel, resolve_model
from samtone_ray.core.runtime import autocast, prepare_inference
from samtone_ray.model.tokenization import TokenChunks, length_sorted_batches
from samtone_ray.model.towers import DualEncoder

log = logging.getLogger(__name__)
SIDES = {"query": "query", "document": "doc"}


# Characters per token a text is cut to before tokenising (x the tower's max length). Tokenising
# costs time in proportion to the characters, but only the first max_length tokens are kept: a
# 20,000-character input kept 128 tokens after 11 ms of tokenising. English runs at 4-5
# characters per WordPiece token; a cut text that still gives fewer than max_length tokens (long
# runs of spaces, rare long words) is tokenised again in full, so the result is always exact.
CHARS_PER_TOKEN = 12
_LAST_SPACE = re.compile(r"\s\S*\Z")


def cut_text(text: str, max_length: int) -> str:
    """``text`` cut after ``max_length * CHARS_PER_TOKEN`` characters, at the last whitespace
    before that point (a word cut in two would tokenise differently), else at that point."""
    limit = max_length * CHARS_PER_TOKEN
    if len(text) <= limit:
        return text
    head = text[:limit]
    space = _LAST_SPACE.search(head)
    return head[: space.start()] if space and space.start() > 0 else head


@dataclass(frozen=True)
class Served:
    model: DualEncoder
    resolved: ResolvedModel
    index: SearchIndex | None = None
    # A fast tokenizer is not thread-safe (padding/truncation are state of the Rust object): the
    # replica's one tokenising thread uses this copy while a batch thread may encode an index with
    # the model's own.
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

    def tokenize(self, texts: list[str], input_type: str) -> list[list[int]]:
        """Token ids each text is embedded with (truncated at the tower's max length, special tokens
        included), the one tokenisation a served text gets. Call from one thread at a time."""
        max_length = self.max_length(input_type)
        cut = [cut_text(t, max_length) for t in texts]
        ids = self._ids(cut, max_length)
        short = [i for i, (c, t, row) in enumerate(zip(cut, texts, ids)) if c is not t and len(row) < max_length]
        for i, row in zip(short, self._ids([texts[i] for i in short], max_length) if short else []):
            ids[i] = row
        return ids

    def _ids(self, texts: list[str], max_length: int) -> list[list[int]]:
        return self.counter(
            texts, truncation=True, max_length=max_length, return_attention_mask=False, return_token_type_ids=False
        )["input_ids"]

    def embed_ids(self, rows: list[list[int]], input_type: str, precision: str, per_forward: int) -> torch.Tensor:
        """Embeddings [N, D] of tokenised texts: length-sorted forwards of ``per_forward`` rows, each
        padded to its own longest, as ``DualEncoder.encode_*`` runs them."""
        tok = self.model.tokenizer
        batches = length_sorted_batches([len(r) for r in rows], per_forward)
        chunks = [_padded([rows[i] for i in batch], tok.pad_token_id, tok.padding_side, "token_type_ids" in tok.model_input_names) for batch in batches]
        sorted_index = torch.tensor([i for batch in batches for i in batch], dtype=torch.int64)
        order = torch.empty_like(sorted_index)
        order[sorted_index] = torch.arange(len(rows), dtype=torch.int64)
        embed = self.model.embed_queries if input_type == "query" else self.model.embed_documents
        with torch.no_grad(), autocast(self.model.device, precision):
            return embed(TokenChunks(chunks, order)).cpu()

    def embed(self, texts: list[str], input_type: str, precision: str, batch_size: int) -> torch.Tensor:
        """Tokenise and embed, in the calling thread (warm-up, benchmarks)."""
        return self.embed_ids(self.tokenize(texts, input_type), input_type, precision, batch_size)


def _padded(rows: list[list[int]], pad_id: int, side: str, token_types: bool) -> dict[str, torch.Tensor]:
    """The tensors the tokenizer's padding would give for these ids."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.int64)
        mask[i, span] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


def load_model(uri: str, tracking_uri: str | None, device: str = "cpu", precision: str = "fp32") -> Served:
    """Resolve ``uri`` (files only, nothing unpickled), load it (int8: quantised here, once per loaded
    version) and run a warm-up batch on both towers."""
    resolved = resolve_model(uri, tracking_uri)
    model = DualEncoder.from_pretrained(resolved.path).to(device).eval()
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
