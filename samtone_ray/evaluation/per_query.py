"""Per-query evaluation metrics on disk: one Parquet row per query (``query_id``, ``step``, metrics)."""

from __future__ import annotations

import io
from pathlib import Path

from samtone_ray.core.files import atomic_write_bytes

PER_QUERY_FILE = "per_query.parquet"  # in a training run's (a trial's) output directory


def write_per_query(path: str | Path, rows: dict[str, dict[str, float]], step: int) -> None:
    """Write ``{query_id: {metric: value}}`` (as ``evaluate_model(per_query=True)`` returns) atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    qids = sorted(rows)
    metrics = sorted({m for values in rows.values() for m in values})
    table = pa.table(
        {"query_id": qids, "step": [step] * len(qids)} | {m: [float(rows[q][m]) for q in qids] for m in metrics}
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def read_per_query(path: str | Path, metric: str) -> dict[str, float]:
    """``{query_id: value}`` of one metric from a file written by ``write_per_query``."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(path), columns=["query_id", metric])
    return dict(zip(table.column("query_id").to_pylist(), table.column(metric).to_pylist()))
