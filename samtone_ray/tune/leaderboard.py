"""The tuning leaderboard: one row per trial, printed, saved as CSV and plotted.

For the tuned metric (``tune.metric``) each trial with per-query values gets a 95% bootstrap interval, and a
paired test against a reference trial (``tune.reference``): the mean difference over the same
queries, its interval and a randomisation p-value. "A beats B" is said only when that interval
excludes 0 (samtone_ray/evaluation/statistics.py).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from samtone_ray.core.config import Config
from samtone_ray.core.files import atomic_write_bytes, atomic_write_text
from samtone_ray.tune.layout import TuneLayout
from samtone_ray.tune.space import SEED_KEY, Space, overrides_of
from samtone_ray.evaluation.statistics import align, bootstrap_ci, paired_test

log = logging.getLogger(__name__)
METRIC_COLUMNS = ("mrr@10", "ndcg@10", "recall@10", "recall@100", "p@1")
# One column per setting the config schema marks as a hyperparameter, named by its last part.
SETTING_COLUMNS = {key.rsplit(".", 1)[1]: key for key in Config.hyperparameter_keys()}
# ``vs_ref_pairs``: the training pairs at which a trial was compared with the reference, the largest
# budget both reached (a trial ASHA stopped early is compared with the others at its own last budget).
STAT_COLUMNS = ("ci_low", "ci_high", "diff_vs_ref", "diff_low", "diff_high", "p_value", "vs_ref_pairs", "verdict")


def build_leaderboard(results, cfg: Config, space: Space) -> list[dict[str, Any]]:
    """Rows from a Tune ResultGrid, plus the grid combinations skipped before the tuning run."""
    # Tuned keys beyond the standard columns get a column of their own, named by dotted key.
    extra = [k for k in (*space.grid_values, *space.sampled) if k not in SETTING_COLUMNS.values()]
    rows = []
    for result in results:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or Path(result.path).name
        trial = TuneLayout(Path(cfg.output_dir).resolve()).trial(str(trial_id))
        trial_cfg = trial.read_config()  # None for a trial skipped before it resolved its config
        if result.error is not None:
            status = "error"
        elif "skipped" in metrics:
            status = "skipped"
        elif trial.model.exists():
            status = "finished"
        else:
            status = "stopped"  # ASHA ended it before its last step
        reason = {"reason": metrics["skipped"]} if status == "skipped" else {}
        flat = trial_cfg.flat() if trial_cfg else overrides_of(result.config or {})
        rows.append(
            {
                "trial": str(trial_id),
                "settings": _settings(flat, extra),
                "flat": flat,
                # A skipped trial reports the worst value only because Tune requires the metric.
                "metrics": {k: float(metrics[k]) for k in metrics if "@" in k} if status != "skipped" else {},
                "steps": metrics.get("step"),
                "pairs": metrics.get("pairs"),  # training pairs seen: ASHA compares trials at equal pairs
                "status": status,
                "seconds": float(metrics.get("time_total_s", math.nan)),
                "run_id": trial.run_id(),
                "model_dir": str(trial.model) if status == "finished" else None,
                "per_query_file": trial.per_query if trial.per_query.exists() and status != "skipped" else None,
            }
            | reason
        )
    for combo, reason in space.skipped:
        rows.append({"trial": "-", "settings": _settings(cfg.flat() | combo, extra), "flat": cfg.flat() | combo, "metrics": {},
                     "steps": None, "pairs": None, "status": "skipped", "seconds": math.nan, "run_id": None,
                     "model_dir": None, "per_query_file": None, "reason": reason})
    metric = cfg.tune.metric
    sign = -1 if cfg.tune.mode == "max" else 1
    rows.sort(key=lambda r: (math.isnan(r["metrics"].get(metric, math.nan)), sign * r["metrics"].get(metric, 0.0)))
    from samtone_ray.evaluation.per_query import read_budgets

    for r in rows:
        r["budgets"] = read_budgets(r["per_query_file"], metric) if r["per_query_file"] else {}
    add_statistics(rows, {r["trial"]: r["budgets"] for r in rows}, metric, cfg.tune.mode, cfg.tune.reference)
    return rows


def verdict(test, mode: str) -> str:
    """"beats ref" or "worse than ref" only when the paired interval excludes 0, else "no sig. diff"."""
    if not test.excludes_zero():
        return "no sig. diff"
    return "beats ref" if (test.diff > 0) == (mode == "max") else "worse than ref"


def add_statistics(
    rows: list[dict[str, Any]], per_query: dict[str, dict[int, dict[str, float]]], metric: str, mode: str, reference: str = ""
) -> dict[str, Any] | None:
    """Give each row with per-query values its interval (``ci``, at its last evaluation) and,
    against the reference trial, its paired test (``vs_reference``), the budget of that test
    (``vs_ref_pairs``: the most training pairs both had seen when evaluated) and ``verdict``;
    returns the reference row.

    ``per_query[trial]``: ``{pairs: {query_id: value}}``, every evaluation of the trial by budget.
    ``rows`` are ordered best first. ``reference`` is ``tune.reference`` (see config.py).
    """
    per_query = {trial: evals for trial, evals in per_query.items() if evals}
    for row in rows:
        evals = per_query.get(row["trial"])
        row["ci"] = bootstrap_ci(list(evals[max(evals)].values())) if evals else None
        row["vs_reference"], row["vs_ref_pairs"], row["verdict"] = None, None, None
    ref = pick_reference([r for r in rows if r["trial"] in per_query], reference)
    if ref is None:
        return None
    ref["verdict"] = "reference"
    for row in rows:
        if row is ref or row["trial"] not in per_query:
            continue
        common = set(per_query[row["trial"]]) & set(per_query[ref["trial"]])
        if not common:
            log.warning("trial %s vs reference %s: evaluated at no common budget (pairs %s vs %s)", row["trial"],
                        ref["trial"], sorted(per_query[row["trial"]]), sorted(per_query[ref["trial"]]))
            continue
        budget = max(common)
        try:
            test = paired_test(*align(per_query[row["trial"]][budget], per_query[ref["trial"]][budget]))
        except ValueError as exc:  # evaluated on other queries: nothing to pair
            log.warning("trial %s vs reference %s: %s", row["trial"], ref["trial"], exc)
            continue
        row["vs_reference"], row["vs_ref_pairs"], row["verdict"] = test, budget, verdict(test, mode)
    return ref


def configuration_of(row: dict[str, Any]) -> str:
    """A trial's configuration: every setting but its training seed (``tune.seeds``)."""
    return json.dumps({k: v for k, v in sorted(row["flat"].items()) if k != SEED_KEY}, default=str)


