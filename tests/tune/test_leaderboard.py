"""The leaderboard reports each trial with the config it trained with: the one the trial wrote as
it started, not one the leaderboard resolves again from Tune's parameters and today's base."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from samtone_ray.core.config import load_config
from samtone_ray.core.files import atomic_write_json
from samtone_ray.tune.layout import TuneLayout
from samtone_ray.tune.leaderboard import build_leaderboard
from samtone_ray.tune.space import GRID_KEY, parse_space


def _result(trial_id: str, params: dict, metrics: dict, tmp_path: Path) -> SimpleNamespace:
    """What the leaderboard reads of a Ray Tune ``Result``: its metrics, parameters, error and folder."""
    return SimpleNamespace(metrics={"trial_id": trial_id, **metrics}, config=params, error=None, path=str(tmp_path / trial_id))


def test_rows_show_the_config_each_trial_wrote(tmp_path):
    base = load_config(None, [f"output_dir={tmp_path}", "loss.temperature=0.05"])
    space = parse_space({"loss.same_tower": {"grid": ["none", "query"]}}, base)
    layout = TuneLayout(Path(base.output_dir).resolve())
    # The trial trained at temperature 0.07 (its base was edited since): the board must say 0.07.
    trained = base.with_overrides({"loss.same_tower": "query", "loss.temperature": 0.07})
    atomic_write_json(layout.trial("t1").config, trained.to_dict())
    (layout.trial("t1").model).mkdir(parents=True)
    params = {GRID_KEY: {"loss.same_tower": "query"}}
    rows = build_leaderboard([_result("t1", params, {"mrr@10": 0.5, "step": 4}, tmp_path)], base, space)
    assert rows[0]["status"] == "finished"
    assert rows[0]["flat"]["loss.temperature"] == 0.07
    assert rows[0]["settings"]["same_tower"] == "query"


def test_a_trial_without_a_config_file_lists_its_parameters(tmp_path):
    base = load_config(None, [f"output_dir={tmp_path}"])
    space = parse_space({"loss.same_tower": {"grid": ["none", "query"]}}, base)
    skipped = _result("t2", {GRID_KEY: {"loss.same_tower": "doc"}}, {"mrr@10": float("-inf"), "skipped": "bad combination"}, tmp_path)
    rows = build_leaderboard([skipped], base, space)
    assert rows[0]["status"] == "skipped" and rows[0]["reason"] == "bad combination"
    assert rows[0]["flat"] == {"loss.same_tower": "doc"}


# ----------------------------------------------------------------- seeds (tune.seeds)

def _seeded_row(trial: str, same_tower: str, seed: int, metric: float, budgets: dict, status: str = "finished") -> dict:
    flat = {"loss.same_tower": same_tower, "train.seed": seed, "train.batch_size": 8}
    return {"trial": trial, "settings": {"same_tower": same_tower, "batch_size": 8, "train.seed": seed}, "flat": flat,
            "metrics": {"mrr@10": metric}, "steps": 4, "pairs": max(budgets), "status": status, "seconds": 1.0,
            "budgets": budgets}


def test_seeds_expand_every_grid_configuration_and_are_checked_once(tmp_path):
    import pytest

    from samtone_ray.core.config import ConfigError

    base = load_config(None, [f"output_dir={tmp_path}", "tune.seeds=3", "train.seed=7"])
    space = parse_space({"loss.same_tower": {"grid": ["none", "query"]}}, base)
    assert sorted((c["loss.same_tower"], c["train.seed"]) for c in space.grid) == [
        (t, s) for t in ("none", "query") for s in (7, 8, 9)
    ]
    with pytest.raises(ConfigError, match="tune.seeds"):
        load_config(None, ["tune.seeds=0"])
    with pytest.raises(ConfigError, match="needs tune.algorithm: grid"):
        load_config(None, ["tune.seeds=2", "tune.algorithm=random"])
    with pytest.raises(ConfigError, match="use one"):
        load_config(None, ["tune.seeds=2", "tune.space={train.seed: {grid: [1, 2]}}"])


def test_configurations_pool_their_seeds_against_the_references_at_equal_budget():
    import numpy as np
    import pytest
    from scipy import stats

    from samtone_ray.tune.leaderboard import add_statistics, format_configurations, group_seeds
    from samtone_ray.tune.tuner import _best

    rng = np.random.default_rng(0)
    qids = [f"q{i}" for i in range(120)]

    def values(shift: float) -> dict[str, float]:
        return dict(zip(qids, np.clip(rng.uniform(0, 1, len(qids)) + shift, 0, 1)))

    ref = [_seeded_row(f"r{s}", "none", s, 0.40, {32: values(0.0)}, status="stopped") for s in range(3)]
    # Seed 0 of "query" ran on to 64 pairs and got much better there: pooled at 32, where its reference stopped.
    query = [_seeded_row(f"q{s}", "query", s, 0.45, {32: values(0.05)}) for s in range(3)]
    query[0]["budgets"][64] = values(0.5)
    query[0]["metrics"]["mrr@10"] = 0.9
    both = [_seeded_row(f"b{s}", "both", s, m, {32: values(-0.2)}) for s, m in enumerate((0.2, 0.3, 0.95))]
    rows = query + both + ref
    add_statistics(rows, {r["trial"]: r["budgets"] for r in rows}, "mrr@10", "max")
    groups = {g["settings"]["same_tower"]: g for g in group_seeds(rows, "mrr@10", "max")}

    assert groups["none"]["verdict"] == "reference" and groups["none"]["seeds"] == 3
    g = groups["query"]
    assert g["mean"] == np.mean([0.9, 0.45, 0.45]) and g["spread"] == np.std([0.9, 0.45, 0.45], ddof=1)
    assert g["pairs"] == [32, 32, 32]
    d = np.mean([[q["budgets"][32][k] - r["budgets"][32][k] for k in qids] for q, r in zip(query, ref)], axis=0)
    assert g["vs_reference"].diff == pytest.approx(np.mean(d), abs=1e-12)
    ci = stats.bootstrap((d,), np.mean, method="percentile", n_resamples=5000, random_state=0).confidence_interval
    assert g["verdict"] == ("beats ref" if ci.low > 0 else "worse than ref" if ci.high < 0 else "no sig. diff")
    assert groups["both"]["verdict"] == "worse than ref"
    # The champion comes from the best mean: "query", though a "both" seed has the best single score.
    ordered = group_seeds(rows, "mrr@10", "max")
    assert [x["settings"]["same_tower"] for x in ordered] == ["query", "both", "none"]
    cfg = load_config(None, ["tune.seeds=3"])
    assert _best(rows, cfg, ordered)["trial"] == "q0"
    assert _best(rows, cfg)["trial"] == "b2"
    table = format_configurations(ordered, "mrr@10").splitlines()
    assert table[2].startswith("same_tower=query, batch_size=8 ") and "seed" not in table[2].split("  ")[0]
