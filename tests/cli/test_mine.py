"""``samtone mine`` through ``main``: what it prints, what it writes, and flag errors (exit 2)."""

from __future__ import annotations

import json
import re

import pytest

from samtone_ray.cli import main
from samtone_ray.data.sources import load_training_pairs

NO_TRACKING = ["--set", "tracking.enabled=false"]


def test_mine_writes_the_pairs_and_prints_what_each_filter_removed(tmp_path, capsys):
    out = tmp_path / "mined.parquet"
    rc = main(["mine", "--data", "bundled:debian", "--out", str(out), "--num-negatives", "4",
               "--relative-margin", "0.05", "--drop-empty", *NO_TRACKING])
    printed = capsys.readouterr().out
    assert rc == 0
    summary = json.loads(out.with_name("mined.summary.json").read_text())
    assert summary["mining"]["num_negatives"] == 4 and summary["mining"]["relative_margin"] == 0.05
    assert summary["mining"]["range_min"] == 0  # a flag left out keeps MiningConfig's default
    removed = summary["report"]["removed"]
    assert re.search(rf"removed by relative_margin +{removed['relative_margin']} ", printed)
    assert f"{summary['report']['short_queries']} queries got fewer than 4 negatives" in printed
    # The queries left without negatives lose their pairs, so train takes the file with 4 negatives a pair.
    assert summary["dropped_pairs"] > 0 and f"left out {summary['dropped_pairs']} pairs" in printed
    assert len(load_training_pairs(out, num_negatives=4)) == summary["pairs"] == 3013 - summary["dropped_pairs"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--range-min", "5", "--range-max", "6"], "mining.range_max=6 leaves 1 candidates after mining.range_min=5"),
    (["--retriever", "dense"], "the dense retriever needs a model (--model URI)"),
    (["--retriever", "dense", "--model", "/no/such/model"], "model '/no/such/model' is neither"),
    (["--min-score", "0.9", "--max-score", "0.1"], "mining.min_score=0.9 is above mining.max_score=0.1"),
])
def test_bad_settings_exit_2_with_the_reason(tmp_path, capsys, flags, message):
    out = tmp_path / "mined.parquet"
    assert main(["mine", "--data", "bundled:debian", "--out", str(out), *flags, *NO_TRACKING]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_bad_flag_value_is_a_usage_error_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["mine", "--data", "bundled:debian", "--out", str(tmp_path / "x.parquet"), "--num-negatives", "0"])
    assert exit_.value.code == 2
    assert "--num-negatives: must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.mlflow
def test_mine_logs_its_settings_and_report_to_mlflow(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "mined.parquet"
    assert main(["mine", "--data", "bundled:debian", "--out", str(out), "--max-score", "20",
                 "--set", f"tracking.uri={uri}"]) == 0
    run_id = capsys.readouterr().out.split("mlflow run: ")[1].split()[0]
    run = MlflowClient(uri).get_run(run_id)
    summary = json.loads(out.with_name("mined.summary.json").read_text())
    assert run.data.params["mining.max_score"] == "20.0" and run.data.params["retriever"] == "bm25"
    assert run.data.metrics["removed.max_score"] == summary["report"]["removed"]["max_score"] > 0
    assert [a.path for a in MlflowClient(uri).list_artifacts(run_id)] == ["mined.summary.json"]
