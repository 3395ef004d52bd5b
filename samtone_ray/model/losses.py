"""SamToNe contrastive loss: in-batch softmax with same-tower negatives.

Reference: Moiseev, F., Hernandez Abrego, G., Dornbach, P., Zitouni, I., Alfonseca, E., Dong, Z.
"SamToNe: Improving Contrastive Loss for Dual Encoder Retrieval Models with Same Tower
Negatives", Findings of ACL 2023, arXiv:2306.02516.

With L2-normalised embeddings, similarity ``s(a, b) = a . b`` (cosine), temperature ``tau`` and
same-tower weight ``alpha`` (``same_tower_weight``), the query-to-document loss for anchor ``q_i`` is

    L_qd(i) = -log  exp(s(q_i, d_i)/tau) / Z_qd(i)
    Z_qd(i) = sum_j exp(s(q_i, d_j)/tau)                      # in-batch documents
            + sum_{r,k} exp(s(q_i, h_rk)/tau)                 # every row's hard negatives
            + [same_tower in {query, both}] alpha * sum_{j != i} exp(s(q_i, q_j)/tau)

and the document-to-query loss (``bidirectional=True``) for anchor ``d_i`` is

    L_dq(i) = -log  exp(s(d_i, q_i)/tau) / Z_dq(i)
    Z_dq(i) = sum_j exp(s(d_i, q_j)/tau)
            + [same_tower in {doc, both}] alpha * sum_{j != i} exp(s(d_i, d_j)/tau)

The loss is mean_i L_qd(i), or (mean_i L_qd(i) + mean_i L_dq(i)) / 2 when bidirectional.
``tau`` sharpens the softmax: cosines live in [-1, 1], so logits live in [-1/tau, 1/tau];
a small tau (0.01-0.1) lets the model express confident rankings. ``alpha`` = 1 is SamToNe,
``alpha`` = 0 is exactly the plain in-batch loss, values between weigh same-tower negatives
down (log(alpha) is added to every same-tower logit).

False-negative masking (``query_keys`` / ``doc_keys``: e.g. hashes of the texts) works by pair:
candidate pair ``j`` (its document in q->d and d->d, its query in d->q and q->q) is removed from
anchor ``i``'s softmax when pair ``j`` shares the query text OR the document text with pair ``i``
(``j != i``; in the same-tower blocks the anchor itself is always removed). So a second known
positive of the same query (``q_j == q_i``, ``d_j != d_i``) and a second query of the same
document never act as negatives. A hard negative is removed for anchor ``i`` when its text equals
any positive of ``q_i`` in the batch, i.e. ``d_j`` for every ``j`` with ``q_j == q_i`` (only
``d_i`` when query keys are not given).

The false-negative margin ``m`` (``false_negative_margin``; GTE / NV-Retriever's positive-aware
filter applied inside the batch) removes, for each anchor, every negative candidate (cross-tower,
hard or same-tower) with ``s(anchor, c) > s(anchor, positive) + m``. It is decided on detached
similarities and never removes the positive.

Guided filtering (``guide_embeddings``: a frozen guide model's embeddings of the same texts, as GISTEmbed,
Solatorio 2024, uses them) removes, for each anchor, every negative candidate the guide scores
above the anchor's positive: ``g(anchor, c) > g(anchor, positive) - m_g`` (``guide_margin_type``
absolute) or ``> g(anchor, positive) * (1 - m_g)`` (relative), ``g`` the guide's cosine and
``m_g`` the ``guide_margin``. It composes with the masks and the margin above (a candidate any of
them removes is gone), in both directions and every same-tower block; it never removes the positive.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from samtone_ray.core.config import LossConfig


def _check_keys(name: str, keys: torch.Tensor | None, shape: tuple[int, ...],
                device: torch.device) -> torch.Tensor | None:
    if keys is None:
        return None
    if tuple(keys.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(keys.shape)}")
    if keys.is_floating_point() or keys.is_complex() or keys.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (e.g. int64 text hashes), got {keys.dtype}")
    return keys.to(device)


class _PairMasks:
    """Which candidates each anchor must drop as false negatives, from the global batch's keys."""

    def __init__(self, query_keys: torch.Tensor | None, doc_keys: torch.Tensor | None,
                 hard_negative_keys: torch.Tensor | None, batch: int, device: torch.device) -> None:
        self.query_keys, self.doc_keys = query_keys, doc_keys
        self.batch, self.device = batch, device
        self.hard_ids = None
        if hard_negative_keys is not None:
            # Hard negative h is a false negative for anchor i when (q_i, h) is a pair of the batch.
            # Dense ids turn "is (query, text) a batch pair" into one integer membership test.
            query_ids = (torch.arange(batch, device=device) if query_keys is None  # each row its own query
                         else torch.unique(query_keys, return_inverse=True)[1])  # [B]
            texts = torch.cat([doc_keys, hard_negative_keys.reshape(-1)])  # [B + B*K]
            text_ids = torch.unique(texts, return_inverse=True)[1]
            self.num_texts = int(texts.numel())  # > every text id, so the codes below are unique
            self.query_ids = query_ids
            self.hard_ids = text_ids[batch:]  # [B*K]
            self.batch_pairs = torch.unique(query_ids * self.num_texts + text_ids[:batch])  # [<= B]

    def related(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, B] bool: pair j shares the query or the document text with anchor pair rows[n]."""
        out = torch.zeros(rows.numel(), self.batch, dtype=torch.bool, device=self.device)
        for keys in (self.query_keys, self.doc_keys):
            if keys is not None:
                out |= keys[rows][:, None] == keys[None, :]  # [n, 1] == [1, B] -> [n, B]
        return out

    def hard(self, rows: torch.Tensor, num_hard_total: int) -> torch.Tensor:
        """[n, B*K] bool: the hard negative's text is a positive of the anchor's query."""
        if self.hard_ids is None:
            return torch.zeros(rows.numel(), num_hard_total, dtype=torch.bool, device=self.device)
        codes = self.query_ids[rows][:, None] * self.num_texts + self.hard_ids[None, :]  # [n, B*K]
        return torch.isin(codes, self.batch_pairs)


def _guided(guide: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor, margin: float,
            relative: bool) -> torch.Tensor:
    """[n, M] bool: candidates the guide scores above the anchor's positive, less the margin."""
    anchors, cands = guide
    sims = anchors @ cands.T
    positive = sims.gather(1, targets[:, None])  # [n, 1]
    return sims > (positive * (1 - margin) if relative else positive - margin)


