"""The model registry: every search's best model becomes a version; the alias moves only on a win.

The incumbent champion is re-evaluated on the *current* eval data with the same metric, so the
comparison is like for like even when the champion was crowned on other data.
"""

from __future__ import annotations

import logging
from typing import Any

from samtone_ray.config import Config

log = logging.getLogger(__name__)


def beats(candidate: float, incumbent: float | None, mode: str) -> bool:
    """Strictly better (a tie keeps the incumbent: a new alias must be earned)."""
    if incumbent is None:
        return True
    return candidate > incumbent if mode == "max" else candidate < incumbent


def evaluate_registered(
    uri: str, model_uri: str, eval_split, batch_size: int = 128, precision: str = "fp32"
) -> dict[str, float]:
    """Load a registered pyfunc model's DualEncoder and evaluate it with exact search."""
    import mlflow

    from samtone_ray.evaluation import evaluate_model as evaluate

    mlflow.set_tracking_uri(uri)
    encoder = mlflow.pyfunc.load_model(model_uri).unwrap_python_model().encoder
    return evaluate(encoder, eval_split, batch_size, precision)


def promote_best(cfg: Config, uri: str, best: dict[str, Any], eval_split) -> dict[str, Any]:
    """Register ``best`` (a leaderboard row) as a new version; move the alias if it wins.

    Returns the decision: version, candidate and incumbent metric values, promoted or not.
    """
    from samtone_ray import tracking

    name, alias, metric = cfg.registry.model_name, cfg.registry.alias, cfg.search.metric
    c = tracking.client(uri)
    if not c.search_registered_models(filter_string=f"name='{name}'"):
        c.create_registered_model(name, description="Dual-encoder retrievers trained by samtone-ray")
    run = c.get_run(best["run_id"])
    candidate = float(best["metrics"][metric])
    incumbent_version = incumbent = None
    try:
        current = c.get_model_version_by_alias(name, alias)
        incumbent_version = int(current.version)
    except Exception:  # MLflow raises RestException/MlflowException when the alias is unset
        current = None
    if current is not None:
        incumbent = evaluate_registered(
            uri, f"models:/{name}/{current.version}", eval_split, cfg.train.eval_batch_size, cfg.train.precision
        )[metric]
    version = c.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/model",
        run_id=best["run_id"],
        tags={
            "metric": metric,
            tracking.metric_key(metric): f"{candidate:.6f}",
            "eval_data": f"{cfg.data.eval}:{cfg.data.eval_split}",
            "trial": best["trial"],
            **{f"setting.{k}": str(v) for k, v in best["settings"].items()},
        },
    )
    promoted = beats(candidate, incumbent, cfg.search.mode)
    if promoted:
        c.set_registered_model_alias(name, alias, version.version)
        print(
            f"registered {name} v{version.version} ({metric}={candidate:.4f}) as @{alias}"
            + (f", replacing v{incumbent_version} ({metric}={incumbent:.4f} on the same data)" if current else "")
        )
    else:
        print(
            f"registered {name} v{version.version} ({metric}={candidate:.4f}); @{alias} stays on "
            f"v{incumbent_version}, which scores {metric}={incumbent:.4f} on the same data"
        )
    return {
        "version": int(version.version),
        "promoted": promoted,
        "candidate_metric": candidate,
        "incumbent_metric": incumbent,
        "incumbent_version": incumbent_version,
    }
