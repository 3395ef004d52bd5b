"""The search leaderboard: one row per trial, printed, saved as CSV and plotted."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from samtone_ray.config import Config
from samtone_ray.files import atomic_write_bytes, atomic_write_text
from samtone_ray.search_layout import SearchLayout
from samtone_ray.search_space import Space, overrides_of

METRIC_COLUMNS = ("mrr@10", "ndcg@10", "recall@10", "recall@100", "p@1")
SETTING_COLUMNS = {
    "same_tower": "loss.same_tower",
    "bidirectional": "loss.bidirectional",
    "batch_size": "train.batch_size",
    "temperature": "loss.temperature",
    "lr": "train.lr",
}


def build_leaderboard(results, cfg: Config, space: Space) -> list[dict[str, Any]]:
    """Rows from a Tune ResultGrid, plus the grid combinations skipped before the search."""
    # Searched keys beyond the standard columns get a column of their own, named by dotted key.
    extra = [k for k in (*space.grid_values, *space.sampled) if k not in SETTING_COLUMNS.values()]
    rows = []
    for result in results:
        metrics = dict(result.metrics or {})
        trial_cfg = cfg.with_overrides(overrides_of(result.config or {})) if "skipped" not in metrics else None
        trial_id = metrics.get("trial_id") or Path(result.path).name
        trial = SearchLayout(Path(cfg.output_dir).resolve()).trial(str(trial_id))
        if result.error is not None:
            status = "error"
        elif "skipped" in metrics:
            status = "skipped"
        elif trial.model.exists():
            status = "finished"
        else:
            status = "stopped"  # ASHA ended it before its last step
        reason = {"reason": metrics["skipped"]} if status == "skipped" else {}
        rows.append(
            {
                "trial": str(trial_id),
                "settings": _settings(trial_cfg.flat() if trial_cfg else overrides_of(result.config or {}), extra),
                # A skipped trial reports the worst value only because Tune requires the metric.
                "metrics": {k: float(metrics[k]) for k in metrics if "@" in k} if status != "skipped" else {},
                "steps": metrics.get("step"),
                "pairs": metrics.get("pairs"),  # training pairs seen: ASHA compares trials at equal pairs
                "status": status,
                "seconds": float(metrics.get("time_total_s", math.nan)),
                "run_id": trial.run_id(),
                "model_dir": str(trial.model) if status == "finished" else None,
            }
            | reason
        )
    for combo, reason in space.skipped:
        rows.append({"trial": "-", "settings": _settings(cfg.flat() | combo, extra), "metrics": {}, "steps": None, "pairs": None, "status": "skipped",
                     "seconds": math.nan, "run_id": None, "model_dir": None, "reason": reason})
    metric = cfg.search.metric
    sign = -1 if cfg.search.mode == "max" else 1
    rows.sort(key=lambda r: (math.isnan(r["metrics"].get(metric, math.nan)), sign * r["metrics"].get(metric, 0.0)))
    return rows


def _settings(flat: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    return {name: flat.get(key) for name, key in SETTING_COLUMNS.items()} | {key: flat.get(key) for key in extra}


def _columns(rows: list[dict[str, Any]], metric: str) -> list[str]:
    settings = list(rows[0]["settings"]) if rows else list(SETTING_COLUMNS)
    metrics = list(dict.fromkeys([metric, *METRIC_COLUMNS]))
    return ["trial", *settings, *metrics, "steps", "pairs", "status", "seconds"]


def _flat_row(row: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    out = {"trial": row["trial"], **row["settings"], "steps": row["steps"], "pairs": row["pairs"], "status": row["status"],
           "seconds": row["seconds"]}
    for key in columns:
        if "@" in key:
            out[key] = row["metrics"].get(key, math.nan)
    return out


def format_leaderboard(rows: list[dict[str, Any]], metric: str) -> str:
    columns = _columns(rows, metric)
    cells = [columns]
    for row in rows:
        flat = _flat_row(row, columns)
        cells.append([_fmt(flat.get(c)) for c in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        # Metrics and temperatures to 4 decimals, seconds to 1, learning rates in 3 significant digits.
        if abs(value) >= 1:
            return f"{value:.1f}"
        return f"{value:.4f}" if abs(value) >= 0.001 else f"{value:.3g}"
    return str(value)


def write_leaderboard(rows: list[dict[str, Any]], out_dir: Path, metric: str) -> None:
    """``leaderboard.csv`` and ``leaderboard.png`` under ``out_dir``, each written atomically."""
    columns = _columns(rows, metric)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(_flat_row(row, columns))
    layout = SearchLayout(out_dir)
    atomic_write_text(layout.leaderboard_csv, buffer.getvalue())
    plot_leaderboard(rows, layout.leaderboard_png, metric)


def plot_leaderboard(rows: list[dict[str, Any]], path: Path, metric: str) -> None:
    """Bars of the metric per negative strategy, one bar per batch size (best trial of each cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells: dict[tuple[str, Any], float] = {}
    for row in rows:
        value = row["metrics"].get(metric)
        if value is None:
            continue
        s = row["settings"]
        strategy = f"{s['same_tower']}{'' if s['bidirectional'] else ' (q->d only)'}"
        key = (strategy, s["batch_size"])
        cells[key] = max(cells.get(key, -math.inf), value)
    strategies = sorted({k[0] for k in cells})
    batches = sorted({k[1] for k in cells})
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(strategies) + 2), 4))
    width = 0.8 / max(1, len(batches))
    for j, batch in enumerate(batches):
        xs = [i + j * width for i, st in enumerate(strategies) if (st, batch) in cells]
        ys = [cells[(st, batch)] for st in strategies if (st, batch) in cells]
        ax.bar(xs, ys, width=width, label=f"batch {batch}")
    ax.set_xticks([i + width * (len(batches) - 1) / 2 for i in range(len(strategies))])
    ax.set_xticklabels(strategies)
    ax.set_xlabel("same-tower negatives")
    ax.set_ylabel(metric)
    if cells:
        lo = min(cells.values())
        ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(cells.values()) + 0.02))
    ax.legend(fontsize="small")
    ax.set_title(f"{metric} by negative strategy and global batch size")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
