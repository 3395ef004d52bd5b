"""Bootstrap intervals and paired tests against independent oracles (scipy, exact enumeration),
per-query evaluation values, and the leaderboard's significance columns (all pure: no Ray)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from samtone_ray.evaluation.retrieval import retrieval_metrics
from samtone_ray.evaluation.statistics import align, bootstrap_ci, paired_test


def _mrr_like(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Reciprocal ranks in [0, 1], many zeros: the shape of a real per-query MRR column.
    ranks = rng.integers(1, 15, size=n)
    return np.clip(np.where(ranks > 10, 0.0, 1.0 / ranks) + shift, 0, 1)


@pytest.mark.parametrize("n,seed", [(40, 1), (300, 2)])
def test_bootstrap_ci_matches_scipy_percentile_bootstrap(n, seed):
    x = _mrr_like(n, seed)
    mine = bootstrap_ci(x, resamples=20000, seed=7)
    ref = stats.bootstrap((x,), np.mean, method="percentile", n_resamples=20000, random_state=123).confidence_interval
    assert mine.mean == pytest.approx(x.mean())
    width = ref.high - ref.low
    assert mine.low == pytest.approx(ref.low, abs=0.03 * width + 1e-9)
    assert mine.high == pytest.approx(ref.high, abs=0.03 * width + 1e-9)


def test_bootstrap_ci_is_reproducible_and_degenerate_data_has_no_width():
    x = _mrr_like(50, 3)
    assert bootstrap_ci(x) == bootstrap_ci(x)  # fixed default seed
    flat = bootstrap_ci([0.5] * 30)
    assert flat.low == flat.high == flat.mean == 0.5
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_ci([0.1, math.nan])


def test_paired_p_value_matches_exact_sign_flip_enumeration():
    a = _mrr_like(12, 4, shift=0.05)
    b = _mrr_like(12, 5)
    d = a - b
    observed = abs(d.mean())
    # The oracle: all 2^12 sign assignments, counted exactly.
    flips = np.array(list(itertools.product([-1, 1], repeat=d.size)))
    exact = float(np.mean(np.abs((flips * d).mean(axis=1)) >= observed - 1e-12))
    test = paired_test(a, b, resamples=40000, seed=11)
    assert test.p_value == pytest.approx(exact, abs=0.01)
    assert test.diff == pytest.approx(d.mean()) and test.queries == 12


def test_paired_test_agrees_with_scipy_permutation_test_and_paired_bootstrap():
    a = _mrr_like(200, 6, shift=0.03)
    b = _mrr_like(200, 6) * 0.9 + _mrr_like(200, 8) * 0.1
    mine = paired_test(a, b, resamples=20000)
    perm = stats.permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                                  n_resamples=20000, alternative="two-sided", random_state=5)
    assert mine.p_value == pytest.approx(perm.pvalue, abs=0.01 + 0.1 * perm.pvalue)
    ref = stats.bootstrap((a - b,), np.mean, method="percentile", n_resamples=20000, random_state=9).confidence_interval
    width = ref.high - ref.low
    assert mine.low == pytest.approx(ref.low, abs=0.03 * width) and mine.high == pytest.approx(ref.high, abs=0.03 * width)
    assert mine.excludes_zero() == (mine.low > 0 or mine.high < 0)


def test_identical_systems_do_not_differ_and_a_clear_gain_does():
    a = _mrr_like(100, 9)
    same = paired_test(a, a)
    assert same.diff == 0 and same.low == same.high == 0 and same.p_value == 1.0 and not same.excludes_zero()
    better = paired_test(np.clip(a + 0.1, 0, 1.5), a)
    assert better.low > 0 and better.p_value < 0.001 and better.excludes_zero()


def test_align_pairs_by_query_and_refuses_different_queries():
    assert align({"q2": 0.5, "q1": 1.0}, {"q1": 0.0, "q2": 0.25}) == ([1.0, 0.5], [0.0, 0.25])
    with pytest.raises(ValueError, match="same queries"):
        align({"q1": 1.0}, {"q2": 1.0})


def test_per_query_metrics_are_the_values_behind_the_means():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}, "q3": {"d9": 1}}
    run = {"q1": {"d1": 0.9, "d2": 0.8}, "q2": {"d1": 0.9, "d3": 0.5, "d2": 0.1}}  # q3 unanswered
    means, rows = retrieval_metrics(run, qrels, per_query=True)
    assert means == retrieval_metrics(run, qrels)
    # Naive oracle, by hand: q1 hit at rank 1, q2 first hit at rank 2, q3 nothing.
    assert [rows[q]["mrr@10"] for q in ("q1", "q2", "q3")] == [1.0, 0.5, 0.0]
    assert rows["q2"]["recall@10"] == 1.0 and rows["q2"]["p@1"] == 0.0
    for key, mean in means.items():
        assert mean == pytest.approx(sum(r[key] for r in rows.values()) / 3)


# ----------------------------------------------------------------- the leaderboard's verdicts


def _row(trial, same_tower, value, status="finished"):
    settings = {"same_tower": same_tower, "bidirectional": True, "batch_size": 8}
    return {"trial": trial, "settings": settings, "flat": {"loss.same_tower": same_tower, "train.batch_size": 8},
            "metrics": {"mrr@10": value}, "steps": 4, "pairs": 32, "status": status, "seconds": 1.0}


def test_leaderboard_tests_every_trial_against_the_none_trial_and_says_beats_only_when_real():
    from samtone_ray.tune.leaderboard import add_statistics, format_leaderboard

    qids = [f"q{i}" for i in range(150)]
    base = dict(zip(qids, _mrr_like(150, 10)))
    per_query = {
        "clear": {q: min(1.0, v + 0.2) for q, v in base.items()},  # better on every answered query
        "noise": dict(zip(qids, np.clip(np.array(list(base.values())) + np.random.default_rng(1).normal(0, 0.05, 150), 0, 1))),
        "ref": base,
        "bad": {q: v * 0.5 for q, v in base.items()},
    }
    rows = [_row("clear", "both", 0.5), _row("noise", "query", 0.4), _row("ref", "none", 0.35), _row("bad", "doc", 0.2)]
    ref = add_statistics(rows, {trial: {32: values} for trial, values in per_query.items()}, "mrr@10", "max")
    assert ref["trial"] == "ref"  # the same_tower=none trial, though not the best
    verdicts = {r["trial"]: r["verdict"] for r in rows}
    oracle = {}
    for trial in ("clear", "noise", "bad"):
        d = np.array([per_query[trial][q] - base[q] for q in qids])
        ci = stats.bootstrap((d,), np.mean, method="percentile", n_resamples=5000, random_state=0).confidence_interval
        oracle[trial] = "beats ref" if ci.low > 0 else "worse than ref" if ci.high < 0 else "no sig. diff"
    assert verdicts == {"ref": "reference", **oracle}
    assert verdicts["clear"] == "beats ref" and verdicts["bad"] == "worse than ref"
    text = format_leaderboard(rows, "mrr@10")
    for trial, verdict in verdicts.items():  # "A beats B" printed exactly when its interval excludes 0
        said = any(f"trial {trial} (" in line and " beats the reference at 32 pairs" in line for line in text.splitlines())
        assert said == (verdict == "beats ref")
    assert any(line.startswith("  the reference beats trial bad (") for line in text.splitlines())
    ci = rows[0]["ci"]
    assert ci.low < ci.mean < ci.high


def test_trials_are_compared_with_the_reference_at_the_largest_budget_both_reached():
    """ASHA stopped the reference after 32 pairs; the other trial went on to 64 and improved. At 32
    pairs the two are the same model quality, so the verdict there is no difference, not "beats"."""
    from samtone_ray.tune.leaderboard import add_statistics, format_leaderboard

    qids = [f"q{i}" for i in range(150)]
    base = dict(zip(qids, _mrr_like(150, 10)))
    per_query = {
        "ref": {32: base},
        "late": {32: dict(base), 64: {q: min(1.0, v + 0.3) for q, v in base.items()}},
        "elsewhere": {48: {q: min(1.0, v + 0.3) for q, v in base.items()}},  # no budget in common
    }
    rows = [_row("late", "both", 0.6), _row("elsewhere", "query", 0.6), _row("ref", "none", 0.35, status="stopped")]
    add_statistics(rows, per_query, "mrr@10", "max")
    late, elsewhere, ref = rows
    assert ref["verdict"] == "reference"
    assert late["vs_ref_pairs"] == 32 and late["vs_reference"].diff == 0 and late["verdict"] == "no sig. diff"
    assert late["ci"].mean == pytest.approx(np.mean([per_query["late"][64][q] for q in qids]))  # its own last budget
    assert elsewhere["vs_reference"] is None and elsewhere["verdict"] is None
    assert "beats the reference" not in format_leaderboard(rows, "mrr@10")


def test_tune_reference_picks_a_trial_by_id_or_settings_else_the_best():
    from samtone_ray.tune.leaderboard import pick_reference

    rows = [_row("a", "both", 0.5), _row("b", "query", 0.4, status="stopped"), _row("c", "query", 0.3)]
    assert pick_reference(rows, "")["trial"] == "a"  # no none trial: the best
    assert pick_reference(rows, "b")["trial"] == "b"
    assert pick_reference(rows, "loss.same_tower=query")["trial"] == "c"  # finished before stopped
    assert pick_reference(rows, "loss.same_tower=none")["trial"] == "a"  # nothing matches: the best
