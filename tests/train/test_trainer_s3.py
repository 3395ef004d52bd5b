"""Training with ``output_dir`` on S3 (the real S3 API of moto's server, tests/servers.py): a worker
killed mid-run resumes from the last checkpoint Ray Train wrote to the bucket, and the model, the
history and the per-query file land in the bucket, not in a local folder named ``s3:``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from samtone_ray.core.config import from_dict
from samtone_ray.data.batching import Schedule, batch_digest
from samtone_ray.data.sources import bundled_sample_path, load_beir, load_training_pairs
from samtone_ray.train.trainer import HISTORY_FILE, train

pytestmark = pytest.mark.ray


def _cfg(tiny_model_dir, out: str, **overrides):
    return from_dict({
        "model": {"name_or_path": str(tiny_model_dir), "query_max_length": 16, "doc_max_length": 32},
        "loss": {"same_tower": "both", "bidirectional": True},
        "train": {"batch_size": 8, "lr": 1e-3, "max_steps": 6, "chunk_size": 3, "warmup_ratio": 0.0,
                  "precision": "fp32", "eval_every": 2},
        "scaling": {"num_workers": 2},
        "tracking": {"enabled": False},
        "output_dir": out,
    }).with_overrides(overrides)


def test_a_killed_worker_resumes_from_the_s3_checkpoint(ray_cluster, s3_server, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URI taken for a relative path would show up here as ./s3:
    pairs = load_training_pairs(bundled_sample_path(), "train").subset(range(48))
    dev = load_beir(bundled_sample_path(), "dev")
    qids = sorted(dev.qrels)[:8]
    docs = sorted({d for q in qids for d in dev.qrels[q]}) + sorted(dev.corpus)[:40]
    dev = type(dev)(corpus={d: dev.corpus[d] for d in docs}, queries={q: dev.queries[q] for q in qids},
                    qrels={q: dev.qrels[q] for q in qids})
    prefix = "train-s3/fault"
    outcome = train(_cfg(tiny_model_dir, f"s3://{s3_server.bucket}/{prefix}", **{"train.fail_at_step": 3}),
                    data=(pairs, dev))
    clean = train(_cfg(tiny_model_dir, str(tmp_path / "clean")), data=(pairs, dev))

    assert not Path("s3:").exists() and outcome.model_dir == f"s3://{s3_server.bucket}/{prefix}/model"
    s3 = s3_server.client()

    def get(key: str) -> bytes:
        return s3.get_object(Bucket=s3_server.bucket, Key=f"{prefix}/{key}")["Body"].read()

    keys = s3_server.keys(prefix + "/")
    assert get(".fault_injected") == b"3"  # the last worker really died at step 3
    checkpoints = sorted({k.split("/")[-2] for k in keys if k.endswith("/state.pt")})
    assert checkpoints[-1] == "step_00000006", keys  # Ray Train's checkpoints are objects in the bucket
    history = json.loads(get(HISTORY_FILE))
    schedule = Schedule(len(pairs), 8, 42, 1, 6)
    # Resumed from the step-2 checkpoint in S3: every batch once, in order.
    assert [h[0] for h in history] == [1, 2, 3, 4, 5, 6]
    assert [h[3] for h in history] == [batch_digest(schedule.batch(s)) for s in range(6)]
    per_query = pq.read_table(io.BytesIO(get("per_query.parquet")))
    assert sorted(set(per_query.column("step").to_pylist())) == [2, 4, 6]
    resumed = load_safetensors(get("model/model.safetensors"))
    uninterrupted = load_file(str(tmp_path / "clean" / "model" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    worst = max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed)
    print(f"max |resumed from S3 - uninterrupted| = {worst:.2e}")
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-5, rtol=1e-4, msg=name)
    assert clean.model_dir == tmp_path / "clean" / "model"
