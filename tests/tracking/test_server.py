"""Tracking as a cluster has it: every call over HTTP to an ``mlflow server`` whose store is
PostgreSQL and whose artifacts are proxied to S3 (tests/servers.py). Checked against the servers
themselves: the objects in the bucket (boto3) and the rows in the database (psycopg2)."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest

from samtone_ray.core.config import from_dict
from samtone_ray.tracking.registry import PromotionError, promote_best

pytestmark = pytest.mark.system


def _cfg(name: str):
    return from_dict({"registry": {"model_name": name}, "train": {"precision": "fp32", "eval_batch_size": 16}})


def _logged(uri: str, model_dir, experiment: str) -> dict:
    """A run holding ``model_dir`` as its logged model, as a leaderboard row names it."""
    from samtone_ray.tracking import runs as tracking

    run_id = tracking.start_run(uri, experiment, model_dir.name, {"data.train": "s3://corpus/train"})
    assert tracking.RunLogger(uri, run_id).log_model(model_dir) is not None
    return {"run_id": run_id, "trial": model_dir.name, "settings": {}, "metrics": {"mrr@10": 0.0}}


def _champion_in_postgres(server, name: str) -> tuple[int | None, int]:
    """(the version @champion points to, the number of versions), read from MLflow's tables."""
    with server.postgres.connect() as db, db.cursor() as cur:
        cur.execute("SELECT version FROM registered_model_aliases WHERE name = %s AND alias = 'champion'", (name,))
        row = cur.fetchone()
        cur.execute("SELECT count(*) FROM model_versions WHERE name = %s", (name,))
        return (row[0] if row else None), cur.fetchone()[0]


def test_a_champion_registered_through_the_server_is_served_from_s3(tracking_server, models, split, tmp_path,
                                                                     monkeypatch, capsys):
    import torch

    from samtone_ray.cli import main
    from samtone_ray.model.towers import DualEncoder
    from samtone_ray.serve.replica import load_model
    from samtone_ray.tracking import runs as tracking
    from samtone_ray.tracking.model_uri import resolve_model

    # A node's view: the server's URI and nothing else; no S3 credentials, no local store.
    for var in ("MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    # A SQLite store used earlier in this process must not capture the registry (MLflow keeps the
    # last registry URI set, process-wide).
    tracking.client(f"sqlite:///{tmp_path / 'earlier.db'}")
    uri, name = tracking_server.uri, f"m-{uuid.uuid4().hex[:8]}"
    (worse, _), (better, better_score) = models
    first = promote_best(_cfg(name), uri, _logged(uri, worse, name), split)
    candidate = _logged(uri, better, name)
    second = promote_best(_cfg(name), uri, candidate, split)
    assert first["promoted"] and second["promoted"] and second["incumbent_version"] == first["version"]
    assert _champion_in_postgres(tracking_server, name) == (second["version"], 2)

    # The weights are objects in the bucket, byte for byte the saved files.
    keys = [k for k in tracking_server.s3.keys("mlartifacts/") if f"/{candidate['run_id']}/artifacts/model/" in k]
    assert any(k.endswith("/model/MLmodel") for k in keys), keys
    weights = [k for k in keys if k.endswith(".safetensors")]
    local = sorted(better.rglob("*.safetensors"))
    assert weights and len(weights) == len(local)
    s3 = tracking_server.s3.client()
    for path in local:
        key = next(k for k in weights if k.endswith("/" + str(path.relative_to(better))))
        assert s3.get_object(Bucket=tracking_server.s3.bucket, Key=key)["Body"].read() == path.read_bytes()
    assert not (tmp_path / ".samtone").exists() and not (tmp_path / "mlruns").exists()

    capsys.readouterr()  # what promote_best printed
    assert main(["models", name, "--tracking-uri", uri]) == 0
    listed = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[2:]}
    assert listed == {str(second["version"]): "champion", str(first["version"]): "-"}

    # What `samtone serve` does with models:/NAME@champion: the better model's embeddings.
    monkeypatch.setenv("SAMTONE_MODEL_CACHE", str(tmp_path / "cache"))
    served = load_model(f"models:/{name}@champion", uri)
    assert served.resolved.version == str(second["version"])
    # Downloaded once: a replica resolving its alias at every poll reuses the files.
    assert resolve_model(f"models:/{name}@champion", uri).path == served.resolved.path
    assert len(list((tmp_path / "cache").iterdir())) == 1

    texts = ["how do I install a package", "apt-get update"]
    with torch.no_grad():
        expected = DualEncoder.from_pretrained(better).encode_queries(texts)
    assert torch.allclose(served.embed(texts, "query", "fp32", 2), torch.as_tensor(expected), atol=1e-5)
    assert second["candidate_metric"] == pytest.approx(better_score)


