"""Tests for samtone_ray.model.losses against a naive per-anchor float64 reference written here."""

from __future__ import annotations

import doctest
import itertools
import math
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from samtone_ray.model import losses
from samtone_ray.model.losses import SamToNeLoss, contrastive_loss

B, D, K = 6, 5, 2
TEMPERATURE = 0.05
# Deliberate duplicates: queries 0~2 (query 10 has two positives, 20 and 22) and 1~5; documents
# 0~3 (document 20 has two queries, 10 and 12) and 1~5. Hard-negative keys repeat the row's own
# positive (row 0 -> 20, row 5 -> 21), another positive of a query (22) and other rows' positives.
QUERY_KEYS = [10, 11, 10, 12, 13, 11]
DOC_KEYS = [20, 21, 22, 20, 23, 21]
HARD_NEGATIVE_KEYS = [[20, 30], [31, 22], [21, 32], [33, 34], [23, 35], [21, 36]]

SAME_TOWER = ["none", "query", "doc", "both"]
KEY_SETS = ["none", "query", "doc", "both"]


def naive_loss(q, d, *, same_tower, bidirectional, temperature, hard_negatives=None,
               query_keys=None, doc_keys=None, hard_negative_keys=None, rows=None,
               same_tower_weight=1.0, false_negative_margin=None, guide=None, guide_margin=0.0,
               guide_margin_type="absolute"):
    """SamToNe loss by explicit enumeration of each anchor's candidate list (autograd-able).

    Each negative is (vector, weight, index): same-tower terms of a denominator are multiplied by
    ``same_tower_weight``, cross-tower and hard ones by 1; ``index`` finds the text's guide vector.
    """
    batch = q.shape[0]
    num_hard = 0 if hard_negatives is None else hard_negatives.shape[1]
    rows = range(batch) if rows is None else rows
    alpha = same_tower_weight

    def guide_vector(index):  # ("q", j), ("d", j) or ("h", r, k)
        gq, gd, gh = guide
        return {"q": lambda j: gq[j], "d": lambda j: gd[j], "h": lambda r, k: gh[r, k]}[index[0]](*index[1:])

    def nll(anchor, positive, negatives, anchor_index, positive_index):
        positive_sim = torch.dot(anchor, positive).item()
        if false_negative_margin is not None:
            negatives = [(c, w, x) for c, w, x in negatives
                         if not torch.dot(anchor, c).item() > positive_sim + false_negative_margin]
        if guide is not None:
            g_anchor = guide_vector(anchor_index)
            p = torch.dot(g_anchor, guide_vector(positive_index)).item()
            bound = p * (1 - guide_margin) if guide_margin_type == "relative" else p - guide_margin
            negatives = [(c, w, x) for c, w, x in negatives if not torch.dot(g_anchor, guide_vector(x)).item() > bound]
        logits = [torch.dot(anchor, positive) / temperature] + [torch.dot(anchor, c) / temperature for c, _, _ in negatives]
        weights = [1.0] + [w for _, w, _ in negatives]
        shift = max(x.detach().item() for x in logits)  # constant, only for numerical range
        log_z = shift + torch.log(sum(w * torch.exp(x - shift) for x, w in zip(logits, weights)))
        return log_z - logits[0]

    def related(a, b):
        # Pairs a and b share the query text or the document text.
        return ((query_keys is not None and query_keys[a] == query_keys[b])
                or (doc_keys is not None and doc_keys[a] == doc_keys[b]))

    def positives_of_query(i):
        # Doc keys of every pair of the batch whose query is q_i (just d_i without query keys).
        return {doc_keys[j] for j in range(batch)
                if j == i or (query_keys is not None and query_keys[j] == query_keys[i])}

    q_to_d = []
    for i in rows:
        negatives = [(d[j], 1.0, ("d", j)) for j in range(batch) if j != i and not related(i, j)]
        for r in range(batch):
            for k in range(num_hard):
                if hard_negative_keys is not None and hard_negative_keys[r][k] in positives_of_query(i):
                    continue
                negatives.append((hard_negatives[r, k], 1.0, ("h", r, k)))
        if same_tower in ("query", "both"):
            negatives += [(q[j], alpha, ("q", j)) for j in range(batch) if j != i and not related(i, j)]
        q_to_d.append(nll(q[i], d[i], negatives, ("q", i), ("d", i)))
    loss = sum(q_to_d) / len(q_to_d)
    if not bidirectional:
        return loss

    d_to_q = []
    for i in rows:
        negatives = [(q[j], 1.0, ("q", j)) for j in range(batch) if j != i and not related(i, j)]
        if same_tower in ("doc", "both"):
            negatives += [(d[j], alpha, ("d", j)) for j in range(batch) if j != i and not related(i, j)]
        d_to_q.append(nll(d[i], q[i], negatives, ("d", i), ("q", i)))
    return (loss + sum(d_to_q) / len(d_to_q)) / 2


