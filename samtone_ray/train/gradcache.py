"""Exact gradient cache: the batch's loss and gradients with the activations of one micro-batch.

Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (2021). The
contrastive loss couples every embedding of the global batch, so a plain step keeps every chunk's
activations until backward: memory grows with the batch. The loss itself only needs the
embeddings, so the step is split in three:

1. encode the worker's shard WITHOUT a graph, chunk by chunk, saving the random state (dropout)
   before each micro-batch;
2. compute the loss from the embeddings (``loss_fn``: all-gather + SamToNe, the same function the
   plain step calls) and back-propagate it to the embeddings only: ``g = dL/d(embedding)``;
3. re-encode each micro-batch WITH a graph under its saved random state (the same dropout masks,
   so the same embeddings) and back-propagate ``g`` through it: ``backward(emb, g)`` adds exactly
   this micro-batch's share of ``dL/dθ`` to the parameter gradients, then its graph is freed.

Peak memory is then one micro-batch's activations plus the batch's embeddings and logits.

Scaling over workers matches ``training.train_step`` under DDP exactly: ``loss_fn`` gathers with
``training.gather_with_grad``, whose backward sums every rank's loss gradient into the local
embeddings, and the parameter gradients are then averaged over ranks, as DDP averages them.
DDP's own reducer cannot do that average here (it only syncs a backward that followed
``DDP.forward``, and the micro-batches run the towers chunk by chunk, outside ``forward``, so as
to draw dropout in the plain step's order), so the step runs its backwards under ``no_sync`` and
averages all gradients in ONE coalesced all-reduce per step.

Dropout replay requires the first pass to consume the random stream exactly as the plain step
does: queries' chunks, then documents', then negatives', one ``embed`` call per chunk. After the
step the generators are where the plain step leaves them (the replay runs inside ``fork_rng``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from samtone_ray.data.batching import Shard
from samtone_ray.core.runtime import autocast
from samtone_ray.model.tokenization import TokenChunks, as_token_chunks

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class _MicroBatch:
    side: str  # "query" or "doc"
    chunks: list[dict[str, torch.Tensor]]
    rows: slice  # its rows in cat(chunks of the side), the length-sorted order
    cpu_rng: torch.Tensor | None = None
    cuda_rng: torch.Tensor | None = None


def grad_cache_step(
    model: torch.nn.Module, shard: Shard, loss_fn: LossFn, *, micro_batch_size: int, precision: str = "fp32"
) -> torch.Tensor:
    """Accumulate ``dL/dθ`` into the parameters' ``.grad`` and return ``L`` (detached).

    ``model``: a DualEncoder, or one wrapped in DistributedDataParallel (its gradients are then
    averaged over the ranks, as DDP would). ``loss_fn(q [b, D], d [b, D], n [b*K, D] | None)``:
    this worker's loss from its local embeddings (``training.shard_loss``). ``micro_batch_size``:
    texts per re-encoded micro-batch, whole chunks of ``shard`` (a larger chunk is its own).
    """
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    encoder = model.module if ddp else model
    device = next(encoder.parameters()).device
    sides = [("query", shard.queries), ("doc", shard.documents)]
    if shard.negatives is not None:
        sides.append(("doc", shard.negatives))
    plans = [list(_micro_batches(side, chunks, micro_batch_size)) for side, chunks in sides]

    # 1. No graph: embeddings in text order, random state saved per micro-batch.
    embeddings = []
    with torch.no_grad(), autocast(device, precision):
        for (_, chunks), plan in zip(sides, plans):
            parts = []
            for mb in plan:
                mb.cpu_rng = torch.get_rng_state()
                mb.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
                parts.extend(_embed(encoder, mb.side, chunk) for chunk in mb.chunks)
            embeddings.append(torch.cat(parts)[chunks.order.to(device)])

    # 2. The loss and its gradient w.r.t. every local embedding (summed over ranks by the gather).
    leaves = [e.detach().requires_grad_() for e in embeddings]
    loss = loss_fn(leaves[0], leaves[1], leaves[2] if len(leaves) > 2 else None)
    loss.backward()

    # 3. Re-encode with a graph under the same random state; push the cached gradients through.
    with _no_sync(model, ddp):
        for leaf, (_, chunks), plan in zip(leaves, sides, plans):
            if leaf.grad is None:  # the loss does not use these embeddings: nothing to add
                continue
            sorted_grad = _text_to_sorted(leaf.grad, chunks.order.to(device))
            for mb in plan:
                with torch.random.fork_rng(devices=[device] if mb.cuda_rng is not None else []):
                    torch.set_rng_state(mb.cpu_rng)
                    if mb.cuda_rng is not None:
                        torch.cuda.set_rng_state(mb.cuda_rng, device)
                    with autocast(device, precision):
                        emb = torch.cat([_embed(encoder, mb.side, chunk) for chunk in mb.chunks])
                    emb.backward(sorted_grad[mb.rows])
    if ddp and dist.get_world_size(model.process_group) > 1:
        _average_gradients(encoder, model.process_group)
    return loss.detach()


def _micro_batches(side: str, chunks: TokenChunks, size: int) -> Iterator[_MicroBatch]:
    """Consecutive chunks grouped up to ``size`` rows (at least one chunk per micro-batch)."""
    group: list[dict[str, torch.Tensor]] = []
    start = rows = 0
    for chunk in chunks.chunks:
        n = int(chunk["input_ids"].shape[0])
        if group and rows + n > size:
            yield _MicroBatch(side, group, slice(start, start + rows))
            group, start, rows = [], start + rows, 0
        group.append(chunk)
        rows += n
    if group:
        yield _MicroBatch(side, group, slice(start, start + rows))


def _embed(encoder, side: str, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
    """One chunk through one tower: the call the plain step makes per chunk (towers._embed_chunks)."""
    tokens = as_token_chunks(chunk)
    return encoder.embed_queries(tokens) if side == "query" else encoder.embed_documents(tokens)


def _text_to_sorted(grad: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows in text order -> rows in cat(chunks) order (``cat(chunks)[order]`` is text order)."""
    out = torch.empty_like(grad)
    out[order] = grad
    return out


def _no_sync(model, ddp: bool):
    return model.no_sync() if ddp else contextlib.nullcontext()


def _average_gradients(module: torch.nn.Module, group) -> None:
    """DDP's averaging, once: every gradient in one flat buffer, summed over ranks, / world size."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
