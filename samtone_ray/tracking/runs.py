"""MLflow at the edge: runs, per-step metrics, the logged model and the model registry.

MLflow is imported lazily so that ``tracking.enabled=false`` never touches it. The default store
is SQLite under ``./.samtone`` (MLflow 3 refuses the plain file store), with artifacts beside it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from samtone_ray import __version__
from samtone_ray.core.redact import redact_uri
from samtone_ray.tracking.model_uri import RUN_MODEL_PATH, run_model_uri

log = logging.getLogger(__name__)

DEFAULT_DIR = Path(".samtone")
# The logged model imports samtone_ray from the installed package: pin the version that wrote it.
PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", f"samtone-ray=={__version__}"]
# Rank 0's logging calls: attempts and the first pause (doubled after each failure).
LOG_ATTEMPTS = 3
LOG_RETRY_PAUSE_S = 0.5

T = TypeVar("T")
SUBMISSION_ID_ENV = "SAMTONE_SUBMISSION_ID"


def tracking_uri(configured: str = "") -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/.samtone/mlflow.db``."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    DEFAULT_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(DEFAULT_DIR / 'mlflow.db').resolve()}"


def metric_key(name: str) -> str:
    """MLflow names may not contain '@': ``mrr@10`` -> ``mrr_at_10``."""
    return name.replace("@", "_at_")


def client(uri: str):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    # The registry is the tracking store's (SQLite, a database, an http:// server). Left unset, it
    # would be what an earlier call set ($MLFLOW_REGISTRY_URI, inherited by Ray's workers too),
    # e.g. another store's SQLite file: a champion registered in the wrong store.
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    found = c.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # Keep artifacts next to the SQLite file rather than in ./mlruns of whatever cwd.
        location = (Path(uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
    return c.create_experiment(name, artifact_location=location)


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Create a run, log ``params`` under their dotted keys, return its id."""
    from mlflow.entities import Param

    c = client(uri)
    all_tags = dict(tags or {})
    if os.environ.get(SUBMISSION_ID_ENV):  # set by `samtone submit` for the job's runs
        all_tags["samtone.submission_id"] = os.environ[SUBMISSION_ID_ENV]
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags = {k: redact_uri(str(v)) for k, v in all_tags.items()}
    run = c.create_run(experiment_id(uri, experiment), run_name=run_name, tags=all_tags)
    # A param or tag is stored and shown in the UI: a URI in it (data.train, the model's) loses its password.
    items = [Param(k, redact_uri(str(v))) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        c.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


class RunLogger:
    """Logs metrics, tags, artifacts and the model to one existing run; used by rank 0 inside
    the training loop. Each call is retried (``LOG_ATTEMPTS``, pauses from ``LOG_RETRY_PAUSE_S``)
    and then given up with a warning: a tracking server hiccup never kills training."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self._client = client(uri)

    def _retry(self, what: str, call: Callable[[], T]) -> T | None:
        pause = LOG_RETRY_PAUSE_S
        for attempt in range(1, LOG_ATTEMPTS + 1):
            try:
                return call()
            except Exception as exc:  # MLflow, HTTP and database errors alike
                if attempt == LOG_ATTEMPTS:
                    log.warning(
                        "MLflow: could not %s for run %s at %s after %d attempts (training goes on): %s",
                        what, self.run_id, redact_uri(self.uri), attempt, redact_uri(str(exc)),
                    )
                    return None
                time.sleep(pause)
                pause *= 2
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(metric_key(k), float(v), now, step) for k, v in metrics.items()]
        self._retry(f"log metrics at step {step}", lambda: self._client.log_batch(self.run_id, metrics=batch))

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, redact_uri(str(v))) for k, v in tags.items()]
        self._retry("set tags", lambda: self._client.log_batch(self.run_id, tags=batch))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._retry(f"log {path}", lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def log_model(self, model_dir: str | Path) -> str | None:
        """Log a saved DualEncoder as a pyfunc model under the run's ``model/``; returns its URI
        (None when logging failed after the retries).

        The pyfunc is an instance of ``samtone_ray.tracking.pyfunc.DualEncoderPyfunc``, pickled by
        reference: no source file of ours is stored, so loading runs the installed package's code.
        Saved locally then uploaded as artifacts, so logging never opens or closes the run
        (its owner decides the final status).
        """
        import tempfile

        import mlflow

        from samtone_ray.tracking.pyfunc import DualEncoderPyfunc

        def save_and_upload() -> str:
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / "model"
                mlflow.pyfunc.save_model(
                    path=str(local),
                    python_model=DualEncoderPyfunc(),
                    artifacts={"model": str(model_dir)},
                    pip_requirements=PIP_REQUIREMENTS,
                )
                self._client.log_artifacts(self.run_id, str(local), RUN_MODEL_PATH)
            return run_model_uri(self.run_id)

        return self._retry("log the model", save_and_upload)

    def finish(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)


def model_versions(uri: str, name: str) -> list[dict[str, Any]]:
    """Versions of a registered model with their aliases and logged metric tags, newest first."""
    c = client(uri)
    registered = c.get_registered_model(name)
    aliases: dict[str, list[str]] = {}
    for alias, version in (registered.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in c.search_model_versions(f"name='{name}'"):
        rows.append(
            {
                "version": int(mv.version),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "run_id": mv.run_id,
                "created": mv.creation_timestamp,
                "tags": dict(mv.tags or {}),
            }
        )
    return sorted(rows, key=lambda r: -r["version"])


def registered_model_names(uri: str) -> list[str]:
    return sorted(m.name for m in client(uri).search_registered_models())