def make_batch(batch=B, dim=D, num_hard=K, seed=0, dtype=torch.float32):
    """Unit vectors where equal fixture keys (cycled to `batch` rows) get near-identical vectors.

    Duplicated texts embed almost identically in practice; that also makes a wrongly kept or
    wrongly removed duplicate change the loss far beyond the test tolerances.
    """
    gen = torch.Generator().manual_seed(seed)

    def noise(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, d, hn = noise(batch, dim), noise(batch, dim), noise(batch, num_hard, dim)
    d = q + 0.7 * d  # positives correlate with their queries
    query_keys, doc_keys = cycled(QUERY_KEYS, batch), cycled(DOC_KEYS, batch)
    for i in range(batch):
        first_q, first_d = query_keys.index(query_keys[i]), doc_keys.index(doc_keys[i])
        if first_q < i:
            q[i] = q[first_q] + 0.05 * noise(dim)
        if first_d < i:
            d[i] = d[first_d] + 0.05 * noise(dim)
    for r, row_keys in enumerate(cycled(HARD_NEGATIVE_KEYS, batch)[:batch]):
        for k, key in enumerate(row_keys[:num_hard]):
            if key in doc_keys:
                hn[r, k] = d[doc_keys.index(key)] + 0.05 * noise(dim)
    q, d, hn = (F.normalize(t, dim=-1).to(dtype) for t in (q, d, hn))
    return q, d, hn


def cycled(values: list, n: int) -> list:
    return [values[i % len(values)] for i in range(n)]


def key_kwargs(key_set: str, with_hard: bool) -> dict:
    kw = {}
    if key_set in ("query", "both"):
        kw["query_keys"] = QUERY_KEYS
    if key_set in ("doc", "both"):
        kw["doc_keys"] = DOC_KEYS
        if with_hard:
            kw["hard_negative_keys"] = HARD_NEGATIVE_KEYS
    return kw


def as_tensors(kw: dict) -> dict:
    return {name: torch.tensor(v, dtype=torch.int64) for name, v in kw.items()}


def leaf(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def assert_matches_naive(config: dict, key_set: str, with_hard: bool, q, d, hn, *,
                         atol=1e-5, grad_atol=1e-4, device="cpu", anchor_chunk_size=0, guide=None):
    keys = key_kwargs(key_set, with_hard)
    q32, d32, hn32 = leaf(q.to(device), d.to(device), hn.to(device))
    device_keys = {name: t.to(device) for name, t in as_tensors(keys).items()}
    guide32 = None if guide is None else (guide[0].to(device), guide[1].to(device), guide[2].to(device) if with_hard else None)
    got = contrastive_loss(q32, d32, hard_negatives=hn32 if with_hard else None, **device_keys, **config,
                           anchor_chunk_size=anchor_chunk_size, guide_embeddings=guide32)
    got.backward()

    q64, d64, hn64 = leaf(q.double(), d.double(), hn.double())
    guide64 = None if guide is None else tuple(t.double() for t in guide)
    want = naive_loss(q64, d64, hard_negatives=hn64 if with_hard else None, **keys, **config, guide=guide64)
    want.backward()

    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), abs=atol)
    torch.testing.assert_close(q32.grad.cpu().double(), q64.grad, atol=grad_atol, rtol=1e-4)
    torch.testing.assert_close(d32.grad.cpu().double(), d64.grad, atol=grad_atol, rtol=1e-4)
    if with_hard:
        torch.testing.assert_close(hn32.grad.cpu().double(), hn64.grad, atol=grad_atol, rtol=1e-4)
    else:
        assert hn32.grad is None


# All combinations but doc + unidirectional, which must raise (test_doc_same_tower_requires_bidirectional).
VALID_COMBINATIONS = [
    pytest.param(st, bi, hard, ks, id=f"{st}-{'bi' if bi else 'uni'}-{'hn2' if hard else 'nohn'}-keys_{ks}")
    for st, bi, hard, ks in itertools.product(SAME_TOWER, [False, True], [False, True], KEY_SETS)
    if not (st == "doc" and not bi)
]


