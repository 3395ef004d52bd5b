"""Gradient cache == the plain step: same loss, same gradients, same weights after 3 steps, with
dropout ON (the random state is replayed), on 1 process and on 2 real Ray Train workers."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from samtone_ray.data.batching import PairKeys, make_shard
from samtone_ray.core.config import ConfigError, from_dict
from samtone_ray.data.sources import TrainingPairs, bundled_sample_path, load_training_pairs
from samtone_ray.train.gradcache import grad_cache_step
from samtone_ray.train.trainer import batch_keys, shard_loss, train_step
from samtone_ray.model.losses import SamToNeLoss
from samtone_ray.model.towers import DualEncoder

from ray import cloudpickle  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers run this module's functions

BATCH, HARD, CHUNK = 8, 2, 3


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_dir, tmp_path_factory):
    """The session's tiny BERT with dropout switched ON (p = 0.1 on hidden states and attention)."""
    from transformers import AutoTokenizer, BertModel

    path = tmp_path_factory.mktemp("tiny-bert-dropout")
    model = BertModel.from_pretrained(tiny_model_dir, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pairs():
    """24 real pairs with 2 hard negatives each, a duplicated query, a duplicated document and a
    hard negative equal to its own pair's positive, so masking has something to mask."""
    base = load_training_pairs(bundled_sample_path(), "train").subset(range(24))
    n = len(base)
    queries, documents = list(base.queries), list(base.documents)
    queries[1] = queries[0]
    documents[5] = documents[4]
    negatives = [[documents[(i + 7) % n], documents[(i + 13) % n]] for i in range(n)]
    negatives[3][0] = documents[3]
    return TrainingPairs(queries=queries, documents=documents, negatives=negatives)


def _cfg(model_dir, **overrides):
    cfg = from_dict(
        {
            "model": {"name_or_path": str(model_dir), "query_max_length": 16, "doc_max_length": 32,
                      "tower_mode": "shared"},
            "loss": {"same_tower": "both", "bidirectional": True, "mask_duplicates": True},
            "data": {"num_hard_negatives": HARD},
            "train": {"batch_size": BATCH, "chunk_size": CHUNK, "precision": "fp32"},
            "tracking": {"enabled": False},
        }
    )
    return cfg.with_overrides(overrides) if overrides else cfg


def _shard(cfg, pairs, indices, tokenizer):
    return make_shard(pairs, indices, tokenizer, query_max_length=16, doc_max_length=32,
                      num_negatives=cfg.data.num_hard_negatives, chunk_size=CHUNK)


def _keys(cfg, pairs, indices):
    return batch_keys(PairKeys.build(pairs, cfg.data.num_hard_negatives), indices) if cfg.loss.mask_duplicates else None


def _plain(model, cfg, shard, keys, rank=0):
    loss = train_step(model, shard, SamToNeLoss(cfg.loss), keys=keys, rank=rank)
    loss.backward()
    return loss.detach()


def _cached(model, cfg, shard, keys, micro, rank=0):
    loss_fn = functools.partial(shard_loss, loss_fn=SamToNeLoss(cfg.loss), keys=keys, rank=rank)
    return grad_cache_step(model, shard, loss_fn, micro_batch_size=micro)


def _grads(model):
    module = getattr(model, "module", model)
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _fresh(cfg):
    torch.manual_seed(0)
    model = DualEncoder.from_config(cfg.model)
    model.train()
    return model


def _assert_close_dicts(got, want):
    assert set(got) == set(want) and len(want) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------- one process


CASES = {
    "samtone-both-hard-masked": {},
    "plain-in-batch": {"loss.same_tower": "none", "loss.bidirectional": False, "loss.mask_duplicates": False,
                       "data.num_hard_negatives": 0},
    "separate-towers-projection": {"model.tower_mode": "separate", "model.projection_dim": 8},
}


@pytest.mark.parametrize(
    "case,micro",
    [("samtone-both-hard-masked", CHUNK), ("samtone-both-hard-masked", 2 * CHUNK),
     ("samtone-both-hard-masked", 100), ("plain-in-batch", 2 * CHUNK), ("separate-towers-projection", 2 * CHUNK)],
)
@pytest.mark.model
def test_cached_step_matches_plain_step_with_dropout(dropout_model_dir, pairs, case, micro):
    cfg = _cfg(dropout_model_dir, **CASES[case])
    indices = np.arange(BATCH)
    plain = _fresh(cfg)
    shard = _shard(cfg, pairs, indices, plain.tokenizer)
    keys = _keys(cfg, pairs, indices)

    torch.manual_seed(123)
    want_loss = _plain(plain, cfg, shard, keys)
    want_rng = torch.get_rng_state()
    torch.manual_seed(124)  # dropout really is on: another random state gives another loss
    with torch.no_grad():
        other = float(train_step(plain, shard, SamToNeLoss(cfg.loss), keys=keys, rank=0))
    assert other != pytest.approx(float(want_loss), abs=1e-4)

    cached = _fresh(cfg)
    torch.manual_seed(123)
    got_loss = _cached(cached, cfg, shard, keys, micro)
    assert float(got_loss) == pytest.approx(float(want_loss), abs=1e-5)
    assert torch.equal(torch.get_rng_state(), want_rng)  # the next step draws the same dropout
    _assert_close_dicts(_grads(cached), _grads(plain))


@pytest.mark.model
def test_three_optimizer_steps_match_plain_steps(dropout_model_dir, pairs):
    cfg = _cfg(dropout_model_dir)
    models = {}
    for name, step in (("plain", _plain), ("cached", functools.partial(_cached, micro=2 * CHUNK))):
        model = _fresh(cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.manual_seed(7)
        for s in range(3):
            indices = np.arange(s * BATCH, (s + 1) * BATCH)
            optimizer.zero_grad(set_to_none=True)
            step(model, cfg, _shard(cfg, pairs, indices, model.tokenizer), _keys(cfg, pairs, indices))
            optimizer.step()
        models[name] = dict(model.named_parameters())
    changed = [n for n, p in models["plain"].items() if not torch.equal(p, _fresh(cfg).state_dict()[n])]
    assert len(changed) > 10
    _assert_close_dicts({n: p.detach() for n, p in models["cached"].items()},
                        {n: p.detach() for n, p in models["plain"].items()})


def test_micro_batch_size_is_validated():
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        from_dict({"train": {"chunk_size": 32, "micro_batch_size": 16}})
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        from_dict({"train": {"micro_batch_size": -1}})
    assert from_dict({"train": {"chunk_size": 32, "micro_batch_size": 32}}).train.micro_batch_size == 32


# ----------------------------------------------------------------- two real Ray Train workers


def _two_worker_loop(config):
    """Each rank: the plain DDP step and the cached step from the same random state, then 3
    optimizer steps each way; the results are saved for the test to compare."""
    import ray.train
    import ray.train.torch

    cfg = _cfg(config["model_dir"])
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    pairs = config["pairs"]
    per = BATCH // world
    out = {}
    for name, step in (("plain", _plain), ("cached", functools.partial(_cached, micro=2 * CHUNK))):
        model = _fresh(cfg)
        ddp = ray.train.torch.prepare_model(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.manual_seed(100 + rank)  # per-rank dropout streams, as train_loop seeds them
        for s in range(3):
            indices = np.arange(s * BATCH, (s + 1) * BATCH)
            shard = _shard(cfg, pairs, indices[rank * per : (rank + 1) * per], model.tokenizer)
            optimizer.zero_grad(set_to_none=True)
            loss = step(ddp, cfg, shard, _keys(cfg, pairs, indices), rank=rank)
            if s == 0:
                total = loss.clone()
                torch.distributed.all_reduce(total)
                out[f"{name}_loss"] = float(total) / world
                out[f"{name}_grads"] = _grads(model)
            optimizer.step()
        out[f"{name}_weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save(out, Path(config["out"]) / f"rank{rank}.pt")
    ray.train.report({"done": 1})


def test_two_workers_cached_step_matches_plain_ddp_step_with_dropout(ray_cluster, dropout_model_dir, pairs, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    TorchTrainer(
        _two_worker_loop,
        train_loop_config={"model_dir": str(dropout_model_dir), "pairs": pairs, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="gradcache"),
    ).fit()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["cached_loss"] == pytest.approx(got["plain_loss"], abs=1e-5)
        _assert_close_dicts(got["cached_grads"], got["plain_grads"])
        _assert_close_dicts(got["cached_weights"], got["plain_weights"])
    # DDP averaged: both ranks hold the same gradients (the cache's all-reduce really ran).
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    _assert_close_dicts(r1["cached_grads"], r0["cached_grads"])
