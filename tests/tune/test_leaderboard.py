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