def group_seeds(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """The trials of ``build_leaderboard`` + ``add_statistics`` grouped by configuration, best mean first.

    Each group: its ``trials`` (one per seed), the ``mean`` of ``metric`` over its seeds (each at its
    last evaluation) and the ``spread`` (sample standard deviation over seeds), and against the
    reference trial's configuration a paired test pooled over seeds: seed ``i`` of the configuration
    is paired with seed ``i`` of the reference, each pair at the largest budget both reached, and
    the per-query values are averaged over the pairs, so the bootstrap resamples queries and every
    seed weighs the same.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["trial"] != "-" and row["status"] != "skipped":
            groups.setdefault(configuration_of(row), []).append(row)
    ref_row = next((r for r in rows if r.get("verdict") == "reference"), None)
    ref_key = configuration_of(ref_row) if ref_row else None
    out = []
    for key, trials in groups.items():
        trials.sort(key=lambda r: r["flat"].get(SEED_KEY, 0))
        values = [r["metrics"][metric] for r in trials if metric in r["metrics"]]
        group = {
            "settings": {k: v for k, v in trials[0]["settings"].items() if k != SEED_KEY}, "trials": [r["trial"] for r in trials],
            "seeds": len(values), "mean": float(np.mean(values)) if values else math.nan,
            "spread": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
            "statuses": [r["status"] for r in trials], "verdict": "reference" if key == ref_key else None, "vs_reference": None,
        }
        if ref_key is not None and key != ref_key:
            group["vs_reference"], group["pairs"] = _pooled_test(trials, groups[ref_key], metric)
            if group["vs_reference"] is not None:
                group["verdict"] = verdict(group["vs_reference"], mode)
        out.append(group)
    sign = -1 if mode == "max" else 1
    out.sort(key=lambda g: (math.isnan(g["mean"]), sign * (0.0 if math.isnan(g["mean"]) else g["mean"])))
    return out


def _pooled_test(trials: list[dict[str, Any]], reference: list[dict[str, Any]], metric: str):
    """The paired test of ``group_seeds``; (None, []) when no seed pair has a common budget and queries."""
    mine, theirs, budgets = [], [], []
    for a, b in zip(trials, reference):
        common = set(a.get("budgets") or {}) & set(b.get("budgets") or {})
        if not common:
            continue
        budget = max(common)
        try:
            x, y = align(a["budgets"][budget], b["budgets"][budget])
        except ValueError:
            continue
        if mine and len(x) != len(mine[0]):
            continue  # another query set: cannot be averaged query by query
        mine.append(x)
        theirs.append(y)
        budgets.append(budget)
    if not mine:
        return None, []
    return paired_test(np.mean(mine, axis=0), np.mean(theirs, axis=0)), budgets


def configuration_cells(groups: list[dict[str, Any]], metric: str) -> list[list[str]]:
    """The table by configuration (``tune.seeds`` > 1), header first: printed and written as CSV."""
    cells = [["configuration", "seeds", f"mean_{metric}", "spread", "diff_vs_ref", "diff_low", "diff_high", "at_pairs",
              "verdict", "trials"]]
    for g in groups:
        test = g["vs_reference"]
        shown = ", ".join(f"{k}={v}" for k, v in g["settings"].items() if v is not None)
        cells.append([shown, str(g["seeds"]), _fmt(g["mean"]), _fmt(g["spread"]),
                      *(_fmt(v) for v in ((test.diff, test.low, test.high) if test else (None, None, None))),
                      "/".join(map(str, g.get("pairs") or [])) or "-", g["verdict"] or "-", " ".join(g["trials"])])
    return cells


def format_configurations(groups: list[dict[str, Any]], metric: str) -> str:
    return "\n".join(_aligned(configuration_cells(groups, metric)))


def write_configurations(groups: list[dict[str, Any]], out_dir: Path, metric: str) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(configuration_cells(groups, metric))
    atomic_write_text(TuneLayout(out_dir).configurations_csv, buffer.getvalue())


def pick_reference(rows: list[dict[str, Any]], spec: str) -> dict[str, Any] | None:
    """The reference among ``rows`` (best first): a trial id, the best trial matching dotted
    settings ``k=v,k=v``, or by default the best ``loss.same_tower=none`` trial, else the best.
    Finished trials are preferred to stopped ones."""
    rows = sorted(rows, key=lambda r: r["status"] != "finished")  # stable: best first within each
    if spec and "=" not in spec:
        found = [r for r in rows if r["trial"] == spec]
    else:
        wanted = dict(item.split("=", 1) for item in (spec or "loss.same_tower=none").split(",") if item)
        found = [r for r in rows if all(str(r["flat"].get(k.strip())).lower() == v.strip().lower() for k, v in wanted.items())]
    if spec and not found:
        log.warning("tune.reference=%r matches no evaluated trial; the best trial is the reference", spec)
    return (found or rows or [None])[0]


def _settings(flat: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    return {name: flat.get(key) for name, key in SETTING_COLUMNS.items()} | {key: flat.get(key) for key in extra}


def _columns(rows: list[dict[str, Any]], metric: str) -> list[str]:
    settings = list(rows[0]["settings"]) if rows else list(SETTING_COLUMNS)
    metrics = list(dict.fromkeys([metric, *METRIC_COLUMNS]))
    return ["trial", *settings, metric, *STAT_COLUMNS, *metrics[1:], "steps", "pairs", "status", "seconds"]


def _flat_row(row: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    out = {"trial": row["trial"], **row["settings"], "steps": row["steps"], "pairs": row["pairs"], "status": row["status"],
           "seconds": row["seconds"]}
    for key in columns:
        if "@" in key:
            out[key] = row["metrics"].get(key, math.nan)
    ci, test = row.get("ci"), row.get("vs_reference")
    out |= {"ci_low": ci.low if ci else None, "ci_high": ci.high if ci else None, "verdict": row.get("verdict")}
    if test:
        out |= {"diff_vs_ref": test.diff, "diff_low": test.low, "diff_high": test.high, "p_value": test.p_value,
                "vs_ref_pairs": row.get("vs_ref_pairs")}
    return out


def format_leaderboard(rows: list[dict[str, Any]], metric: str) -> str:
    columns = _columns(rows, metric)
    cells = [columns] + [[_fmt(flat.get(c)) for c in columns] for flat in (_flat_row(row, columns) for row in rows)]
    return "\n".join(_aligned(cells) + significance_lines(rows, metric))


def _aligned(cells: list[list[str]]) -> list[str]:
    """Rows of text cells as aligned columns, a rule under the header row."""
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _label(row: dict[str, Any]) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in row["settings"].items() if v is not None)
    return f"trial {row['trial']} ({shown})"


def significance_lines(rows: list[dict[str, Any]], metric: str) -> list[str]:
    """The reference, then one line per trial whose paired interval vs the reference excludes 0."""
    ref = next((r for r in rows if r.get("verdict") == "reference"), None)
    if ref is None:
        return []
    n = next((r["vs_reference"].queries for r in rows if r.get("vs_reference")), 0)
    out = ["", f"reference: {_label(ref)}; paired {metric} differences over {n} queries, each at the most training "
           "pairs both trials had seen (vs_ref_pairs), 95% bootstrap CI, randomisation p (\"beats\" only when the CI excludes 0):"]
    for row in rows:
        test, at = row.get("vs_reference"), f"at {row.get('vs_ref_pairs')} pairs"
        if row.get("verdict") == "beats ref":
            out.append(f"  {_label(row)} beats the reference {at}: {test.diff:+.4f} [{test.low:+.4f}, {test.high:+.4f}], "
                       f"p={test.p_value:.3g}")
        elif row.get("verdict") == "worse than ref":
            out.append(f"  the reference beats {_label(row)} {at}: {-test.diff:+.4f} [{-test.high:+.4f}, {-test.low:+.4f}], "
                       f"p={test.p_value:.3g}")
    if len(out) == 2:
        out.append("  no trial differs from the reference with a CI excluding 0")
    return out


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        # Metrics and temperatures to 4 decimals, seconds to 1, learning rates in 3 significant digits.
        if abs(value) >= 1:
            return f"{value:.1f}"
        return f"{value:.4f}" if abs(value) >= 0.001 else f"{value:.3g}"
    return str(value)


def write_leaderboard(
    rows: list[dict[str, Any]], out_dir: Path, metric: str, references: dict[str, float] | None = None
) -> None:
    """``leaderboard.csv`` and ``leaderboard.png`` under ``out_dir``, each written atomically.

    ``references`` (e.g. zero-shot and BM25 values of ``metric``) are drawn as lines on the plot.
    """
    columns = _columns(rows, metric)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(_flat_row(row, columns))
    layout = TuneLayout(out_dir)
    atomic_write_text(layout.leaderboard_csv, buffer.getvalue())
    plot_leaderboard(rows, layout.leaderboard_png, metric, references or {})


def plot_leaderboard(rows: list[dict[str, Any]], path: Path, metric: str, references: dict[str, float]) -> None:
    """Each evaluated trial's metric with its 95% interval, best first; stopped trials hollow and
    labelled with the pairs they saw; reference systems (zero-shot, BM25) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if metric in r["metrics"] and r["status"] in ("finished", "stopped")]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(shown) + 3), 4.5))
    for i, row in enumerate(shown):
        value, ci = row["metrics"][metric], row.get("ci")
        err = [[value - ci.low], [ci.high - value]] if ci else None
        stopped = row["status"] == "stopped"
        color = "tab:orange" if row.get("verdict") == "reference" else "tab:blue"
        ax.errorbar([i], [value], yerr=err, fmt="o", capsize=4, color=color,
                    markerfacecolor="white" if stopped else color, markersize=7)
    for (name, value), style in zip(references.items(), ("--", ":", "-.")):
        ax.axhline(value, linestyle=style, color="gray", label=f"{name} ({value:.3f})")
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([_tick(r) for r in shown], rotation=30, ha="right", fontsize="small")
    ax.set_ylabel(f"{metric} (95% bootstrap CI over queries)")
    ax.set_title(f"{metric} by trial (hollow: stopped early, orange: reference)", fontsize="medium")
    if references:
        ax.legend(fontsize="small")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


def _tick(row: dict[str, Any]) -> str:
    s = row["settings"]
    label = f"{s['same_tower']}{'' if s['bidirectional'] else ' q->d'} b{s['batch_size']}"
    extra = [f"{k.split('.')[-1]}={v}" for k, v in s.items() if "." in k and v is not None]
    label += "".join(f"\n{e}" for e in extra)
    return label + (f"\nstopped @{row['pairs']} pairs" if row["status"] == "stopped" else "")
