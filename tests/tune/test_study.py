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


def _trial(tmp_path, trial, flat, evaluations, status="finished"):
    """A trial with per-query values ``{pairs: {query_id: value}}``, every evaluation kept."""
    per_query = tmp_path / "runs" / trial / "per_query.parquet"
    for pairs, values in sorted(evaluations.items()):
        write_per_query(per_query, {q: {"mrr@10": v} for q, v in values.items()}, step=pairs // 8, pairs=pairs)
    last = evaluations[max(evaluations)]
    mean = sum(last.values()) / len(last)
    return {"trial": trial, "flat": flat | {"train.batch_size": 8}, "settings": {}, "metrics": {"mrr@10": mean},
            "steps": max(evaluations) // 8, "pairs": max(evaluations), "status": status,
            "per_query_file": per_query, "budgets": {}}


def test_the_study_table_pairs_seeds_at_equal_budget_across_tuning_runs(tmp_path):
    """Arms from two tuning runs in one folder; each is tested against in-batch by the mean over
    seed pairs of per-query differences, each seed pair at the largest budget both reached. The
    oracle is that arithmetic done by hand; a verdict needs the interval to exclude 0."""
    import numpy as np

    from samtone_ray.evaluation.per_query import read_budgets
    from samtone_ray.tune.study import study_groups

    results = tmp_path / "study"
    rng = np.random.default_rng(0)
    queries = [f"q{i}" for i in range(200)]
    base = {q: float(v) for q, v in zip(queries, rng.uniform(0.2, 0.8, len(queries)))}

    def shifted(by, noise=0.0):
        return {q: v + by + float(rng.normal(0, noise)) for q, v in base.items()}

    none = [_trial(tmp_path, f"n{s}", {"loss.same_tower": "none", "train.seed": s}, {32: shifted(0), 64: shifted(0.01 * s)})
            for s in (1, 2)]
    # Seed 2 of "both" was stopped at 32 pairs: it must be paired with in-batch seed 2 at 32, not 64.
    both = [_trial(tmp_path, "b1", {"loss.same_tower": "both", "train.seed": 1}, {32: shifted(-0.2), 64: shifted(-0.05, 0.01)}),
            _trial(tmp_path, "b2", {"loss.same_tower": "both", "train.seed": 2}, {32: shifted(-0.03, 0.01)}, status="stopped")]
    # Another tuning run, later: query-side terms with a weight, no better than in-batch.
    # Per-query differences of +-0.05 that cancel out: a mean difference of 0, an interval around it.
    alternating = {q: 0.05 if i % 2 else -0.05 for i, q in enumerate(queries)}
    query = [_trial(tmp_path, f"w{s}", {"loss.same_tower": "query", "loss.same_tower_weight": 0.5, "train.seed": s},
                    {64: {q: v + alternating[q] for q, v in shifted(0.01 * s).items()}}) for s in (1, 2)]
    varied = ["loss.same_tower", "train.seed"]
    export_trials([*none, *both], results, "mrr@10", varied)
    export_trials(query, results, "mrr@10", varied + ["loss.same_tower_weight"])

    groups = {g["settings"]["loss.same_tower"]: g for g in study_groups(results, "mrr@10")}
    assert groups["none"]["verdict"] == "reference" and groups["none"]["seeds"] == 2

    def pooled(trials, refs):  # mean over queries of (mean over seed pairs of mine - reference)
        diffs = []
        for mine, ref in zip(trials, refs):
            budget = max(set(mine) & set(ref))
            diffs.append([mine[budget][q] - ref[budget][q] for q in queries])
        return float(np.mean(np.mean(diffs, axis=0)))

    none_evals = [{32: shifted(0), 64: shifted(0.01 * s)} for s in (1, 2)]
    b = groups["both"]
    assert b["pairs"] == [64, 32]
    both_evals = [read_budgets(t["per_query_file"], "mrr@10") for t in both]
    assert abs(b["vs_reference"].diff - pooled(both_evals, none_evals)) < 1e-9
    assert b["verdict"] == "worse than ref" and b["vs_reference"].high < 0
    q = groups["query"]
    assert q["settings"] == {"loss.same_tower": "query", "loss.same_tower_weight": 0.5}
    assert abs(q["vs_reference"].diff) < 1e-9
    assert q["pairs"] == [64, 64] and q["verdict"] == "no sig. diff" and q["vs_reference"].low < 0 < q["vs_reference"].high
    table = (results / "progress.md").read_text()
    assert "## mrr@10 by configuration, against the reference" in table
    assert "loss.same_tower=both" in table and "worse than ref" in table and "64/32" in table
