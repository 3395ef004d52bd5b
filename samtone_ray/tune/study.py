"""A study that outlives a session: each ended trial's summary and per-query results copied to a
folder that can be committed (``tune.results_dir``), and a progress table over everything there.

A trial's folder is named by its configuration (every setting but the seed, hashed) and its seed,
so the same arm run again in a later session, or in another tuning run, lands in the same place
and replaces the earlier copy only when it trained further.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from samtone_ray.core.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from samtone_ray.tune.leaderboard import configuration_of
from samtone_ray.tune.space import SEED_KEY

SUMMARY = "summary.json"
PROGRESS = "progress.md"
EXPORTED = ("finished", "stopped")


def trial_name(row: dict[str, Any]) -> str:
    digest = hashlib.sha256(configuration_of(row).encode()).hexdigest()[:10]
    return f"{digest}-seed{row['flat'].get(SEED_KEY)}"


def export_trials(rows: list[dict[str, Any]], results_dir: Path, metric: str, varied: list[str]) -> list[Path]:
    """Copy every finished or stopped trial of a leaderboard into ``results_dir``; returns the
    folders written. ``varied``: the dotted keys the study varies, shown in the progress table."""
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
    write_progress(results_dir, metric)
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


def write_progress(results_dir: Path, metric: str) -> None:
    summaries = read_summaries(results_dir)
    atomic_write_text(Path(results_dir) / PROGRESS, f"# study progress ({len(summaries)} trials)\n\n"
                      + format_progress_table(summaries, metric) + "\n")
