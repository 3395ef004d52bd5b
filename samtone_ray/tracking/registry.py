"""The model registry: every tuning run's best model becomes a version; the alias moves only on a win.

Like with like: the candidate and the incumbent champion are both re-evaluated here, from their
logged artifacts (the files a version points to), on the *current* eval data, with the same code
path, device and precision (the candidate's in-training number is never compared with a number
measured another way).

Fail closed: only "no such model/alias yet" counts as having no incumbent. Any other registry or
database error aborts the promotion with ``PromotionError`` and leaves the alias where it was.
"""

from __future__ import annotations

import logging
from typing import Any

from samtone_ray.core.config import Config
from samtone_ray.tracking.model_uri import RUN_MODEL_PATH, run_model_uri, version_uri

log = logging.getLogger(__name__)


class PromotionError(RuntimeError):
    """The champion decision could not be made safely; the alias was not touched."""


def beats(candidate: float, incumbent: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Better by more than ``min_delta`` (a tie keeps the incumbent: a new alias must be earned)."""
    if incumbent is None:
        return True
    return candidate > incumbent + min_delta if mode == "max" else candidate < incumbent - min_delta


def evaluate_registered(
    uri: str, model_uri: str, eval_split, batch_size: int = 128, precision: str = "fp32", *, per_query: bool = False
):
    """Evaluate a registered model's DualEncoder with exact search, from its files (nothing unpickled);
    ``per_query`` as in ``evaluate_model``."""
    from samtone_ray.evaluation.retrieval import evaluate_model
    from samtone_ray.tracking.model_uri import resolve_model
    from samtone_ray.model.towers import DualEncoder

    model = DualEncoder.from_pretrained(resolve_model(model_uri, uri).path)
    return evaluate_model(model, eval_split, batch_size, precision, per_query=per_query)


def champion_version(client, name: str, alias: str) -> tuple[bool, str | None]:
    """(does the registered model exist, the version holding ``alias`` or None).

    Raises PromotionError for any failure other than the model not existing yet.
    """
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False, None
        raise PromotionError(f"cannot read registered model {name!r} ({exc.error_code}: {exc}); @{alias} left as it was") from exc
    except Exception as exc:  # a broken or locked database surfaces as SQLAlchemy/OS errors
        raise PromotionError(f"cannot read registered model {name!r} ({type(exc).__name__}: {exc}); @{alias} left as it was") from exc
    version = (model.aliases or {}).get(alias)
    return True, str(version) if version is not None else None


def promote_best(cfg: Config, uri: str, best: dict[str, Any], eval_split) -> dict[str, Any]:
    """Register ``best`` (a leaderboard row) as a new version; move the alias if it wins.

    Returns the decision: version, candidate and incumbent metric values (both re-evaluated here),
    the paired test of candidate minus incumbent on the same queries, promoted or not. Raises
    PromotionError, with the alias untouched, when it cannot decide.
    """
    from samtone_ray.tracking import runs as tracking
    from samtone_ray.evaluation.statistics import align, paired_test

    name, alias, metric = cfg.registry.model_name, cfg.registry.alias, cfg.tune.metric
    c = tracking.client(uri)
    exists, incumbent_version = champion_version(c, name, alias)
    held = f"@{alias} stays on v{incumbent_version}" if incumbent_version else f"@{alias} stays unset"

    def score(model_uri: str) -> tuple[float, dict[str, float]]:
        means, rows = evaluate_registered(uri, model_uri, eval_split, cfg.train.eval_batch_size,
                                          cfg.train.precision, per_query=True)
        return means[metric], {q: values[metric] for q, values in rows.items()}

    try:
        run = c.get_run(best["run_id"])
        # Scored from the run's files before anything is registered: a model that did not upload
        # whole (the tracking server or its database down mid-upload) becomes no version at all.
        candidate, candidate_rows = score(run_model_uri(best["run_id"]))
        if not exists:
            c.create_registered_model(name, description="Dual-encoder retrievers trained by samtone-ray")
        version = c.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/{RUN_MODEL_PATH}",
            run_id=best["run_id"],
            tags={
                "metric": metric,
                "eval_data": f"{cfg.data.eval}:{cfg.data.eval_split}",
                # The candidate and the incumbent are scored below on exactly these documents.
                **{k: str(v) for k, v in eval_split.corpus_params().items()},
                "trial": best["trial"],
                **{f"setting.{k}": str(v) for k, v in best["settings"].items()},
            },
        )

        c.set_model_version_tag(name, version.version, tracking.metric_key(metric), f"{candidate:.6f}")
        incumbent, incumbent_rows = score(version_uri(name, incumbent_version)) if incumbent_version else (None, None)
        paired = paired_test(*align(candidate_rows, incumbent_rows)) if incumbent_version else None
    except Exception as exc:
        raise PromotionError(f"champion decision aborted ({type(exc).__name__}: {exc}); {held}") from exc
    margin = cfg.registry.min_delta
    promoted = beats(candidate, incumbent, cfg.tune.mode, margin)
    by = f" by more than {margin:g}" if margin else ""
    if paired is not None and cfg.registry.require_significance:
        # registry.require_significance: the paired 95% interval must lie on the better side of 0.
        promoted = promoted and (paired.low > 0 if cfg.tune.mode == "max" else paired.high < 0)
        by += " with a paired 95% CI excluding 0"
    if paired is not None:
        print(f"candidate - incumbent {metric}: {paired.diff:+.4f} [{paired.low:+.4f}, {paired.high:+.4f}] "
              f"over {paired.queries} queries, p={paired.p_value:.3g}")
    if promoted:
        c.set_registered_model_alias(name, alias, version.version)
        print(
            f"registered {name} v{version.version} ({metric}={candidate:.4f}) as @{alias}"
            + (f", replacing v{incumbent_version} ({metric}={incumbent:.4f} on the same data)" if incumbent_version else "")
        )
    else:
        print(
            f"registered {name} v{version.version} ({metric}={candidate:.4f}); {held}, which scores "
            f"{metric}={incumbent:.4f} on the same data (the candidate must beat it{by})"
        )
    return {
        "version": int(version.version),
        "promoted": promoted,
        "candidate_metric": candidate,
        "incumbent_metric": incumbent,
        "incumbent_version": int(incumbent_version) if incumbent_version else None,
    } | ({"paired_diff": paired.diff, "paired_low": paired.low, "paired_high": paired.high, "p_value": paired.p_value}
         if paired else {})
