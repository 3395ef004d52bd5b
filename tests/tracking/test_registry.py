"""The champion rule on a real SQLite MLflow registry (no Ray): like with like, margins, fail closed."""

from __future__ import annotations

import sqlite3

import pytest

from samtone_ray.core.config import from_dict
from samtone_ray.evaluation.retrieval import evaluate_model
from samtone_ray.tracking.registry import PromotionError, promote_best
from samtone_ray.model.towers import DualEncoder

pytestmark = pytest.mark.mlflow


@pytest.fixture
def registry(tmp_path):
    from samtone_ray.tracking import runs as tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def logged(model_dir, claimed: float) -> dict:
        run_id = tracking.start_run(uri, "tests", model_dir.name, {})
        tracking.RunLogger(uri, run_id).log_model(model_dir)
        return {"run_id": run_id, "trial": model_dir.name, "settings": {}, "metrics": {"mrr@10": claimed}}

    return uri, logged, tmp_path


def _cfg(**registry):
    return from_dict({"registry": {"model_name": "m", **registry}, "train": {"precision": "fp32", "eval_batch_size": 16}})


def _alias(uri):
    from mlflow import MlflowClient

    c = MlflowClient(uri, registry_uri=uri)
    return str(c.get_registered_model("m").aliases.get("champion")), len(c.search_model_versions("name='m'"))


def test_no_model_and_no_alias_yet_mean_no_incumbent(registry, models, split):
    from mlflow import MlflowClient

    uri, logged, _ = registry
    (worse, _), (better, _) = models
    first = promote_best(_cfg(), uri, logged(worse, 0.5), split)
    assert first["promoted"] and first["incumbent_version"] is None
    MlflowClient(uri, registry_uri=uri).delete_registered_model_alias("m", "champion")
    second = promote_best(_cfg(), uri, logged(better, 0.5), split)  # the model exists, the alias not
    assert second["promoted"] and second["incumbent_version"] is None
    assert _alias(uri) == (str(second["version"]), 2)


def test_the_candidates_reevaluated_metric_is_what_is_compared(registry, models, split):
    uri, logged, _ = registry
    (worse, worse_score), _ = models
    first = promote_best(_cfg(), uri, logged(worse, 0.1), split)
    # The same weights claiming a far better in-training score: re-evaluated, it only ties.
    again = promote_best(_cfg(), uri, logged(worse, 0.99), split)
    assert again["candidate_metric"] == pytest.approx(worse_score)
    assert again["incumbent_metric"] == pytest.approx(worse_score)
    assert not again["promoted"] and _alias(uri)[0] == str(first["version"])
    assert first["candidate_metric"] == pytest.approx(worse_score)  # not the claimed 0.1 either


def test_min_delta_is_the_margin_a_candidate_must_exceed(registry, models, split):
    uri, logged, _ = registry
    (worse, worse_score), (better, better_score) = models
    gap = better_score - worse_score
    incumbent = promote_best(_cfg(), uri, logged(worse, 0.0), split)["version"]
    kept = promote_best(_cfg(min_delta=gap + 1e-3), uri, logged(better, 0.0), split)
    assert not kept["promoted"] and _alias(uri)[0] == str(incumbent)
    assert kept["candidate_metric"] - kept["incumbent_metric"] == pytest.approx(gap)
    moved = promote_best(_cfg(min_delta=gap / 2), uri, logged(better, 0.0), split)
    assert moved["promoted"] and _alias(uri)[0] == str(moved["version"])


def test_a_registry_error_other_than_not_found_keeps_the_alias(registry, models, split, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, logged, _ = registry
    (worse, _), (better, _) = models
    incumbent = promote_best(_cfg(), uri, logged(worse, 0.0), split)["version"]
    candidate = logged(better, 1.0)

    def unavailable(*args, **kwargs):
        raise MlflowException("database is locked", error_code="INTERNAL_ERROR")

    with monkeypatch.context() as m:  # fault injection: the registry read fails for another reason
        m.setattr(MlflowClient, "get_registered_model", unavailable)
        m.setattr(MlflowClient, "get_model_version_by_alias", unavailable)
        with pytest.raises(PromotionError, match="INTERNAL_ERROR: database is locked.*@champion left as it was"):
            promote_best(_cfg(), uri, candidate, split)
    assert _alias(uri) == (str(incumbent), 1)  # nothing registered, nothing moved


def test_a_broken_registry_database_keeps_the_alias(registry, models, split):
    uri, logged, tmp_path = registry
    (worse, _), (better, _) = models
    incumbent = promote_best(_cfg(), uri, logged(worse, 0.0), split)["version"]
    candidate = logged(better, 1.0)
    db = sqlite3.connect(tmp_path / "mlflow.db")
    db.execute("ALTER TABLE registered_model_aliases RENAME TO aliases_elsewhere")  # a damaged store
    db.commit()
    with pytest.raises(PromotionError, match="left as it was"):
        promote_best(_cfg(), uri, candidate, split)
    db.execute("ALTER TABLE aliases_elsewhere RENAME TO registered_model_aliases")
    db.commit()
    db.close()
    assert _alias(uri) == (str(incumbent), 1)


def test_min_delta_must_be_a_non_negative_number():
    from samtone_ray.core.config import ConfigError

    for bad in (-0.01, float("nan")):
        with pytest.raises(ConfigError, match="registry.min_delta"):
            _cfg(min_delta=bad)


def test_require_significance_promotes_only_on_a_paired_ci_above_zero(registry, models, split):
    import numpy as np
    from scipy import stats

    uri, logged, _ = registry
    (worse, worse_score), (better, better_score) = models
    incumbent = promote_best(_cfg(), uri, logged(worse, 0.0), split)["version"]
    decision = promote_best(_cfg(require_significance=True), uri, logged(better, 0.0), split)
    # Oracle: per-query values of the two saved directories, differences bootstrapped by scipy.
    rows = [evaluate_model(DualEncoder.from_pretrained(p), split, 16, "fp32", per_query=True)[1] for p in (better, worse)]
    d = np.array([rows[0][q]["mrr@10"] - rows[1][q]["mrr@10"] for q in sorted(rows[0])])
    ci = stats.bootstrap((d,), np.mean, method="percentile", n_resamples=10000, random_state=0).confidence_interval
    assert decision["paired_diff"] == pytest.approx(d.mean()) == pytest.approx(better_score - worse_score)
    assert decision["paired_low"] == pytest.approx(ci.low, abs=0.01)
    assert decision["promoted"] == (decision["paired_low"] > 0)
    if abs(ci.low) > 0.01:  # away from the boundary the oracle decides too
        assert decision["promoted"] == (ci.low > 0)
    if not decision["promoted"]:  # beats() alone would have moved it: the CI held it back
        assert _alias(uri)[0] == str(incumbent)
        assert promote_best(_cfg(), uri, logged(better, 0.0), split)["promoted"]
