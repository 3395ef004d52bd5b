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

On disk: ``save_pretrained`` / ``from_pretrained`` read and write a sentence-transformers
directory (``model_files.py`` describes the layout). Tokenisation lives in ``tokenization.py``.

Encoders' ``pooler`` submodules (BERT-style ``AutoModel`` heads) are frozen: the embedding never
reads them, and a parameter that gets no gradient breaks DDP's default
``find_unused_parameters=False``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from samtone_ray.core.choices import Pooling, Side, TowerMode, check_positive_int, validate_layout
from samtone_ray.core.config import ModelConfig
from samtone_ray.core.files import atomic_write_dir
from samtone_ray.model.layout import load_model_dir, resolve_model_path, write_layout
from samtone_ray.model.tokenization import (
    TokenChunks,
    TokenInputs,
    as_token_chunks,
    check_texts,
    length_sorted_batches,
    pad_tokens,
    token_lengths,
)

__all__ = ["DualEncoder"]

# Inference shows a progress bar by default only past this many texts.
_PROGRESS_MIN_TEXTS = 1000


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


class DualEncoder(nn.Module):
    """Query and document towers over Hugging Face encoders; see the module docstring for the
    embedding formula, the tower layouts and the saved format."""

    def __init__(
        self,
        query_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        doc_encoder: PreTrainedModel | None = None,
        tower_mode: TowerMode = ModelConfig.tower_mode,
        pooling: Pooling = ModelConfig.pooling,
        projection_dim: int | None = ModelConfig.projection_dim,
        query_max_length: int = ModelConfig.query_max_length,
        doc_max_length: int = ModelConfig.doc_max_length,
    ) -> None:
        """Wrap built encoders (defaults: the ``model:`` section's, ``ModelConfig``). ``doc_encoder``: None for ``shared``; for the separate layouts
        None means a deep copy of ``query_encoder``, else it must share no parameter with it.
        Projections are freshly initialised (``nn.Linear`` default init, torch's global RNG)."""
        super().__init__()
        self.projection_dim = validate_layout(
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
        check_positive_int("batch_size", batch_size)
        texts = check_texts(texts)
        max_length = self.query_max_length if side == "query" else self.doc_max_length
        batches = length_sorted_batches(token_lengths(self.tokenizer, texts, max_length), batch_size)
        if show_progress is None:
            show_progress = len(texts) > _PROGRESS_MIN_TEXTS
        out = torch.empty(len(texts), self.embedding_dim, dtype=torch.float32)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                label = "queries" if side == "query" else "documents"
                for batch in tqdm(batches, desc=f"encode {label}", unit="batch", disable=not show_progress):
                    tokens = pad_tokens(self.tokenizer, [texts[i] for i in batch], max_length)
                    out[torch.tensor(batch, dtype=torch.int64)] = self._embed_batch(tokens, side).cpu()
        finally:
            self.train(was_training)
        return out

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, config: ModelConfig) -> DualEncoder:
        """A new DualEncoder on the base checkpoint ``config.name_or_path`` (``AutoModel`` +
        ``AutoTokenizer``; aliases via ``resolve_model_path``) in the layout the config gives.
        Only the encoder weights are read; projections are new."""
        path = resolve_model_path(config.name_or_path)
        return cls(
            AutoModel.from_pretrained(path),
            AutoTokenizer.from_pretrained(path),
            tower_mode=config.tower_mode,
            pooling=config.pooling,
            projection_dim=config.projection_dim,
            query_max_length=config.query_max_length,
            doc_max_length=config.doc_max_length,
        )

    @classmethod
    def from_base(cls, name_or_path: str | os.PathLike[str], **layout: Any) -> DualEncoder:
        """``from_config`` with the ``model:`` section's defaults for what ``layout`` leaves out;
        the layout is checked before any weight is read."""
        return cls.from_config(ModelConfig(name_or_path=str(name_or_path), **layout))

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
        tokenizer's limit); or a plain HF model directory (the ``model:`` section's default layout).
        Given max lengths override the stored ones."""
        root = Path(resolve_model_path(directory))
        if not root.is_dir():
            raise FileNotFoundError(f"model directory {root} does not exist")
        model, lengths = load_model_dir(cls, root)
        model.query_max_length = query_max_length if query_max_length is not None else lengths[0]
        model.doc_max_length = doc_max_length if doc_max_length is not None else lengths[1]
        validate_layout(
            model.tower_mode, model.pooling, model.projection_dim, model.query_max_length, model.doc_max_length
        )
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write the model (layout: ``model_files.py``) to ``directory`` atomically; returns its path.

        The files go to a temporary sibling directory, are fsynced, and are then renamed into
        place; an existing model is first renamed aside (``.NAME.old-*``) and deleted only after
        the new one is in place, so a crash leaves either the old or the new complete model."""
        target = Path(directory).absolute()
        atomic_write_dir(target, lambda root: write_layout(self, root))
        return target