@pytest.mark.parametrize("same_tower, bidirectional, with_hard, key_set", VALID_COMBINATIONS)
def test_matches_naive_reference(same_tower, bidirectional, with_hard, key_set):
    q, d, hn = make_batch()
    config = dict(same_tower=same_tower, bidirectional=bidirectional, temperature=TEMPERATURE)
    assert_matches_naive(config, key_set, with_hard, q, d, hn)


# A batch as real data builds it: query "qa" has two positives (rows 0, 1), document "da" two
# queries (rows 0, 2), rows 3 and 4 are the same pair twice. One hard negative per row.
PAIR_TEXTS = [("qa", "da"), ("qa", "db"), ("qb", "da"), ("qc", "dc"), ("qc", "dc")]
HARD_TEXTS = ["db", "dc", "dd", "da", "de"]
# Written out by hand from the rule: for each anchor row, the other rows whose candidates stay
# (pairs sharing neither the query nor the document text) and the hard negatives that stay (those
# whose text is not a positive of the anchor's query: qa -> {da, db}, qb -> {da}, qc -> {dc}).
KEPT_ROWS = {0: [3, 4], 1: [2, 3, 4], 2: [1, 3, 4], 3: [0, 1, 2], 4: [0, 1, 2]}
KEPT_HARD = {0: [1, 2, 4], 1: [1, 2, 4], 2: [0, 1, 2, 4], 3: [0, 2, 3, 4], 4: [0, 2, 3, 4]}


@pytest.mark.parametrize("same_tower", SAME_TOWER)
def test_multi_positive_queries_and_multi_query_documents(same_tower):
    from samtone_ray.data.sources import text_keys

    gen = torch.Generator().manual_seed(7)
    texts = sorted({t for pair in PAIR_TEXTS for t in pair} | set(HARD_TEXTS))
    # Equal texts embed identically, as the same encoder would embed them.
    emb = dict(zip(texts, F.normalize(torch.randn(len(texts), D, generator=gen, dtype=torch.float64), dim=-1)))
    q = torch.stack([emb[qt] for qt, _ in PAIR_TEXTS])
    d = torch.stack([emb[dt] for _, dt in PAIR_TEXTS])
    hn = torch.stack([emb[t] for t in HARD_TEXTS])[:, None, :]  # [B, 1, D]
    got = contrastive_loss(
        q, d, same_tower=same_tower, bidirectional=True, temperature=0.1, hard_negatives=hn,
        query_keys=text_keys([qt for qt, _ in PAIR_TEXTS]), doc_keys=text_keys([dt for _, dt in PAIR_TEXTS]),
        hard_negative_keys=text_keys(HARD_TEXTS).view(-1, 1),
    )

    def nll(anchor, positive, negatives):
        logits = torch.stack([anchor @ c for c in [positive, *negatives]]) / 0.1
        return torch.logsumexp(logits, 0) - logits[0]

    q_to_d, d_to_q = [], []
    for i, kept in KEPT_ROWS.items():
        negatives = [d[j] for j in kept] + [hn[r, 0] for r in KEPT_HARD[i]]
        if same_tower in ("query", "both"):
            negatives += [q[j] for j in kept]
        q_to_d.append(nll(q[i], d[i], negatives))
        negatives = [q[j] for j in kept]
        if same_tower in ("doc", "both"):
            negatives += [d[j] for j in kept]
        d_to_q.append(nll(d[i], q[i], negatives))
    want = (sum(q_to_d) / len(q_to_d) + sum(d_to_q) / len(d_to_q)) / 2
    assert got.item() == pytest.approx(want.item(), abs=1e-10)


# (same_tower_weight, false_negative_margin): weighted, filtered, both, a strict filter, alpha > 1.
# The margins sit >= 0.01 away from every similarity gap of make_batch() (test_margins_are_not_ties).
KNOBS = [(0.3, None), (1.0, 0.03), (0.3, 0.19), (0.0, -0.15), (2.0, -0.15)]


def similarity_gaps(q, d, hn):
    """s(anchor, candidate) - s(anchor, positive) for every anchor and candidate, both directions."""
    q, d, hn = q.double(), d.double(), hn.double()
    positive = (q * d).sum(-1, keepdim=True)
    q_to_d = q @ torch.cat([d, hn.reshape(-1, q.shape[1]), q]).T - positive
    d_to_q = d @ torch.cat([q, d]).T - positive
    return torch.cat([q_to_d.flatten(), d_to_q.flatten()])


def test_margins_are_not_ties():
    # A similarity within float32 rounding of the threshold could be kept by one implementation
    # and dropped by the other; the fixture's margins stay clear of every gap.
    gaps = similarity_gaps(*make_batch())
    for _, margin in KNOBS:
        if margin is not None:
            assert (gaps - margin).abs().min() > 0.01


