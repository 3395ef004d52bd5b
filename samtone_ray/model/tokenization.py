"""Tokenisation into length-sorted, individually padded chunks.

Training (``batching.make_shard``), inference (``DualEncoder.encode_*``), evaluation, serving and
re-encoding all cut texts the same way: lengths from one unpadded pass, indices sorted longest
first, each chunk padded only to its own longest row, and an ``order`` that undoes the sorting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from samtone_ray.core.choices import check_positive_int

__all__ = [
    "TokenChunks",
    "TokenInputs",
    "as_token_chunks",
    "check_texts",
    "length_sorted_batches",
    "pad_tokens",
    "token_lengths",
    "tokenize_chunks",
]

# Texts tokenised per pass when measuring lengths: bounds the token-id lists held at once.
_LENGTH_SCAN_BLOCK = 4096


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


def check_texts(texts: Sequence[str]) -> list[str]:
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] must be str; got {type(text).__name__}")
    return texts


def token_lengths(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[int]:
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


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Text indices sorted longest first (stable), cut into batches of ``batch_size``.

    Longest first so that the batch that needs the most memory runs (and fails) first."""
    ranked = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [ranked[i : i + batch_size] for i in range(0, len(ranked), batch_size)]


def pad_tokens(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> dict[str, Tensor]:
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def tokenize_chunks(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, chunk_size: int
) -> TokenChunks:
    """Tokenise ``texts`` (truncated to ``max_length`` tokens) into chunks of ``chunk_size``
    texts of similar length, each padded to its own longest, longest chunk first.

    Lengths come from one unpadded tokenisation pass; each chunk is then tokenised again with
    padding (the same call ``encode_*`` makes), so chunked and unchunked inputs are identical
    row by row. ``order`` restores the order of ``texts``."""
    check_positive_int("max_length", max_length)
    check_positive_int("chunk_size", chunk_size)
    texts = check_texts(texts)
    batches = length_sorted_batches(token_lengths(tokenizer, texts, max_length), chunk_size)
    chunks = [pad_tokens(tokenizer, [texts[i] for i in batch], max_length) for batch in batches]
    sorted_index = torch.tensor([i for batch in batches for i in batch], dtype=torch.int64)
    # cat(chunks)[p] holds texts[sorted_index[p]], so text i sits at the p with sorted_index[p] == i.
    order = torch.empty_like(sorted_index)
    order[sorted_index] = torch.arange(len(texts), dtype=torch.int64)
    return TokenChunks(chunks=chunks, order=order)
