"""MLflow at the edge, on real SQLite stores: the logged model, model URIs, retried logging."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from samtone_ray import __version__
from samtone_ray.tracking import runs as tracking
from samtone_ray.tracking.model_uri import ModelURIError, fingerprint, resolve_model
from samtone_ray.model.towers import DualEncoder

pytestmark = pytest.mark.mlflow

TEXTS = ["a python library for json", "gnome text editor", "kernel module for wifi"]


@pytest.fixture(scope="module")
def logged(tiny_model_dir, tmp_path_factory):
    """A saved DualEncoder logged to a run and registered twice (v1, v2), @champion on v2."""
    root = tmp_path_factory.mktemp("mlflow")
    model_dir = DualEncoder.from_pretrained(tiny_model_dir).save_pretrained(root / "saved")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "exp", "run", {"a": 1})
    model_uri = tracking.RunLogger(uri, run_id).log_model(model_dir)
    c = tracking.client(uri)
    c.create_registered_model("m")
    source = f"{c.get_run(run_id).info.artifact_uri}/model"
    for _ in range(2):
        version = c.create_model_version("m", source=source, run_id=run_id)
    c.set_registered_model_alias("m", "champion", version.version)
    return uri, run_id, model_uri, model_dir


def test_logged_model_holds_no_source_of_ours_and_pins_the_package(logged):
    uri, run_id, model_uri, _ = logged
    assert model_uri == f"runs:/{run_id}/model"
    root = resolve_model(model_uri, uri).path.parents[1]  # the pyfunc folder: <root>/artifacts/model
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith(".py") or f.startswith("code/")], files
    import yaml

    flavor = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]
    assert "code" not in flavor or not flavor["code"]
    pickled = (root / flavor["python_model"]).read_bytes()
    # By reference: the class is named, its code is not carried (cloudpickle's by-value helpers absent).
    assert b"samtone_ray.tracking.pyfunc" in pickled and b"DualEncoderPyfunc" in pickled
    assert b"cloudpickle" not in pickled and len(pickled) < 1000
    assert f"samtone-ray=={__version__}" in (root / "requirements.txt").read_text().split()


def test_logged_model_loads_and_predicts_like_the_saved_directory(logged):
    import mlflow

    uri, _, model_uri, model_dir = logged
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model(model_uri)
    want = DualEncoder.from_pretrained(model_dir)
    np.testing.assert_allclose(loaded.predict(TEXTS), want.encode_documents(TEXTS).numpy(), atol=1e-6)
    np.testing.assert_allclose(
        loaded.predict(TEXTS, params={"tower": "query"}), want.encode_queries(TEXTS).numpy(), atol=1e-6
    )


@pytest.mark.parametrize(
    "form,version", [("runs:/{run_id}/model", None), ("models:/m/1", "1"), ("models:/m@champion", "2")]
)
def test_model_uris_resolve_to_the_logged_weights(logged, form, version):
    uri, run_id, _, model_dir = logged
    resolved = resolve_model(form.format(run_id=run_id), uri)
    assert resolved.fingerprint == fingerprint(model_dir) and len(resolved.fingerprint) == 16
    assert resolved.run_id == run_id and resolved.version == version
    assert resolved.name == ("m" if version else None)
    texts = TEXTS[:2]
    np.testing.assert_array_equal(
        DualEncoder.from_pretrained(resolved.path).encode_documents(texts).numpy(),
        DualEncoder.from_pretrained(model_dir).encode_documents(texts).numpy(),
    )


@pytest.mark.parametrize(
    "bad,match",
    [("models:/m@nosuch", "no alias @nosuch"), ("models:/m/9", "no version 9"), ("models:/m/x", "VERSION a number"),
     ("runs:/0123abc/model", "no run"), ("runs:/", "RUN_ID")],
)
def test_model_uri_errors_name_the_part(logged, bad, match):
    uri = logged[0]
    with pytest.raises(ModelURIError, match=match):
        resolve_model(bad, uri)


def test_a_failing_tracking_store_is_retried_then_warned_never_raised(logged, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(tracking, "LOG_RETRY_PAUSE_S", 0.01)
    uri, _, _, model_dir = logged
    ghost = tracking.RunLogger(uri, "0" * 32)  # no such run: every call fails in the store
    with caplog.at_level(logging.WARNING, logger="samtone_ray.tracking.runs"):
        ghost.log_metrics({"loss": 1.0}, 1)
        ghost.set_tags({"k": "v"})
        ghost.log_artifact(Path(model_dir) / "modules.json")
        assert ghost.log_model(model_dir) is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "samtone_ray.tracking.runs"]
    assert len(warnings) == 4 and all(f"after {tracking.LOG_ATTEMPTS} attempts" in w for w in warnings), warnings



def test_an_mlmodel_pointing_outside_its_artifact_is_refused(logged, tmp_path):
    uri = logged[0]
    crafted = tmp_path / "model"
    (crafted / "artifacts" / "model").mkdir(parents=True)  # a real model folder exists; the path decides
    (crafted / "MLmodel").write_text(
        "flavors:\n  python_function:\n    artifacts:\n      model:\n        path: ../../../../../../../../etc\n"
    )
    run_id = tracking.start_run(uri, "exp", "crafted", {})
    tracking.RunLogger(uri, run_id).log_artifact(crafted)
    with pytest.raises(ModelURIError, match=r"artifacts.model.path: path '\.\./.*/etc' leads outside .*refused"):
        resolve_model(f"runs:/{run_id}/model", uri)


def test_uris_in_params_tags_and_warnings_lose_their_password(logged, monkeypatch, caplog):
    from mlflow import MlflowClient

    from samtone_ray.core.runtime import free_loopback_port

    uri = logged[0]
    run_id = tracking.start_run(uri, "exp", "secret", {"data.train": "https://u:s3cret@data.example/beir"},
                                tags={"source": "http://u:s3cret@host/x"})
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.params["data.train"] == "https://u:***@data.example/beir"
    assert run.data.tags["source"] == "http://u:***@host/x"
    # A tracking server behind basic auth that does not answer: the warning names it, masked.
    monkeypatch.setattr(tracking, "LOG_RETRY_PAUSE_S", 0.01)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    unreachable = tracking.RunLogger(f"http://u:s3cret@127.0.0.1:{free_loopback_port()}", run_id)
    with caplog.at_level(logging.WARNING, logger="samtone_ray.tracking.runs"):
        unreachable.log_metrics({"loss": 1.0}, 1)
    assert caplog.records and "s3cret" not in caplog.text and "http://u:***@127.0.0.1:" in caplog.text