KNOB_COMBINATIONS = [
    pytest.param(st, bi, hard, ks, alpha, m,
                 id=f"{st}-{'bi' if bi else 'uni'}-{'hn2' if hard else 'nohn'}-keys_{ks}-a{alpha}-m{m}")
    for st, bi, hard, ks in itertools.product(SAME_TOWER, [False, True], [False, True], ["none", "both"])
    for alpha, m in KNOBS
    if not (st == "doc" and not bi)
]


@pytest.mark.parametrize("same_tower, bidirectional, with_hard, key_set, alpha, margin", KNOB_COMBINATIONS)
def test_knobs_match_naive_reference(same_tower, bidirectional, with_hard, key_set, alpha, margin):
    q, d, hn = make_batch()
    config = dict(same_tower=same_tower, bidirectional=bidirectional, temperature=TEMPERATURE,
                  same_tower_weight=alpha, false_negative_margin=margin)
    assert_matches_naive(config, key_set, with_hard, q, d, hn)


def make_guide(seed=19, noise=0.4):
    """A guide model's view of make_batch()'s texts: the same structure (duplicates stay near
    each other) blurred by noise, so it disagrees with the model being trained on some candidates."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(F.normalize(t.double() + noise * torch.randn(t.shape, generator=gen, dtype=torch.float64), dim=-1).float()
                 for t in make_batch())


def guide_excess(guide, kind, margin):
    """g(anchor, c) minus the guide's threshold for every anchor and negative candidate, both
    directions: a candidate leaves the softmax where this is > 0."""
    gq, gd, gh = (t.double() for t in guide)
    positive = (gq * gd).sum(-1, keepdim=True)
    threshold = positive * (1 - margin) if kind == "relative" else positive - margin
    batch = gq.shape[0]
    sims = [gq @ torch.cat([gd, gh.reshape(-1, gq.shape[1]), gq]).T, gd @ torch.cat([gq, gd]).T]
    # Not the positive's column (never removed) nor the anchor's own same-tower column (always removed).
    kept = [torch.ones_like(s, dtype=torch.bool) for s in sims]
    for k in kept:
        k[:, :batch].fill_diagonal_(False)
        k[:, -batch:].fill_diagonal_(False)
    return torch.cat([(s - threshold)[k] for s, k in zip(sims, kept)])


# (guide_margin_type, guide_margin), each >= 0.005 from every guide gap (test_guide_margins_are_not_ties).
GUIDE_MARGINS = [("absolute", 0.0), ("absolute", 0.13), ("relative", 0.05), ("absolute", -0.07)]


def test_guide_margins_are_not_ties():
    guide = make_guide()
    for kind, margin in GUIDE_MARGINS:
        excess = guide_excess(guide, kind, margin)
        assert excess.abs().min() > 0.005, (kind, margin)
        assert 0 < int((excess > 0).sum()) < excess.numel()  # it removes some candidates, not all


GUIDE_COMBINATIONS = [
    pytest.param(st, bi, hard, ks, kind, m, fnm,
                 id=f"{st}-{'bi' if bi else 'uni'}-{'hn2' if hard else 'nohn'}-keys_{ks}-{kind}{m}-fnm{fnm}")
    for st, bi, hard, ks in itertools.product(SAME_TOWER, [False, True], [False, True], ["none", "both"])
    for (kind, m), fnm in zip(GUIDE_MARGINS, [None, 0.03, None, 0.19])
    if not (st == "doc" and not bi)
]


@pytest.mark.parametrize("same_tower, bidirectional, with_hard, key_set, kind, margin, fnm", GUIDE_COMBINATIONS)
def test_guided_filtering_matches_naive_reference(same_tower, bidirectional, with_hard, key_set, kind, margin, fnm):
    """Guided false-negative filtering with every strategy, both directions, the duplicate masks
    and the false-negative margin, against the per-anchor enumeration."""
    q, d, hn = make_batch()
    config = dict(same_tower=same_tower, bidirectional=bidirectional, temperature=TEMPERATURE, same_tower_weight=0.3,
                  false_negative_margin=fnm, guide_margin=margin, guide_margin_type=kind)
    assert_matches_naive(config, key_set, with_hard, q, d, hn, guide=make_guide())


@pytest.mark.parametrize("chunk", [0, 3])
def test_the_model_as_its_own_guide_is_the_false_negative_margin(chunk):
    """A guide that sees what the model sees, with guide_margin -m, removes exactly what
    false_negative_margin m removes: an oracle that shares no code with the guide filter."""
    q, d, hn = make_batch()
    common = dict(same_tower="both", bidirectional=True, query_keys=torch.tensor(QUERY_KEYS),
                  doc_keys=torch.tensor(DOC_KEYS), anchor_chunk_size=chunk)
    guided = _loss_and_grads(q, d, hn, guide_embeddings=(q, d, hn), guide_margin=-0.03, **common)
    margin = _loss_and_grads(q, d, hn, false_negative_margin=0.03, **common)
    plain = _loss_and_grads(q, d, hn, **common)
    for a, b in zip(guided, margin):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert abs(guided[0].item() - plain[0].item()) > 1e-3


def test_guide_shapes_are_checked_and_a_guide_uri_needs_embeddings():
    q, d, hn = make_batch()
    with pytest.raises(ValueError, match=r"guide q and d must both be \[B, G\]"):
        contrastive_loss(q, d, guide_embeddings=(q[:3], d, None))
    with pytest.raises(ValueError, match=r"guide hard negatives must be \[B, K, G\]"):
        contrastive_loss(q, d, hard_negatives=hn, guide_embeddings=(q, d, None))
    with pytest.raises(ValueError, match="no guide embeddings"):
        contrastive_loss(q, d, guide="models:/guide@champion")


def test_knobs_change_the_loss():
    # Guards the fixtures above: each knob must change something, or matching the reference proves little.
    q, d, hn = make_batch()
    plain = contrastive_loss(q, d, hard_negatives=hn).item()
    for alpha, margin in KNOBS:
        knobbed = contrastive_loss(q, d, hard_negatives=hn, same_tower_weight=alpha, false_negative_margin=margin)
        assert abs(knobbed.item() - plain) > 1e-3, (alpha, margin)


def _loss_and_grads(q, d, hn, **kwargs):
    q, d, hn = leaf(q, d, hn)
    loss = contrastive_loss(q, d, hard_negatives=hn, **kwargs)
    loss.backward()
    return loss, q.grad, d.grad, hn.grad


@pytest.mark.parametrize("same_tower", ["query", "doc", "both"])
@pytest.mark.parametrize("margin", [None, 0.03])
@pytest.mark.parametrize("key_set", ["none", "both"])
def test_zero_same_tower_weight_is_plain_in_batch_exactly(same_tower, margin, key_set):
    q, d, hn = make_batch()
    keys = as_tensors(key_kwargs(key_set, True))
    common = dict(bidirectional=True, false_negative_margin=margin, **keys)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no log(0), no -inf arithmetic warnings
        warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
        with torch.autograd.detect_anomaly(check_nan=True):  # no NaN in any backward op
            got = _loss_and_grads(q, d, hn, same_tower=same_tower, same_tower_weight=0.0, **common)
    want = _loss_and_grads(q, d, hn, same_tower="none", **common)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("same_tower, bidirectional", [("none", False), ("query", True), ("both", True)])
def test_huge_margin_is_no_filter_exactly(same_tower, bidirectional):
    q, d, hn = make_batch()
    common = dict(same_tower=same_tower, bidirectional=bidirectional, **as_tensors(key_kwargs("both", True)))
    got = _loss_and_grads(q, d, hn, false_negative_margin=1e6, **common)
    want = _loss_and_grads(q, d, hn, **common)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_margin_never_removes_the_positive():
    # A margin below -2 exceeds every cosine gap: all negatives go, each softmax keeps only its
    # positive, and -log(1) = 0 for every anchor.
    q, d, hn = make_batch()
    got = _loss_and_grads(q, d, hn, same_tower="both", false_negative_margin=-3.0)
    assert got[0].item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in got[1:])


def test_keys_change_the_loss():
    # Guards the key fixtures: masking must remove something, or the key cases above prove nothing.
    q, d, hn = make_batch()
    plain = contrastive_loss(q, d, hard_negatives=hn)
    masked = contrastive_loss(q, d, hard_negatives=hn, **as_tensors(key_kwargs("both", True)))
    assert abs(plain.item() - masked.item()) > 1e-3


def test_doc_same_tower_requires_bidirectional():
    q, d, _ = make_batch()
    with pytest.raises(ValueError, match="bidirectional"):
        contrastive_loss(q, d, same_tower="doc", bidirectional=False)
    with pytest.raises(ValueError, match="bidirectional"):
        SamToNeLoss(same_tower="doc", bidirectional=False)


def test_plain_in_batch_equals_cross_entropy():
    q, d, _ = make_batch(batch=7, dim=9)
    got = contrastive_loss(q, d, same_tower="none", bidirectional=False, temperature=0.1)
    want = F.cross_entropy(q @ d.T / 0.1, torch.arange(7))
    assert got.item() == pytest.approx(want.item(), abs=1e-6)


@pytest.mark.parametrize("kwargs, fragments", [
    (dict(d=torch.zeros(4, 7)), ["(4, 8)", "(4, 7)"]),
    (dict(d=torch.zeros(3, 8)), ["(4, 8)", "(3, 8)"]),
    (dict(q=torch.zeros(4), d=torch.zeros(4)), ["(4,)"]),
    (dict(hard_negatives=torch.zeros(3, 2, 8)), ["(3, 2, 8)", "(4, 8)"]),
    (dict(hard_negatives=torch.zeros(4, 2, 6)), ["(4, 2, 6)"]),
    (dict(hard_negatives=torch.zeros(4, 8)), ["(4, 8)"]),
    (dict(query_keys=torch.zeros(5, dtype=torch.int64)), ["query_keys", "(4,)", "(5,)"]),
    (dict(doc_keys=torch.zeros(4, 1, dtype=torch.int64)), ["doc_keys", "(4,)", "(4, 1)"]),
    (dict(hard_negatives=torch.zeros(4, 2, 8), doc_keys=torch.zeros(4, dtype=torch.int64),
          hard_negative_keys=torch.zeros(4, 3, dtype=torch.int64)),
     ["hard_negative_keys", "(4, 2)", "(4, 3)"]),
])
def test_shape_errors_name_the_shapes(kwargs, fragments):
    args = dict(q=torch.zeros(4, 8), d=torch.zeros(4, 8)) | kwargs
    with pytest.raises(ValueError) as err:
        contrastive_loss(args.pop("q"), args.pop("d"), **args)
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(same_tower="queries"), r"'none', 'query', 'doc', 'both'"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(query_keys=torch.zeros(4)), "integer"),
    (dict(hard_negative_keys=torch.zeros(4, 2, dtype=torch.int64)), "without hard_negatives"),
    (dict(hard_negatives=torch.zeros(4, 2, 8), hard_negative_keys=torch.zeros(4, 2, dtype=torch.int64)),
     "doc_keys"),
    (dict(anchor_offset=3, num_anchors=2), r"\[3, 5\).*4"),
    (dict(anchor_offset=-1, num_anchors=2), "anchor rows"),
    (dict(num_anchors=0), "anchor rows"),
    (dict(same_tower_weight=-0.5), "same_tower_weight"),
    (dict(same_tower_weight=math.nan), "same_tower_weight"),
    (dict(same_tower_weight=math.inf), "same_tower_weight"),
    (dict(same_tower_weight=True), "same_tower_weight"),
    (dict(false_negative_margin=math.nan), "false_negative_margin"),
    (dict(false_negative_margin=-math.inf), "false_negative_margin"),
    (dict(false_negative_margin="0.1"), "false_negative_margin"),
    (dict(anchor_chunk_size=-1), "anchor_chunk_size"),
    (dict(anchor_chunk_size=2.0), "anchor_chunk_size"),
])
def test_invalid_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        contrastive_loss(torch.zeros(4, 8), torch.zeros(4, 8), **kwargs)


def test_module_validates_config():
    with pytest.raises(ValueError, match="same_tower"):
        SamToNeLoss(same_tower="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        SamToNeLoss(temperature=0)


def test_bf16_inputs_under_autocast_give_float32_loss():
    q, d, hn = make_batch(dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = contrastive_loss(q, d, hard_negatives=hn)
    assert got.dtype == torch.float32
    # The softmax must see the exact similarities of the bf16 values, not bf16-rounded logits.
    want = naive_loss(q.double(), d.double(), hard_negatives=hn.double(), same_tower="both",
                      bidirectional=True, temperature=TEMPERATURE)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    q32, d32, hn32 = make_batch()
    assert got.item() == pytest.approx(contrastive_loss(q32, d32, hard_negatives=hn32).item(), abs=0.05)


def test_float32_inputs_under_bf16_autocast_are_not_downcast():
    q, d, hn = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = contrastive_loss(q, d, hard_negatives=hn)
    want = naive_loss(q.double(), d.double(), hard_negatives=hn.double(), same_tower="both",
                      bidirectional=True, temperature=TEMPERATURE)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), abs=1e-5)


SHARD_CONFIGS = [
    dict(same_tower="both", bidirectional=True, with_hard=True, key_set="both"),
    dict(same_tower="query", bidirectional=False, with_hard=True, key_set="doc"),
    dict(same_tower="none", bidirectional=True, with_hard=False, key_set="none"),
    # 0.13 sits >= 0.02 away from every similarity gap of make_batch(batch=8, seed=3).
    dict(same_tower="both", bidirectional=True, with_hard=True, key_set="both",
         same_tower_weight=0.3, false_negative_margin=0.13),
]


@pytest.mark.parametrize("cfg", SHARD_CONFIGS, ids=lambda c: f"{c['same_tower']}-bi{c['bidirectional']}-knobs{len(c) > 4}")
@pytest.mark.parametrize("num_shards", [2, 4])
def test_anchor_shards_average_to_full_batch(cfg, num_shards):
    batch = 8
    cfg = dict(cfg)
    with_hard, key_set = cfg.pop("with_hard"), cfg.pop("key_set")
    q, d, hn = make_batch(batch=batch, seed=3)
    # Cycle the 6-row key fixtures to 8 rows, adding duplicates that straddle shard boundaries.
    keys = {name: cycled(v, batch) for name, v in key_kwargs(key_set, with_hard).items()}
    tkeys = as_tensors(keys)
    shard = batch // num_shards

    qf, df, hf = leaf(q, d, hn)
    cfg["temperature"] = TEMPERATURE
    full = contrastive_loss(qf, df, hard_negatives=hf if with_hard else None, **tkeys, **cfg)
    full.backward()

    qs, ds, hs = leaf(q, d, hn)
    shard_losses = []
    for w in range(num_shards):
        part = contrastive_loss(qs, ds, hard_negatives=hs if with_hard else None, **tkeys, **cfg,
                                anchor_offset=w * shard, num_anchors=shard)
        # Each shard is its own independent oracle check: the naive loss over those rows only.
        want = naive_loss(q.double(), d.double(), hard_negatives=hn.double() if with_hard else None,
                          **keys, **cfg, rows=range(w * shard, (w + 1) * shard))
        assert part.item() == pytest.approx(want.item(), abs=1e-5)
        shard_losses.append(part)
    (sum(shard_losses) / num_shards).backward()

    assert (sum(shard_losses) / num_shards).item() == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(qs.grad, qf.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ds.grad, df.grad, atol=1e-6, rtol=1e-5)
    if with_hard:
        torch.testing.assert_close(hs.grad, hf.grad, atol=1e-6, rtol=1e-5)


def test_default_num_anchors_runs_to_end_of_batch():
    q, d, hn = make_batch()
    got = contrastive_loss(q, d, hard_negatives=hn, anchor_offset=4)
    want = naive_loss(q.double(), d.double(), hard_negatives=hn.double(), same_tower="both",
                      bidirectional=True, temperature=TEMPERATURE, rows=range(4, B))
    assert got.item() == pytest.approx(want.item(), abs=1e-5)


def test_module_forward_matches_naive_and_reports_config():
    q, d, hn = make_batch(seed=1)
    keys = key_kwargs("both", True)
    loss_fn = SamToNeLoss(same_tower="query", bidirectional=True, temperature=0.1)
    assert loss_fn.get_config_dict() == {"same_tower": "query", "bidirectional": True, "temperature": 0.1,
                                         "same_tower_weight": 1.0, "false_negative_margin": None}
    got = loss_fn(q, d, hn, **as_tensors(keys), anchor_offset=2, num_anchors=3)
    want = naive_loss(q.double(), d.double(), hard_negatives=hn.double(), **keys, same_tower="query",
                      bidirectional=True, temperature=0.1, rows=range(2, 5))
    assert got.item() == pytest.approx(want.item(), abs=1e-5)


CHUNK_COMBINATIONS = [
    pytest.param(st, bi, hard, ks, knobs,
                 id=f"{st}-{'bi' if bi else 'uni'}-{'hn2' if hard else 'nohn'}-keys_{ks}-a{knobs[0]}-m{knobs[1]}")
    for st, bi, hard, ks in itertools.product(SAME_TOWER, [False, True], [False, True], ["none", "both"])
    for knobs in [(1.0, None), (0.3, 0.03)]
    if not (st == "doc" and not bi)
]


@pytest.mark.parametrize("offset, num_anchors, chunk", [(0, B, 4), (1, 5, 2)])  # uneven last chunks
@pytest.mark.parametrize("same_tower, bidirectional, with_hard, key_set, knobs", CHUNK_COMBINATIONS)
def test_chunked_anchors_match_unchunked_loss_and_gradients(same_tower, bidirectional, with_hard, key_set,
                                                            knobs, offset, num_anchors, chunk):
    # float64 so that equal math gives equal numbers to 1e-12, whatever kernel each shape takes.
    q, d, hn = make_batch(dtype=torch.float64)
    kwargs = dict(same_tower=same_tower, bidirectional=bidirectional, temperature=TEMPERATURE,
                  same_tower_weight=knobs[0], false_negative_margin=knobs[1],
                  anchor_offset=offset, num_anchors=num_anchors, **as_tensors(key_kwargs(key_set, with_hard)))
    if not with_hard:
        hn = None
    inputs = [t for t in (q, d, hn) if t is not None]
    full_in, chunk_in = leaf(*inputs), leaf(*inputs)
    full = contrastive_loss(*full_in[:2], hard_negatives=full_in[2] if with_hard else None, **kwargs)
    chunked = contrastive_loss(*chunk_in[:2], hard_negatives=chunk_in[2] if with_hard else None,
                               anchor_chunk_size=chunk, **kwargs)
    (full + chunked).backward()  # one backward: each side's gradients land on its own leaves
    assert chunked.dtype == torch.float64
    assert chunked.item() == pytest.approx(full.item(), abs=1e-12)
    for got, want in zip(chunk_in, full_in):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-12, rtol=1e-10)


class LiveTensors(TorchDispatchMode):
    """Records, over every tensor op run inside it, the largest output and the peak bytes held by
    the storages of outputs still alive (saved activations included)."""

    def __init__(self):
        super().__init__()
        self.storages, self.peak_bytes, self.max_numel = [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.storages.append(weakref.ref(t.untyped_storage()))
                self.max_numel = max(self.max_numel, t.numel())
        self.storages = [ref for ref in self.storages if ref() is not None]
        alive = {ref().data_ptr(): ref().nbytes() for ref in self.storages}
        self.peak_bytes = max(self.peak_bytes, sum(alive.values()))
        return out


@pytest.mark.model
def test_chunked_anchors_bound_the_memory():
    batch, chunk = 96, 8
    q, d, hn = make_batch(batch=batch, num_hard=1, seed=5)
    keys = as_tensors({name: cycled(v, batch) for name, v in key_kwargs("both", True).items()})
    keys["hard_negative_keys"] = keys["hard_negative_keys"][:, :1]
    candidates = 3 * batch  # q->d: documents, hard negatives, queries

    def run(**kwargs):
        qs, ds, hs = leaf(q, d, hn)
        with LiveTensors() as live:
            contrastive_loss(qs, ds, hard_negatives=hs, false_negative_margin=0.03, **keys, **kwargs).backward()
        return live

    full, chunked = run(), run(anchor_chunk_size=chunk)
    assert full.max_numel >= batch * candidates  # the measurement sees the [B, M] logits
    assert chunked.max_numel <= chunk * candidates
    # Only one chunk's logits are alive at a time: well under the unchunked peak, not the same
    # total spread over chunks (which is what keeping every chunk's softmax for backward gives).
    assert chunked.peak_bytes < full.peak_bytes / 4, (chunked.peak_bytes, full.peak_bytes)


def test_docstring_example_runs():
    result = doctest.testmod(losses, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("alpha, margin, chunk", [(1.0, None, None), (0.3, 0.03, 4)])
def test_cuda_matches_naive_reference(alpha, margin, chunk):
    q, d, hn = make_batch()
    config = dict(same_tower="both", bidirectional=True, temperature=TEMPERATURE,
                  same_tower_weight=alpha, false_negative_margin=margin)
    assert_matches_naive(config, "both", True, q, d, hn, device="cuda", anchor_chunk_size=chunk)


def test_the_loss_is_built_from_the_config_and_validated_once(monkeypatch):
    """``loss:`` settings reach the loss through one object: LossConfig's defaults, checked when it
    is built, never again per call (the training loop calls the loss every step)."""
    from samtone_ray.core import choices
    from samtone_ray.core.config import LossConfig

    calls = []
    real = choices.check_temperature
    monkeypatch.setattr(choices, "check_temperature", lambda *a, **k: calls.append(a) or real(*a, **k))
    config = LossConfig(same_tower="query", temperature=0.1)
    loss_fn = SamToNeLoss.from_config(config)
    q, d = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    for _ in range(3):
        loss_fn(q, d)
    assert len(calls) == 1
    assert loss_fn.config is config
    assert SamToNeLoss().config == LossConfig()  # no defaults of its own
    assert SamToNeLoss(config, temperature=0.2).config.temperature == 0.2 and config.temperature == 0.1
    with pytest.raises(ValueError, match="loss.temperature"):
        SamToNeLoss(config, temperature=0.0)
    assert loss_fn.get_config_dict() == config.hyperparameters()