def test_a_model_that_did_not_upload_whole_is_never_registered(tracking_server, models, split):
    uri, name, s3 = tracking_server.uri, f"m-{uuid.uuid4().hex[:8]}", tracking_server.s3
    (_, _), (better, _) = models
    candidate = _logged(uri, better, name)
    # What an upload cut off by a server or database outage leaves: the model without its weights.
    (weights,) = [k for k in s3.keys("mlartifacts/") if f"/{candidate['run_id']}/" in k and k.endswith(".safetensors")]
    s3.client().delete_object(Bucket=s3.bucket, Key=weights)
    with pytest.raises(PromotionError, match="@champion stays unset"):
        promote_best(_cfg(name), uri, candidate, split)
    assert _champion_in_postgres(tracking_server, name) == (None, 0)


def test_postgres_restarted_logging_waits_and_promotion_refuses(tracking_server, models, split, monkeypatch, caplog):
    from mlflow import MlflowClient

    from samtone_ray.tracking import runs as tracking

    uri, name, pg = tracking_server.uri, f"m-{uuid.uuid4().hex[:8]}", tracking_server.postgres
    (worse, _), (better, _) = models
    incumbent = promote_best(_cfg(name), uri, _logged(uri, worse, name), split)["version"]
    candidate = _logged(uri, better, name)
    run = tracking.RunLogger(uri, candidate["run_id"])
    run.log_metrics({"loss": 1.0}, step=0)

    # Down for ~3 s while a step's metrics are logged: MLflow's client retries the server's 5xx
    # answers (backoff 1, 2, 4 s) until the database is back; the step is kept.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")
    pg.stop()
    restart = threading.Timer(3.0, pg.start)
    restart.start()
    started = time.monotonic()
    run.log_metrics({"loss": 0.5}, step=1)
    waited = time.monotonic() - started
    restart.join()
    history = MlflowClient(uri).get_metric_history(candidate["run_id"], "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5)]
    assert waited >= 2.5, f"logged in {waited:.1f} s while the database was down"

    # Down while the champion is decided: refused, saying so; nothing registered or moved.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    pg.stop()
    try:
        with pytest.raises(PromotionError, match="left as it was"):
            promote_best(_cfg(name), uri, candidate, split)
        # A run's logging gives up with a warning and lets training go on.
        monkeypatch.setattr(tracking, "LOG_RETRY_PAUSE_S", 0.01)
        with caplog.at_level("WARNING", logger=tracking.__name__):
            run.log_metrics({"loss": 0.25}, step=2)
        assert "could not log metrics at step 2" in caplog.text and pg.password not in caplog.text
    finally:
        pg.start()
    assert _champion_in_postgres(tracking_server, name) == (incumbent, 1)
    assert os.environ.get("PGPASSWORD") is None  # the password stayed with the server processes


def test_a_tuning_run_on_ray_logs_and_registers_through_the_server(tracking_server, ray_cluster, tiny_model_dir,
                                                                   tmp_path):
    """The trial's steps and model are logged by its Ray Train worker, another process, over HTTP."""
    from cluster.multinode import write_tiny_beir

    from samtone_ray.tune.tuner import tune

    name = f"m-{uuid.uuid4().hex[:8]}"
    (tmp_path / "beir").mkdir()
    data = write_tiny_beir(tmp_path / "beir", train_pairs=16, dev_queries=8)
    outcome = tune(from_dict({
        "name": "t", "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(tiny_model_dir), "query_max_length": 16, "doc_max_length": 32},
        "data": {"train": str(data), "eval": str(data)},
        "train": {"batch_size": 8, "max_steps": 2, "eval_every": 2, "log_every": 1},
        "scaling": {"num_workers": 1},
        "tracking": {"uri": tracking_server.uri, "experiment": name},
        "tune": {"space": {"train.lr": {"grid": [1e-3]}}},
        "registry": {"model_name": name},
    }))
    assert outcome.champion["promoted"]
    assert _champion_in_postgres(tracking_server, name) == (outcome.champion["version"], 1)
    trial = outcome.best["run_id"]
    with tracking_server.postgres.connect() as db, db.cursor() as cur:
        cur.execute("SELECT DISTINCT step FROM metrics WHERE run_uuid = %s AND key = 'loss'", (trial,))
        assert sorted(r[0] for r in cur.fetchall()) == [1, 2]
        cur.execute("SELECT status FROM runs WHERE run_uuid IN (%s, %s)", (trial, outcome.parent_run_id))
        assert [r[0] for r in cur.fetchall()] == ["FINISHED", "FINISHED"]
    keys = tracking_server.s3.keys("mlartifacts/")
    assert any(k.endswith(f"/{trial}/artifacts/model/MLmodel") for k in keys)
    assert any(f"/{outcome.parent_run_id}/artifacts/" in k and k.endswith("leaderboard.csv") for k in keys)
