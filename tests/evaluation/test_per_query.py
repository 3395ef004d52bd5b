"""A run's per-query file keeps every evaluation, keyed by the training pairs seen."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from samtone_ray.evaluation.per_query import read_budgets, write_per_query


def test_every_evaluation_is_kept_by_budget_and_a_repeated_budget_replaced(tmp_path):
    path = tmp_path / "per_query.parquet"
    write_per_query(path, {"q1": {"mrr@10": 0.5}, "q2": {"mrr@10": 0.0}}, step=4, pairs=32)
    write_per_query(path, {"q1": {"mrr@10": 1.0}, "q2": {"mrr@10": 0.25}}, step=8, pairs=64)
    write_per_query(path, {"q1": {"mrr@10": 1.0}, "q2": {"mrr@10": 0.5}}, step=8, pairs=64)  # restored, evaluated again
    assert read_budgets(path, "mrr@10") == {32: {"q1": 0.5, "q2": 0.0}, 64: {"q1": 1.0, "q2": 0.5}}
    budgets = read_budgets(path, "mrr@10")
    assert budgets[max(budgets)] == {"q1": 1.0, "q2": 0.5}
    assert pq.read_table(path).num_rows == 4


def test_a_file_from_before_budgets_reads_as_one_evaluation(tmp_path):
    path = tmp_path / "per_query.parquet"
    pq.write_table(pa.table({"query_id": ["q1"], "step": [4], "mrr@10": [0.5]}), path)
    assert read_budgets(path, "mrr@10") == {-1: {"q1": 0.5}}
    write_per_query(path, {"q1": {"mrr@10": 1.0}}, step=8, pairs=64)  # the old row cannot be placed: replaced
    assert read_budgets(path, "mrr@10") == {64: {"q1": 1.0}}
