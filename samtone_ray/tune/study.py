"""A study that outlives a session: each ended trial's summary and per-query results copied to a
folder that can be committed (``tune.results_dir``), and a progress table over everything there.

A trial's folder is named by its configuration (every setting but the seed, hashed) and its seed,
so the same arm run again in a later session, or in another tuning run, lands in the same place
and replaces the earlier copy only when it trained further. The study's table compares every
configuration there with the reference configuration, whichever tuning run each came from, by the
leaderboard's own rules: seeds paired by index, each pair at the largest budget both reached,
per-query values averaged over the pairs and bootstrapped over queries.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from samtone_ray.core.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from samtone_ray.evaluation.per_query import read_budgets
from samtone_ray.tune.leaderboard import add_statistics, configuration_of, format_configurations, group_seeds
from samtone_ray.tune.space import SEED_KEY

SUMMARY = "summary.json"
PROGRESS = "progress.md"
EXPORTED = ("finished", "stopped")


def trial_name(row: dict[str, Any]) -> str:
    digest = hashlib.sha256(configuration_of(row).encode()).hexdigest()[:10]
    return f"{digest}-seed{row['flat'].get(SEED_KEY)}"


def export_trials(rows: list[dict[str, Any]], results_dir: Path, metric: str, varied: list[str], mode: str = "max",
                  reference: str = "") -> list[Path]:
    """Copy every finished or stopped trial of a leaderboard into ``results_dir``; returns the
    folders written. ``varied``: the dotted keys the study varies, shown in the progress table;
    ``mode`` and ``reference``: ``tune.mode`` and ``tune.reference``, for the study's table."""
    written = []
    for row in rows:
        if row["status"] not in EXPORTED or not row.get("per_query_file"):
            continue
        folder = results_dir / trial_name(row)
        summary = folder / SUMMARY
        if summary.exists() and json.loads(summary.read_text()).get("pairs", -1) > (row.get("pairs") or -1):
            continue  # an earlier session trained this arm further: keep that one
        atomic_write_bytes(folder / Path(row["per_query_file"]).name, Path(row["per_query_file"]).read_bytes())
        atomic_write_json(summary, {
            "trial": row["trial"], "status": row["status"], "steps": row["steps"], "pairs": row["pairs"],
            "metrics": row["metrics"], "budgets": sorted(row.get("budgets") or {}), "seed": row["flat"].get(SEED_KEY),
            "varied": {k: row["flat"].get(k) for k in varied}, "config": row["flat"],
        })
        written.append(folder)
    write_progress(results_dir, metric, mode, reference)
    return written


def read_summaries(results_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) | {"folder": p.parent.name} for p in sorted(Path(results_dir).glob(f"*/{SUMMARY}"))]


def format_progress_table(summaries: list[dict[str, Any]], metric: str) -> str:
    """One line per configuration: the seeds done, finished or stopped, and their values of ``metric``."""
    arms: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        arms.setdefault(json.dumps({k: v for k, v in s["varied"].items() if k != SEED_KEY}, sort_keys=True), []).append(s)
    lines = [f"| configuration | seeds | {metric} per seed | status |", "|---|---|---|---|"]
    for key, runs in sorted(arms.items()):
        runs.sort(key=lambda s: (s["seed"] is None, s["seed"]))
        shown = ", ".join(f"{k}={v}" for k, v in json.loads(key).items()) or "(base)"
        values = ", ".join(f"{s['metrics'].get(metric, float('nan')):.4f} (seed {s['seed']}, {s['pairs']} pairs)" for s in runs)
        status = ", ".join(sorted({s["status"] for s in runs}))
        lines.append(f"| {shown} | {len(runs)} | {values} | {status} |")
    return "\n".join(lines)


def study_groups(results_dir: Path, metric: str, mode: str = "max", reference: str = "") -> list[dict[str, Any]]:
    """Every configuration in ``results_dir`` with its seeds, mean, spread and its paired test
    against the reference configuration (``tune.reference`` rules; default: plain in-batch), as
    ``leaderboard.group_seeds`` gives them. Configurations are shown by the settings that differ
    between them."""
    summaries = read_summaries(results_dir)
    keys = sorted({k for s in summaries for k in s["config"]})
    differing = [k for k in keys if k != SEED_KEY and len({json.dumps(s["config"].get(k)) for s in summaries}) > 1]
    rows, per_query = [], {}
    for s in summaries:
        budgets = read_budgets(next(Path(results_dir, s["folder"]).glob("*.parquet")), metric)
        rows.append({"trial": s["folder"], "status": s["status"], "flat": s["config"], "metrics": s["metrics"],
                     "budgets": budgets, "settings": {k: s["config"].get(k) for k in differing}})
        per_query[s["folder"]] = budgets
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda r: sign * r["metrics"].get(metric, -sign * float("inf")))
    add_statistics(rows, per_query, metric, mode, reference)
    return group_seeds(rows, metric, mode)


def write_progress(results_dir: Path, metric: str, mode: str = "max", reference: str = "") -> None:
    summaries = read_summaries(results_dir)
    table = format_configurations(study_groups(results_dir, metric, mode, reference), metric)
    atomic_write_text(Path(results_dir) / PROGRESS, f"# study progress ({len(summaries)} trials)\n\n"
                      + format_progress_table(summaries, metric) + "\n\n"
                      + f"## {metric} by configuration, against the reference\n\n```\n{table}\n```\n")