def _nll_sum(anchors: torch.Tensor, cands: torch.Tensor, removed: torch.Tensor, targets: torch.Tensor,
             temperature: float, bias: torch.Tensor | None, margin: float | None,
             guided: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy of anchors [n, D] over candidates [M, D].

    ``removed`` [n, M] marks false negatives, ``guided`` [n, M] those the guide filter removes;
    ``targets`` [n] are the positives' columns, which are never removed; ``bias`` [M] is added to
    the logits (log(alpha) on same-tower columns).
    """
    sims = anchors @ cands.T  # [n, M] cosine similarities
    if guided is not None:
        removed = removed | guided
    if margin is not None:
        # Decided on detached similarities: the filter picks the negatives, it is not trained.
        detached = sims.detach()
        positive = detached.gather(1, targets[:, None])  # [n, 1]
        removed = removed | (detached > positive + margin)
    if guided is not None or margin is not None:
        removed = removed.scatter(1, targets[:, None], False)
    logits = sims / temperature
    if bias is not None:
        logits = logits + bias
    # -inf gives exactly zero probability mass and zero gradient; the target is never removed,
    # so every row keeps a finite logsumexp.
    logits = logits.masked_fill(removed, float("-inf"))
    return F.cross_entropy(logits, targets, reduction="sum")


def contrastive_loss(
    q: torch.Tensor,
    d: torch.Tensor,
    *,
    hard_negatives: torch.Tensor | None = None,
    query_keys: torch.Tensor | None = None,
    doc_keys: torch.Tensor | None = None,
    hard_negative_keys: torch.Tensor | None = None,
    anchor_offset: int = 0,
    num_anchors: int | None = None,
    guide_embeddings: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    **settings,
) -> torch.Tensor:
    """The functional form: ``SamToNeLoss(**settings)(q, d, ...)``; ``settings`` are the fields of
    :class:`~samtone_ray.core.config.LossConfig` (``same_tower``, ``temperature``, ...), with its
    defaults. Code that computes the loss more than once builds a :class:`SamToNeLoss` once."""
    return SamToNeLoss(**settings)(q, d, hard_negatives, query_keys, doc_keys, hard_negative_keys,
                                   anchor_offset, num_anchors, guide_embeddings)


def _samtone_loss(
    q: torch.Tensor,
    d: torch.Tensor,
    settings: LossConfig,
    hard_negatives: torch.Tensor | None,
    query_keys: torch.Tensor | None,
    doc_keys: torch.Tensor | None,
    hard_negative_keys: torch.Tensor | None,
    anchor_offset: int,
    num_anchors: int | None,
    guide: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """SamToNe loss (see module docstring) as a scalar, float32 for half/bf16/fp32 inputs.

    ``settings`` were validated when the LossConfig was built; only the tensors are checked here.

    Args:
        q, d: [B, D] L2-normalised query / positive-document embeddings; row i is a pair.
        hard_negatives: [B, K, D]; all B*K are candidates for every query anchor (q->d only).
        query_keys, doc_keys: [B] integer ids of the texts (equal ids = equal texts); candidates
            of pairs sharing the anchor pair's query or document are removed from the softmax
            (module docstring). Either may be given alone; the rule then uses that one.
        hard_negative_keys: [B, K] integer ids of the hard negatives; one equal to the doc key of
            any positive of the anchor's query is removed (requires doc_keys and hard_negatives).
        anchor_offset, num_anchors: use only anchor rows [anchor_offset, anchor_offset+num_anchors)
            (default: all B) against all B candidates. With q, d, hard negatives and keys
            all-gathered, each worker passes its own row range; the mean of equal-size shard
            losses equals the full-batch loss.
        guide: the guide model's embeddings of the same texts, ``(q [B, G], d [B, G], hard
            negatives [B, K, G] or None)``, L2-normalised, without gradients (guided filtering).

    ``settings.anchor_chunk_size`` bounds memory: anchors are processed this many at a time, each
    chunk's gradients computed in the same pass and its logits freed, so no logits tensor is
    larger than [chunk, candidates]. Same value and gradients as unchunked (up to float summation
    order), no recomputation, no double backward.
    """
    same_tower, bidirectional = settings.same_tower, settings.bidirectional
    temperature, same_tower_weight = settings.temperature, settings.same_tower_weight
    false_negative_margin = settings.false_negative_margin
    anchor_chunk_size = settings.anchor_chunk_size or None
    if q.ndim != 2 or q.shape != d.shape:
        raise ValueError(f"q and d must both be [B, D] with equal shapes, got q {tuple(q.shape)} "
                         f"and d {tuple(d.shape)}")
    batch, dim = q.shape
    if batch == 0:
        raise ValueError(f"empty batch: q {tuple(q.shape)}")
    num_hard = 0
    if hard_negatives is not None:
        if hard_negatives.ndim != 3 or hard_negatives.shape[0] != batch or hard_negatives.shape[2] != dim:
            raise ValueError(f"hard_negatives must be [B, K, D] = [{batch}, K, {dim}] to match q "
                             f"{tuple(q.shape)}, got {tuple(hard_negatives.shape)}")
        num_hard = hard_negatives.shape[1]
    if hard_negative_keys is not None:
        if hard_negatives is None:
            raise ValueError("hard_negative_keys given without hard_negatives")
        if doc_keys is None:
            raise ValueError("hard_negative_keys need doc_keys: a hard negative is removed when "
                             "its key equals the doc key of a positive of the anchor's query")
    if num_anchors is None:
        num_anchors = batch - anchor_offset
    if not (0 <= anchor_offset and 1 <= num_anchors and anchor_offset + num_anchors <= batch):
        raise ValueError(f"anchor rows [{anchor_offset}, {anchor_offset + num_anchors}) must be a "
                         f"non-empty range inside the batch of {batch} rows")

    if guide is not None:
        gq, gd, gh = guide
        if gq.ndim != 2 or gq.shape[0] != batch or gd.shape != gq.shape:
            raise ValueError(f"guide q and d must both be [B, G] with B = {batch}, got {tuple(gq.shape)} and {tuple(gd.shape)}")
        if (gh is None) != (num_hard == 0) or (gh is not None and tuple(gh.shape) != (batch, num_hard, gq.shape[1])):
            raise ValueError(f"guide hard negatives must be [B, K, G] = [{batch}, {num_hard}, {gq.shape[1]}] "
                             f"(None without hard negatives), got {None if gh is None else tuple(gh.shape)}")
    elif settings.guide:
        raise ValueError(f"loss.guide={settings.guide!r} is set but no guide embeddings were given")

    device = q.device
    query_keys = _check_keys("query_keys", query_keys, (batch,), device)
    doc_keys = _check_keys("doc_keys", doc_keys, (batch,), device)
    hard_negative_keys = _check_keys("hard_negative_keys", hard_negative_keys, (batch, num_hard), device)

    pair_masks = _PairMasks(query_keys, doc_keys, hard_negative_keys, batch, device)
    # alpha = 0 drops the same-tower blocks outright: exactly plain in-batch, no log(0) = -inf.
    query_side = same_tower in ("query", "both") and same_tower_weight > 0
    doc_side = bidirectional and same_tower in ("doc", "both") and same_tower_weight > 0
    log_alpha = math.log(same_tower_weight) if same_tower_weight > 0 else 0.0

    # Autocast would run the matmuls in bf16/fp16; 1/tau then amplifies the rounding error, and
    # logsumexp over large B needs float32 range anyway. float64 inputs stay float64.
    compute_dtype = torch.promote_types(torch.promote_types(q.dtype, d.dtype), torch.float32)
    with torch.autocast(device_type=device.type, enabled=False):
        embeddings = [q.to(compute_dtype), d.to(compute_dtype)]
        if num_hard:
            # [B, K, D] -> [B*K, D]: every row's hard negatives are candidates for every anchor.
            embeddings.append(hard_negatives.to(compute_dtype).reshape(batch * num_hard, dim))
        qd_bias = _same_tower_bias(batch * (1 + num_hard), batch if query_side else 0, log_alpha, embeddings[0])
        dq_bias = _same_tower_bias(batch, batch if doc_side else 0, log_alpha, embeddings[0])
        if guide is not None:
            # The guide's candidates in the order of the loss's own: q->d [docs | hard | queries], d->q [queries | docs].
            gq, gd = guide[0].to(compute_dtype), guide[1].to(compute_dtype)
            gh = [guide[2].to(compute_dtype).reshape(batch * num_hard, -1)] if num_hard else []
            guide_qd = torch.cat([gd, *gh] + ([gq] if query_side else []))
            guide_dq = torch.cat([gq] + ([gd] if doc_side else []))
            relative = settings.guide_margin_type == "relative"

        def loss_sum(rows: torch.Tensor, qf: torch.Tensor, df: torch.Tensor,
                     hf: torch.Tensor | None = None) -> torch.Tensor:
            """Summed per-anchor losses of global anchor rows ``rows`` [n], both directions."""
            # q -> d candidates: [documents (target d_i) | hard negatives | queries]; d -> q:
            # [queries (target q_i) | documents]. Hard negatives are neither d->q anchors nor candidates.
            qd_cands = torch.cat([df] + ([hf] if num_hard else []) + ([qf] if query_side else []))  # [M, D]
            # [n, B]: each anchor's own column, i.e. its positive (cross-tower) or itself (same-tower).
            own = rows[:, None] == torch.arange(batch, device=device)[None, :]
            related = pair_masks.related(rows)  # [n, B]
            cross_removed, same_removed = related & ~own, related | own
            removed = [cross_removed]
            if num_hard:
                removed.append(pair_masks.hard(rows, batch * num_hard))
            if query_side:
                removed.append(same_removed)
            guided = None if guide is None else _guided((gq[rows], guide_qd), rows, settings.guide_margin, relative)
            total = _nll_sum(qf[rows], qd_cands, torch.cat(removed, 1), rows, temperature, qd_bias,
                             false_negative_margin, guided)
            if bidirectional:
                dq_cands = torch.cat([qf] + ([df] if doc_side else []))  # [B (+ B), D]
                removed = torch.cat([cross_removed] + ([same_removed] if doc_side else []), 1)
                guided = None if guide is None else _guided((gd[rows], guide_dq), rows, settings.guide_margin, relative)
                total = total + _nll_sum(df[rows], dq_cands, removed, rows, temperature, dq_bias,
                                         false_negative_margin, guided)
            return total

        end = anchor_offset + num_anchors
        if anchor_chunk_size is None or anchor_chunk_size >= num_anchors:
            total = loss_sum(torch.arange(anchor_offset, end, device=device), *embeddings)
        else:
            chunks = [torch.arange(start, min(start + anchor_chunk_size, end), device=device)  # [chunk]
                      for start in range(anchor_offset, end, anchor_chunk_size)]
            if torch.is_grad_enabled() and any(e.requires_grad for e in embeddings):
                total = _ChunkedAnchors.apply(loss_sum, chunks, *embeddings)
            else:
                total = sum(loss_sum(rows, *embeddings) for rows in chunks)
        loss = total / (num_anchors * (2 if bidirectional else 1))
    return loss


class _ChunkedAnchors(torch.autograd.Function):
    """``sum(loss_sum(rows, *embeddings) for rows in chunks)`` holding one chunk's graph at a time.

    Each chunk runs forward AND backward right away (as in a gradient cache), adding its gradient
    with respect to the embeddings into [B, D]-sized accumulators; its [chunk, M] logits are then
    freed. Backward only scales the accumulated gradients: no recomputation, same arithmetic as
    the unchunked loss.
    """

    @staticmethod
    def forward(ctx, loss_sum, chunks: list[torch.Tensor], *embeddings: torch.Tensor) -> torch.Tensor:
        total = embeddings[0].new_zeros(())
        grads = [torch.zeros_like(e) for e in embeddings]
        for rows in chunks:
            with torch.enable_grad():
                leaves = [e.detach().requires_grad_() for e in embeddings]
                part = loss_sum(rows, *leaves)
                for grad, chunk_grad in zip(grads, torch.autograd.grad(part, leaves)):
                    grad += chunk_grad
            total += part.detach()
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return (None, None, *(grad_output * grad for grad in ctx.saved_tensors))


def _same_tower_bias(num_cross: int, num_same: int, log_alpha: float, like: torch.Tensor) -> torch.Tensor | None:
    """[num_cross + num_same] logit offsets: 0 on cross-tower columns, log(alpha) on same-tower ones."""
    if not num_same or log_alpha == 0.0:
        return None
    return torch.cat([like.new_zeros(num_cross), like.new_full((num_same,), log_alpha)])


class SamToNeLoss(nn.Module):
    """SamToNe contrastive loss as a module; see the module docstring for the formula.

    loss = mean_i -log softmax_i(q->d) [+ mean_i -log softmax_i(d->q), averaged], where the
    q->d softmax for anchor q_i runs over {d_j} + {hard negatives} + {q_j : j != i} (same_tower
    "query"/"both") and the d->q softmax for d_i over {q_j} + {d_j : j != i} ("doc"/"both");
    logits are cosine similarity / temperature, so a lower temperature means a sharper softmax;
    same-tower terms are weighted by ``same_tower_weight``; ``false_negative_margin`` drops
    negatives scoring above the positive plus the margin; ``guide_embeddings`` drop those a guide
    model scores above the positive (less ``guide_margin``).
    Reference: Moiseev et al. 2023, arXiv:2306.02516.

    The settings are a :class:`~samtone_ray.core.config.LossConfig` (the ``loss:`` section of a
    config): its defaults are the only ones, and it validates them once, when it is built. Pass
    one (``SamToNeLoss.from_config(cfg.loss)``) or its fields as keywords.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> loss_fn = SamToNeLoss(same_tower="both", bidirectional=True, temperature=0.05)
        >>> q = F.normalize(torch.randn(4, 8), dim=-1)
        >>> d = F.normalize(torch.randn(4, 8), dim=-1)
        >>> loss = loss_fn(q, d)
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
    """

    def __init__(self, config: LossConfig | None = None, **settings) -> None:
        super().__init__()
        if config is None:
            config = LossConfig(**settings)
        elif settings:
            config = dataclasses.replace(config, **settings)  # a new config: validated as it is built
        self.config = config

    @classmethod
    def from_config(cls, config: LossConfig) -> SamToNeLoss:
        return cls(config)

    def forward(
        self,
        q: torch.Tensor,
        d: torch.Tensor,
        hard_negatives: torch.Tensor | None = None,
        query_keys: torch.Tensor | None = None,
        doc_keys: torch.Tensor | None = None,
        hard_negative_keys: torch.Tensor | None = None,
        anchor_offset: int = 0,
        num_anchors: int | None = None,
        guide_embeddings: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        return _samtone_loss(q, d, self.config, hard_negatives, query_keys, doc_keys, hard_negative_keys,
                             anchor_offset, num_anchors, guide_embeddings)

    def get_config_dict(self) -> dict[str, object]:
        """The hyperparameters (for MLflow params); memory settings such as the chunk size are not."""
        return self.config.hyperparameters()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.get_config_dict().items())
