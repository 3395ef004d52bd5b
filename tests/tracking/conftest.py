"""Fixtures of the registry tests: a small eval split, two saved models of known scores, and the
tracking server a cluster runs (``mlflow server`` on PostgreSQL with artifacts proxied to S3, one
per session, tests/servers.py; skipped, saying why, where PostgreSQL or moto is missing)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from samtone_ray.data.sources import BeirSplit, bundled_sample_path, load_beir
from samtone_ray.evaluation.retrieval import evaluate_model
from samtone_ray.model.towers import DualEncoder


@pytest.fixture(scope="session")
def split():
    """20 dev queries of the bundled sample, their relevant documents and 80 distractors."""
    dev = load_beir(bundled_sample_path(), "dev")
    qids = sorted(dev.qrels)[:20]
    qrels = {q: dict(dev.qrels[q]) for q in qids}
    needed = {d for q in qids for d in qrels[q]}
    docs = [d for d in dev.corpus if d in needed] + [d for d in dev.corpus if d not in needed][:80]
    return BeirSplit(corpus={d: dev.corpus[d] for d in docs}, queries={q: dev.queries[q] for q in qids}, qrels=qrels)


@pytest.fixture(scope="session")
def models(tiny_model_dir, split, tmp_path_factory):
    """Two saved DualEncoders with different scores, ordered (worse, better), each with its score."""
    root = tmp_path_factory.mktemp("models")
    base = DualEncoder.from_base(str(tiny_model_dir), query_max_length=16, doc_max_length=32)
    out = []
    for seed in range(1, 20):
        model = DualEncoder.from_base(str(tiny_model_dir), query_max_length=16, doc_max_length=32)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5 * p.std().nan_to_num(0.02) * torch.randn_like(p))
        score = evaluate_model(model, split, 16, "fp32")["mrr@10"]
        if score != evaluate_model(base, split, 16, "fp32")["mrr@10"]:
            break
    for name, model in (("base", base), ("perturbed", model)):
        path = model.save_pretrained(root / name)
        # The oracle: the saved directory evaluated directly, not through the registry.
        out.append((path, evaluate_model(DualEncoder.from_pretrained(path), split, 16, "fp32")["mrr@10"]))
    assert out[0][1] != out[1][1]
    return sorted(out, key=lambda m: m[1])


@dataclass
class TrackingServer:
    uri: str  # http://127.0.0.1:PORT, what every node would log to
    postgres: object  # servers.Postgres
    s3: object  # servers.S3


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    import servers

    reason = servers.postgres_unavailable() or servers.s3_unavailable()
    if reason:
        pytest.skip(f"the tracking-server tests need PostgreSQL and an S3 server: {reason}")
    logs = tmp_path_factory.mktemp("tracking-server")
    pg = servers.start_postgres()
    s3 = server = None
    try:
        s3 = servers.start_s3(logs)
        server = servers.start_mlflow_server(pg, s3, logs)
        yield TrackingServer(server.uri, pg, s3)
    finally:
        if server:
            servers.stop_mlflow_server(server)
        if s3:
            servers.stop_s3(s3)
        servers.remove_postgres(pg)
