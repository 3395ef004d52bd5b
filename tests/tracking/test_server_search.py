"""A search whose tracking server loses its database mid-way (tests/servers.py: ``mlflow server``
on PostgreSQL, artifacts in S3): PostgreSQL is stopped as soon as the first trial has logged a
step, and started again a few seconds later, while the trials train and log over HTTP."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from samtone_ray.core.config import from_dict

pytestmark = pytest.mark.system

STEPS = 2  # one epoch of the 16 pairs at batch 8
OUTAGE_S = 5.0


def _rows(server, sql: str, *args) -> list[tuple]:
    with server.postgres.connect() as db, db.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def test_postgres_restarted_during_a_search_loses_no_step_and_promotes_only_whole_results(
    tracking_server, ray_cluster, tiny_model_dir, tmp_path
):
    """Every logging call the outage hits waits (MLflow's client retries the server's 5xx) and
    lands once the database is back: each trial's run holds every step, ends FINISHED, and the
    champion is the best trial, registered once. Had the outage reached the champion decision, it
    would be refused (test_server.py), never taken from what was logged before it."""
    import psycopg2
    from cluster.multinode import write_tiny_beir

    from samtone_ray.tune.tuner import tune

    name = f"m-{uuid.uuid4().hex[:8]}"
    (tmp_path / "beir").mkdir()
    data = write_tiny_beir(tmp_path / "beir", train_pairs=16, dev_queries=8)
    pg = tracking_server.postgres
    outage: dict[str, float] = {}
    done = threading.Event()

    def cut_database() -> None:
        """Stop PostgreSQL once a trial has logged its first step; start it again OUTAGE_S later."""
        while not done.is_set():
            try:
                logged = _rows(tracking_server, "SELECT count(*) FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
                               "JOIN experiments e ON e.experiment_id = r.experiment_id WHERE e.name = %s AND m.key = 'loss'",
                               name)[0][0]
            except psycopg2.Error:  # the experiment's tables are being written: ask again
                logged = 0
            if logged:
                outage["stopped"] = time.monotonic()
                pg.stop()
                time.sleep(OUTAGE_S)
                pg.start()
                outage["started"] = time.monotonic()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=cut_database, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        outcome = tune(from_dict({
            "name": "pg-outage", "output_dir": str(tmp_path / "out"),
            "model": {"name_or_path": str(tiny_model_dir), "query_max_length": 16, "doc_max_length": 32},
            "data": {"train": str(data), "eval": str(data)},
            "train": {"batch_size": 8, "max_steps": STEPS, "eval_every": STEPS, "log_every": 1},
            "scaling": {"num_workers": 1},
            "tracking": {"uri": tracking_server.uri, "experiment": name},
            "tune": {"space": {"train.lr": {"grid": [1e-3, 3e-3]}}},
            "registry": {"model_name": name},
        }))
    finally:
        done.set()
        watcher.join(60)
        if pg.proc is None:
            pg.start()
    took = time.monotonic() - started
    assert "started" in outage and outage["started"] - started < took, "the database was not cut during the search"
    print(f"\nPostgreSQL down {outage['started'] - outage['stopped']:.1f}s, from {outage['stopped'] - started:.1f}s into "
          f"a {took:.0f}s search of {len(outcome.leaderboard)} trials; champion: {outcome.champion}")

    trials = [row["run_id"] for row in outcome.leaderboard]
    assert len(trials) == 2
    for run in trials:  # every step of every trial, logged once
        steps = [r[0] for r in _rows(tracking_server, "SELECT step FROM metrics WHERE run_uuid = %s AND key = 'loss' "
                                     "ORDER BY step", run)]
        assert steps == list(range(1, STEPS + 1)), (run, steps)
    statuses = _rows(tracking_server, "SELECT status FROM runs WHERE run_uuid IN %s", (*trials, outcome.parent_run_id))
    assert sorted(s[0] for s in statuses) == ["FINISHED"] * 3
    assert outcome.champion and outcome.champion["promoted"], outcome.champion
    versions = _rows(tracking_server, "SELECT version, run_id FROM model_versions WHERE name = %s", name)
    alias = _rows(tracking_server, "SELECT version FROM registered_model_aliases WHERE name = %s AND alias = 'champion'", name)
    version = str(outcome.champion["version"])
    assert [(str(v), r) for v, r in versions] == [(version, outcome.best["run_id"])]
    assert [str(a[0]) for a in alias] == [version]
