"""A study grows across sessions: ended trials land in a committed folder, one per configuration
and seed, and the progress table covers every session's trials."""

from __future__ import annotations

import json

from samtone_ray.evaluation.per_query import write_per_query
from samtone_ray.tune.study import export_trials, read_summaries, trial_name


def _row(tmp_path, trial, same_tower, seed, pairs, status="finished", value=0.5):
    per_query = tmp_path / "runs" / trial / "per_query.parquet"
    write_per_query(per_query, {"q1": {"mrr@10": value}, "q2": {"mrr@10": value}}, step=pairs // 8, pairs=pairs)
    flat = {"loss.same_tower": same_tower, "train.seed": seed, "train.batch_size": 8}
    return {"trial": trial, "flat": flat, "settings": {}, "metrics": {"mrr@10": value}, "steps": pairs // 8, "pairs": pairs,
            "status": status, "per_query_file": per_query, "budgets": {pairs: {}}}


def test_sessions_add_trials_and_keep_the_one_that_trained_furthest(tmp_path):
    results = tmp_path / "results" / "study"
    varied = ["loss.same_tower", "train.seed"]
    first = [_row(tmp_path, "a0", "none", 1, 64), _row(tmp_path, "a1", "query", 1, 32, status="stopped", value=0.2),
             _row(tmp_path, "a2", "both", 1, 8, status="error")]
    assert len(export_trials(first, results, "mrr@10", varied)) == 2  # the errored trial is not a result
    # A later session: seed 2 of both arms, and "query" seed 1 again, trained to the end this time.
    second = [_row(tmp_path, "b0", "none", 2, 64), _row(tmp_path, "b1", "query", 1, 64, value=0.6),
              _row(tmp_path, "b2", "query", 2, 64)]
    export_trials(second, results, "mrr@10", varied)
    summaries = {s["folder"]: s for s in read_summaries(results)}
    assert len(summaries) == 4
    assert summaries[trial_name(second[1])]["trial"] == "b1" and summaries[trial_name(second[1])]["pairs"] == 64
    # An older, shorter run of an arm never replaces a longer one.
    export_trials([_row(tmp_path, "c1", "query", 1, 16, status="stopped")], results, "mrr@10", varied)
    assert json.loads((results / trial_name(second[1]) / "summary.json").read_text())["trial"] == "b1"
    assert (results / trial_name(second[1]) / "per_query.parquet").exists()
    progress = (results / "progress.md").read_text()
    assert "# study progress (4 trials)" in progress
    query_line = next(line for line in progress.splitlines() if "loss.same_tower=query" in line)
    assert query_line.startswith("| loss.same_tower=query | 2 | 0.6000 (seed 1, 64 pairs), 0.5000 (seed 2, 64 pairs) |")
