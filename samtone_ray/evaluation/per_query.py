"""Per-query evaluation metrics on disk: one Parquet row per query and evaluation (``query_id``,
``step``, ``pairs``, metrics).

A training run keeps every evaluation, keyed by the training pairs it had seen (its budget), so two
runs can be compared at a budget both reached rather than at whatever point each stopped.
"""

from __future__ import annotations

import io
from pathlib import Path

from samtone_ray.core.storage import open_parent

PER_QUERY_FILE = "per_query.parquet"  # in a training run's (a trial's) output directory


def write_per_query(path: str | Path, rows: dict[str, dict[str, float]], step: int, pairs: int) -> None:
    """Add one evaluation, ``{query_id: {metric: value}}`` (as ``evaluate_model(per_query=True)``
    returns) after ``pairs`` training pairs, to the file, atomically. An evaluation at the same
    budget replaces the one there: a restored run evaluates that step again."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    store, name = open_parent(path)  # a local file or an object (s3://...)
    qids = sorted(rows)
    metrics = sorted({m for values in rows.values() for m in values})
    table = pa.table(
        {"query_id": qids, "step": [step] * len(qids), "pairs": [pairs] * len(qids)}
        | {m: [float(rows[q][m]) for q in qids] for m in metrics}
    )
    if store.exists(name):
        earlier = pq.read_table(io.BytesIO(store.read_bytes(name)))
        if "pairs" in earlier.column_names:  # files from before budgets held the latest evaluation only
            earlier = earlier.filter(pc.not_equal(earlier["pairs"], pairs))
            table = pa.concat_tables([earlier, table], promote_options="default")
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    store.write_bytes(name, buffer.getvalue())


def read_budgets(path: str | Path, metric: str) -> dict[int, dict[str, float]]:
    """``{pairs: {query_id: value}}`` of one metric, every evaluation in the file, by budget (the
    last evaluation: the largest key).
    A file from before budgets were kept reads as one evaluation at budget -1."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(path))
    budgets = table.column("pairs").to_pylist() if "pairs" in table.column_names else [-1] * table.num_rows
    out: dict[int, dict[str, float]] = {}
    for pairs, qid, value in zip(budgets, table.column("query_id").to_pylist(), table.column(metric).to_pylist()):
        out.setdefault(pairs, {})[qid] = value
    return dict(sorted(out.items()))
