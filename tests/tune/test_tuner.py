"""Tuning end to end (real Ray Tune, real MLflow SQLite), champion rule, resume, space errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from samtone_ray.core.config import ConfigError, from_dict
from samtone_ray.data.sources import bundled_sample_path, iter_jsonl, load_beir
from samtone_ray.tracking.registry import beats
from samtone_ray.evaluation.per_query import read_budgets
from samtone_ray.tune.layout import TuneLayout
from samtone_ray.tune.space import overrides_of, parse_space

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------- tuning-space errors (no Ray)


@pytest.mark.parametrize(
    "space,needle",
    [
        ({"loss.same_towr": {"grid": ["none"]}}, "tune.space.loss.same_towr"),
        ({"loss.same_tower": {"grid": []}}, "tune.space.loss.same_tower"),
        ({"train.batch_size": {"grid": [64, 33]}}, "tune.space.train.batch_size"),
        ({"loss.same_tower": {"grid": ["none", "sideways"]}}, "tune.space.loss.same_tower"),
        ({"loss.temperature": {"loguniform": [0, 0.1]}}, "tune.space.loss.temperature"),
        ({"loss.temperature": {"normal": [0, 1]}}, "tune.space.loss.temperature"),
        ({"train.lr": {"uniform": [1e-4]}}, "tune.space.train.lr"),
        ({"registry.model_name": {"grid": ["a"]}}, "tune.space.registry.model_name"),
        ({}, "tune.space"),
    ],
)
def test_bad_tuning_spaces_fail_before_any_trial_naming_the_key(space, needle):
    base = from_dict({"scaling": {"num_workers": 2}})
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        parse_space(space, base)


def test_invalid_combinations_are_skipped_with_a_reason():
    base = from_dict({})
    space = parse_space(
        {"loss.same_tower": {"grid": ["none", "query", "doc", "both"]}, "loss.bidirectional": {"grid": [True, False]}},
        base,
    )
    assert len(space.grid) == 7
    assert space.skipped == [
        ({"loss.same_tower": "doc", "loss.bidirectional": False}, pytest.approx(space.skipped[0][1]))
    ]
    assert "bidirectional" in space.skipped[0][1]


@pytest.mark.parametrize("algorithm", ["grid", "random", "optuna"])
def test_tuning_spaces_convert_for_every_algorithm(algorithm):
    from ray.tune.search.optuna import OptunaSearch

    base = from_dict({})
    space = parse_space(
        {"loss.same_tower": {"grid": ["none", "doc"]}, "loss.bidirectional": {"grid": [True, False]},
         "loss.temperature": {"loguniform": [0.01, 0.1]}, "train.lr": 1e-4},
        base,
    ).tune_space(algorithm)
    assert space["train.lr"] == 1e-4
    if algorithm == "grid":
        assert len(space["grid"]["grid_search"]) == 3  # doc + q->d only is left out
    else:  # random/optuna draw whole combinations, and only valid ones
        drawn = [overrides_of({"grid": c}) for c in space["grid"].categories]
        assert len(drawn) == 3 and {"loss.same_tower": "doc", "loss.bidirectional": False} not in drawn
        assert {"loss.same_tower": "doc", "loss.bidirectional": True} in drawn
    if algorithm == "optuna":  # optuna accepts the space (scalar categoricals, a log-uniform float)
        searcher = OptunaSearch(metric="mrr@10", mode="max")
        assert searcher.set_search_properties("mrr@10", "max", space)


@pytest.mark.parametrize(
    "settings,needle",
    [
        ({"train": {"checkpoint_every": 3, "eval_every": 2}}, "train.checkpoint_every=3"),
        ({"train": {"checkpoint_every": 2, "eval_every": 0}}, "train.checkpoint_every=2"),
        ({"data": {"eval": ""}}, "data.eval"),
        ({"tune": {"metric": "mrr@5"}}, "tune.metric"),
    ],
)
def test_tuning_runs_whose_reports_would_lack_the_metric_fail_before_starting(tmp_path, settings, needle):
    from samtone_ray.tune.tuner import tune

    cfg = from_dict({"output_dir": str(tmp_path / "out"), "tracking": {"uri": f"sqlite:///{tmp_path / 'm.db'}"},
                     "tune": {"space": {"loss.same_tower": "none"}}})
    cfg = cfg.with_overrides({f"{sec}.{k}": v for sec, kv in settings.items() for k, v in kv.items()})
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        tune(cfg)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.db").exists()  # nothing started


def test_grid_combinations_whose_reports_would_lack_the_metric_are_skipped_up_front():
    from samtone_ray.tune.tuner import _check_reports

    base = from_dict({"train": {"eval_every": 2}})
    space = parse_space({"train.checkpoint_every": {"grid": [0, 3, 4]}}, base)
    _check_reports(base, space)
    assert space.grid == [{"train.checkpoint_every": 0}, {"train.checkpoint_every": 4}]
    assert [c for c, _ in space.skipped] == [{"train.checkpoint_every": 3}]
    assert "train.eval_every=2" in space.skipped[0][1]
    only_bad = parse_space({"train.checkpoint_every": {"grid": [3]}}, base)
    with pytest.raises(ConfigError, match="train.checkpoint_every=3"):
        _check_reports(base, only_bad)


@pytest.mark.parametrize(
    "batch_sizes,eval_every,grace,first",
    [([64, 256], 25, 1, 6400), ([64], 25, 1, 1600), ([4, 8], 2, 1, 16), ([48, 64], 10, 2, 2 * 1920)],
)
def test_asha_milestones_fall_on_every_trials_evaluations(batch_sizes, eval_every, grace, first):
    from samtone_ray.tune.tuner import asha_pairs

    base = from_dict({"train": {"eval_every": eval_every}, "tune": {"grace_period": grace}})
    space = parse_space({"train.batch_size": {"grid": batch_sizes}}, base)
    assert asha_pairs(base, space) == first
    for milestone in (first << k for k in range(6)):  # ASHA's milestones with reduction factor 2
        for batch in batch_sizes:  # every trial evaluates exactly there: equal data at each rung
            assert milestone % (eval_every * batch) == 0


@pytest.mark.system  # a `samtone tune` process of its own
def test_cli_rejects_a_bad_space_before_starting_ray(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"tune": {"space": {"train.batch_size": {"grid": [64, 3]}}}}))
    proc = subprocess.run([sys.executable, "-m", "samtone_ray.cli", "tune", "--config", str(cfg)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "tune.space.train.batch_size" in proc.stderr
    assert not (tmp_path / ".samtone").exists()  # nothing started, nothing written


def test_the_leaderboard_and_the_tuner_share_a_layout_module_not_each_other():
    import ast

    import samtone_ray.tune.leaderboard as leaderboard

    tree = ast.parse(Path(leaderboard.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "samtone_ray.tune.tuner" not in imported and "samtone_ray.tune.layout" in imported


def _legacy_state(out: Path, config: dict, parent_run_id: str | None = None) -> None:
    """The state of a study started before the rename: ``search.json``, its config's section ``search``."""
    config = dict(config)
    config["search"] = config.pop("tune")
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps({"config": config, "parent_run_id": parent_run_id, "started": 0.0}))


def test_the_state_is_tune_json_and_an_older_studys_search_json_is_read_when_alone(tmp_path):
    from samtone_ray.tune.layout import TuneLayout

    layout = TuneLayout(tmp_path)
    assert layout.state.name == layout.saved_state.name == "tune.json"
    _legacy_state(tmp_path, from_dict({"tune": {"metric": "ndcg@10"}}).to_dict())
    assert layout.saved_state.name == "search.json" and layout.state.name == "tune.json"  # read old, write new
    with pytest.warns(FutureWarning, match=r"search\.json: the config section 'search' is now 'tune'"):
        state = layout.read_state()
    assert "search" not in state["config"] and from_dict(state["config"]).tune.metric == "ndcg@10"
    (tmp_path / "tune.json").write_text(json.dumps({"config": from_dict({}).to_dict(), "parent_run_id": "p"}))
    assert layout.saved_state.name == "tune.json" and layout.read_state()["parent_run_id"] == "p"


@pytest.mark.system  # a `samtone tune` process of its own
def test_cli_resume_finds_an_older_studys_search_json(tmp_path):
    # A grid that fails validation: the resume stops before Ray, after reading the old state.
    _legacy_state(tmp_path / "out", from_dict({"output_dir": str(tmp_path / "out"),
                                               "tune": {"space": {"train.batch_size": {"grid": [64, 3]}}}}).to_dict())
    proc = subprocess.run([sys.executable, "-m", "samtone_ray.cli", "tune", "--resume", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "nothing to resume" not in proc.stderr and "tune.space.train.batch_size" in proc.stderr
    assert "search.json: the config section 'search' is now 'tune'" in proc.stderr


def test_champion_rule_is_strict_and_mode_aware():
    assert beats(0.5, None, "max")
    assert beats(0.51, 0.5, "max") and not beats(0.5, 0.5, "max") and not beats(0.49, 0.5, "max")
    assert beats(0.4, 0.5, "min") and not beats(0.6, 0.5, "min")
    assert not beats(0.52, 0.5, "max", min_delta=0.02) and beats(0.53, 0.5, "max", min_delta=0.02)
    assert not beats(0.48, 0.5, "min", min_delta=0.02) and beats(0.47, 0.5, "min", min_delta=0.02)


# ----------------------------------------------------------------- a tiny real tuning run


@pytest.fixture(scope="module")
def tiny_beir(tmp_path_factory):
    """A small BEIR folder cut from the bundled sample: 48 train pairs, 20 dev queries, 150 docs."""
    src = bundled_sample_path()
    dev = load_beir(src, "dev")
    root = tmp_path_factory.mktemp("beir")
    (root / "qrels").mkdir()
    train_rows = (src / "qrels" / "train.tsv").read_text().splitlines()[1:49]
    dev_q = sorted(dev.qrels)[:20]
    dev_rows = [f"{q}\t{d}\t{r}" for q in dev_q for d, r in dev.qrels[q].items()]
    needed_q = {r.split("\t")[0] for r in train_rows} | set(dev_q)
    needed_d = {r.split("\t")[1] for r in train_rows + dev_rows}
    distractors = 150 - len(needed_d)
    with (root / "corpus.jsonl").open("w") as fh:
        for _, rec in iter_jsonl(src / "corpus.jsonl"):
            if rec["_id"] in needed_d or distractors > 0:
                if rec["_id"] not in needed_d:
                    distractors -= 1
                fh.write(json.dumps(rec) + "\n")
    with (root / "queries.jsonl").open("w") as fh:
        for _, rec in iter_jsonl(src / "queries.jsonl"):
            if rec["_id"] in needed_q:
                fh.write(json.dumps(rec) + "\n")
    header = "query-id\tcorpus-id\tscore\n"
    (root / "qrels" / "train.tsv").write_text(header + "\n".join(train_rows) + "\n")
    (root / "qrels" / "dev.tsv").write_text(header + "\n".join(dev_rows) + "\n")
    return root


def _tune_cfg(tiny_model_dir, tiny_beir, out, uri, **extra):
    cfg = {
        "name": "t",
        "output_dir": str(out),
        "model": {"name_or_path": str(tiny_model_dir), "query_max_length": 16, "doc_max_length": 32},
        "data": {"train": str(tiny_beir), "eval": str(tiny_beir)},
        "train": {"batch_size": 8, "lr": 1e-3, "max_steps": 4, "eval_every": 2, "log_every": 1},
        "scaling": {"num_workers": 1},
        "tracking": {"uri": uri, "experiment": "tests"},
        "tune": {
            "scheduler": "asha",
            "space": {"loss.same_tower": {"grid": ["none", "both"]}, "train.batch_size": {"grid": [4, 8]}},
        },
        "registry": {"model_name": "tiny"},
    }
    for key, value in extra.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.update({key: value})
    return from_dict(cfg)


# The placement groups the module's tuning run created (its trials' worker groups).
_TUNING_GROUPS: set[str] = set()


def _groups() -> dict[str, dict]:
    import ray.util

    return ray.util.placement_group_table()


@pytest.fixture(scope="module")
def tuned(ray_cluster, tiny_model_dir, tiny_beir, tmp_path_factory):
    from samtone_ray.tune.tuner import tune

    before = set(_groups())
    root = tmp_path_factory.mktemp("tuned")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # Every evaluation searches the 20 queries' judged documents plus a fixed sample: 60 of 150.
    cfg = _tune_cfg(tiny_model_dir, tiny_beir, root / "out", uri, train={"eval_max_docs": 60})
    outcome = tune(cfg)
    _TUNING_GROUPS.update(set(_groups()) - before)
    return outcome, cfg, uri


def test_tuning_runs_every_valid_trial_and_writes_the_leaderboard(tuned):
    outcome, cfg, _ = tuned
    trials = [r for r in outcome.leaderboard if r["trial"] != "-"]
    assert len(trials) == 4
    assert {(r["settings"]["same_tower"], r["settings"]["batch_size"]) for r in trials} == {
        ("none", 4), ("none", 8), ("both", 4), ("both", 8)
    }
    assert {r["status"] for r in trials} <= {"finished", "stopped"}
    assert any(r["status"] == "finished" for r in trials)
    for r in trials:
        assert 0.0 <= r["metrics"]["mrr@10"] <= 1.0
    csv = (outcome.output_dir / "leaderboard.csv").read_text().splitlines()
    assert csv[0].startswith("trial,same_tower,bidirectional,temperature,same_tower_weight,false_negative_margin,"
                             "batch_size,lr,mrr@10,ci_low,ci_high,diff_vs_ref,diff_low,diff_high,p_value,vs_ref_pairs,verdict")
    assert len(csv) == 1 + len(outcome.leaderboard)
    assert (outcome.output_dir / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"
    # Each trial's per-query values are its reported metric's, with an interval around it; its row
    # shows the config the trial wrote as it started, which its MLflow run logged too.
    for r in trials:
        trial = TuneLayout(outcome.output_dir).trial(r["trial"])
        assert trial.read_config().flat() == r["flat"]
        assert (r["flat"]["loss.same_tower"], r["flat"]["train.batch_size"]) == (r["settings"]["same_tower"], r["settings"]["batch_size"])
        evaluations = read_budgets(trial.per_query, "mrr@10")
        values = evaluations[max(evaluations)]  # the last evaluation, whose mean the trial reported
        assert len(values) == 20 and sum(values.values()) / 20 == pytest.approx(r["metrics"]["mrr@10"])
        assert r["ci"].low <= r["metrics"]["mrr@10"] <= r["ci"].high
    refs = [r for r in trials if r["verdict"] == "reference"]
    assert len(refs) == 1 and refs[0]["settings"]["same_tower"] == "none"
    assert all(r["vs_reference"] is not None for r in trials if r is not refs[0])
    # Each comparison is at the largest budget both trials were evaluated at: the pairs both saw.
    budgets = {r["trial"]: set(read_budgets(TuneLayout(outcome.output_dir).trial(r["trial"]).per_query, "mrr@10")) for r in trials}
    assert all(max(b) == r["pairs"] for r, b in zip(trials, budgets.values()))
    for r in trials:
        if r is not refs[0]:
            assert r["vs_ref_pairs"] == max(budgets[r["trial"]] & budgets[refs[0]["trial"]])
    # The best row really is the best finished trial by the metric.
    finished = [r for r in trials if r["status"] == "finished"]
    assert outcome.best["metrics"]["mrr@10"] == max(r["metrics"]["mrr@10"] for r in finished)


def test_asha_compares_trials_at_equal_training_pairs(tuned):
    outcome, cfg, _ = tuned
    trials = [r for r in outcome.leaderboard if r["trial"] != "-"]
    first_milestone = 16  # grace 1 x lcm(2 steps x 4 pairs, 2 steps x 8 pairs)
    for row in trials:
        results = TuneLayout(outcome.output_dir).tune_results(row["trial"])
        reports = [json.loads(line) for line in results.read_text().splitlines()]
        batch = row["settings"]["batch_size"]
        assert all(r["pairs"] == r["step"] * batch for r in reports)  # ASHA's clock is in every report
        # Each trial reports exactly at the milestone, so ASHA's first rung holds equal-data values.
        assert first_milestone in [r["pairs"] for r in reports]
        assert row["pairs"] == row["steps"] * batch == reports[-1]["pairs"]
    header = (outcome.output_dir / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert "pairs" in header


@pytest.mark.parametrize(
    "algorithm,space,needle",
    [
        ("random", {"loss.same_tower": {"choice": ["doc"]}, "loss.bidirectional": {"choice": [False]}}, "bidirectional"),
        ("optuna", {"loss.same_tower": {"choice": ["doc"]}, "loss.bidirectional": {"choice": [False]}}, "bidirectional"),
        ("random", {"loss.same_tower": "none", "train.checkpoint_every": {"choice": [3]}}, "train.checkpoint_every=3"),
    ],
)
def test_a_skipped_draw_reports_the_metric_and_is_a_skipped_row(ray_cluster, tiny_model_dir, tiny_beir, tmp_path,
                                                                 algorithm, space, needle):
    from samtone_ray.tune.tuner import tune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _tune_cfg(tiny_model_dir, tiny_beir, tmp_path / "out", uri,
                      tune={"algorithm": algorithm, "num_samples": 2, "scheduler": "asha", "space": space})
    outcome = tune(cfg)
    rows = [r for r in outcome.leaderboard if r["trial"] != "-"]
    assert len(rows) == 2
    for row in rows:  # Tune accepted the reports: no error, and the reason is kept
        assert row["status"] == "skipped" and needle in row["reason"] and row["metrics"] == {}
    assert outcome.best is None and outcome.champion is None


def test_a_tuning_run_failing_after_its_parent_run_started_marks_it_failed(ray_cluster, tiny_model_dir, tiny_beir, tmp_path):
    from mlflow import MlflowClient

    from samtone_ray.tune.tuner import tune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _tune_cfg(tiny_model_dir, tiny_beir, tmp_path / "out", uri, tune={"space": {"loss.same_tower": "none"}})
    cfg = cfg.with_overrides({"model.name_or_path": str(tmp_path / "no-such-model")})
    with pytest.raises(Exception, match="no-such-model"):
        tune(cfg, zero_shot=True)  # the zero-shot reference fails once the parent run exists
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("tests").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_stopped_trials_release_their_workers(tuned, ray_cluster):
    # Ray Train's PlacementGroupCleaner frees a stopped trial's workers once it sees the trial's
    # controller gone; on a loaded 2-core machine that poll can lag by tens of seconds. Only the
    # tuning run's own groups count: a group another test left behind is not this test's failure.
    deadline = time.time() + 300
    assert _TUNING_GROUPS, "the tuning run created no placement group: nothing was checked"
    while (held := {g for g, pg in _groups().items() if g in _TUNING_GROUPS and pg["state"] != "REMOVED"}) and time.time() < deadline:
        time.sleep(0.5)
    assert not held, f"placement groups of the tuning run still hold resources: {sorted(held)}"


def test_mlflow_has_a_parent_run_with_a_child_per_trial(tuned):
    from mlflow import MlflowClient

    outcome, cfg, uri = tuned
    c = MlflowClient(uri)
    parent = c.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert json.loads(parent.data.params["tune.space"]) == cfg.tune.space
    assert outcome.eval_corpus == "60 of 150 documents (relevant + fixed sample)"
    assert (parent.data.params["eval_docs"], parent.data.params["eval_docs_total"]) == ("60", "150")
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")
    assert len(children) == 4
    for child in children:
        assert child.data.params["train.batch_size"] in ("4", "8")
        assert child.data.params["loss.same_tower"] in ("none", "both")
        assert (child.data.params["eval_docs"], child.data.params["eval_docs_total"]) == ("60", "150")
        assert child.data.tags["samtone.status"] in ("finished", "stopped")
        assert child.info.status in ("FINISHED", "KILLED")
        assert c.get_metric_history(child.info.run_id, "eval/mrr_at_10")
        assert "per_query.parquet" in {a.path for a in c.list_artifacts(child.info.run_id)}
    artifacts = {a.path for a in c.list_artifacts(outcome.parent_run_id)}
    assert {"leaderboard.csv", "leaderboard.png"} <= artifacts


def test_best_model_is_registered_as_champion(tuned):
    import mlflow
    from mlflow import MlflowClient

    from samtone_ray.data.sources import load_data
    from samtone_ray.evaluation.retrieval import evaluate_model
    from samtone_ray.model.towers import DualEncoder

    outcome, cfg, uri = tuned
    c = MlflowClient(uri, registry_uri=uri)
    champion = c.get_model_version_by_alias("tiny", "champion")
    assert int(champion.version) == outcome.champion["version"] and outcome.champion["promoted"]
    assert champion.run_id == outcome.best["run_id"]
    # The champion rule scored the candidate on the tuning run's bounded corpus: the saved model,
    # evaluated here on the documents load_data picks, gives the same number.
    assert (champion.tags["eval_docs"], champion.tags["eval_docs_total"]) == ("60", "150")
    _, split = load_data(cfg)
    assert len(split.corpus) == 60
    model = DualEncoder.from_pretrained(outcome.best["model_dir"])
    assert evaluate_model(model, split, cfg.train.eval_batch_size, cfg.train.precision)["mrr@10"] == pytest.approx(
        outcome.champion["candidate_metric"], abs=1e-9)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # other tests point the process-wide registry at their own stores
    emb = mlflow.pyfunc.load_model("models:/tiny@champion").predict(["debian package"])
    assert emb.shape == (1, 32)


def test_models_command_lists_versions_and_aliases(tuned, capsys):
    from samtone_ray.cli import main

    _, _, uri = tuned
    assert main(["models", "tiny", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "champion" in out and "mrr@10" in out


def test_a_failed_trial_is_an_error_row_and_a_failed_run_and_the_tuning_goes_on(ray_cluster, tiny_model_dir, tiny_beir, tmp_path):
    from mlflow import MlflowClient

    from samtone_ray.tune.tuner import tune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # fail_at_step=1 with no restarts allowed: that trial dies before its first report.
    cfg = _tune_cfg(
        tiny_model_dir, tiny_beir, tmp_path / "out", uri,
        scaling={"max_failures": 0},
        tune={"scheduler": "none", "max_concurrent_trials": 1,
              "space": {"loss.same_tower": "none", "train.fail_at_step": {"grid": [0, 1]}}},
    )
    outcome = tune(cfg)
    rows = {r["settings"]["train.fail_at_step"]: r for r in outcome.leaderboard}
    assert rows[1]["status"] == "error" and rows[0]["status"] == "finished"
    assert outcome.best["trial"] == rows[0]["trial"] and outcome.champion["promoted"]
    c = MlflowClient(uri)
    failed = c.get_run(rows[1]["run_id"])
    assert failed.info.status == "FAILED" and failed.data.tags["samtone.status"] == "error"
    # The tuned key outside the standard columns has a leaderboard column of its own.
    header = (outcome.output_dir / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert header[1:9] == ["same_tower", "bidirectional", "temperature", "same_tower_weight", "false_negative_margin",
                           "batch_size", "lr", "train.fail_at_step"]
    assert c.get_run(rows[0]["run_id"]).info.status == "FINISHED"


# ----------------------------------------------------------------- resume after an interrupted tuning run


def test_interrupted_tuning_run_resumes_without_rerunning_finished_trials(ray_cluster, tiny_model_dir, tiny_beir, tmp_path):
    from mlflow import MlflowClient

    from samtone_ray.tune.tuner import tune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _tune_cfg(
        tiny_model_dir, tiny_beir, tmp_path / "out", uri,
        tune={"scheduler": "none", "max_concurrent_trials": 1, "space": {"loss.same_tower": {"grid": ["none", "both"]}}},
    )
    config_file = tmp_path / "tune.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    env = os.environ | {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "samtone_ray.cli", "tune", "--config", str(config_file)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    trials = tmp_path / "out" / "trials"
    deadline = time.time() + 600
    while time.time() < deadline and not _terminated_trials(tmp_path / "out" / "tune"):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-run, as on a lost head node
    proc.wait()
    first_done = _terminated_trials(tmp_path / "out" / "tune")
    assert first_done, "no trial finished before the interruption"
    assert len(first_done) < 2, "the tuning run ended before it could be interrupted"
    stamps = {t: (trials / t / "model").stat().st_mtime_ns for t in first_done}
    # A study started before the rename resumes too: its state was search.json, section 'search'.
    state = json.loads((tmp_path / "out" / "tune.json").read_text())
    (tmp_path / "out" / "tune.json").unlink()
    _legacy_state(tmp_path / "out", state["config"], state["parent_run_id"])

    with pytest.warns(FutureWarning, match=r"search\.json: the config section 'search' is now 'tune'"):
        outcome = tune(cfg, resume=True)
    assert outcome.parent_run_id == state["parent_run_id"]  # the same MLflow parent run, continued
    assert json.loads((tmp_path / "out" / "tune.json").read_text())["config"]["tune"] == cfg.to_dict()["tune"]
    rows = [r for r in outcome.leaderboard if r["trial"] != "-"]
    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows)
    for t in first_done:  # finished before the kill: not trained again
        assert (trials / t / "model").stat().st_mtime_ns == stamps[t]
    c = MlflowClient(uri)
    children = c.search_runs([c.get_experiment_by_name("tests").experiment_id],
                             f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")
    per_trial = {}
    for child in children:
        per_trial.setdefault(child.data.tags["samtone.trial_id"], []).append(child)
    # One run per trial, including the one cut off mid-training: its restart continued that run.
    assert sorted(per_trial) == sorted(r["trial"] for r in rows)
    for runs in per_trial.values():
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def _terminated_trials(tune_dir: Path) -> list[str]:
    """Trials that Tune's saved experiment state records as finished."""
    states = sorted(tune_dir.glob("experiment_state-*.json"))
    if not states:
        return []
    try:
        data = json.loads(states[-1].read_text())
    except json.JSONDecodeError:  # caught mid-write
        return []
    done = []
    for entry in data["trial_data"]:
        trial = json.loads(entry[0])
        if trial.get("status") == "TERMINATED":
            done.append(trial["trial_id"])
    return sorted(done)


# ----------------------------------------------------------------- what `samtone tune` prints


def _cli_tune(cfg, tmp_path, capsys, *flags):
    from samtone_ray.cli import main

    config_file = tmp_path / "tune.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    code = main(["tune", "--config", str(config_file), "--no-baseline", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_tune_prints_a_plan_progress_the_leaderboard_and_next_steps_and_sends_rays_output_to_its_log(
        ray_cluster, tiny_model_dir, tiny_beir, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Two trials one after the other; the second fails at its first step, so the run shows both ends.
    cfg = _tune_cfg(tiny_model_dir, tiny_beir, tmp_path / "out", uri, scaling={"max_failures": 0},
                    tune={"scheduler": "none", "max_concurrent_trials": 1,
                          "space": {"loss.same_tower": "none", "train.fail_at_step": {"grid": [0, 1]}}})
    code, out, err = _cli_tune(cfg, tmp_path, capsys)
    assert code == 0, err
    log = tmp_path / "out" / "ray.log"
    lines = out.splitlines()
    assert lines[0].startswith("# plan: tuning ") and "# resolved config" not in out
    plan = out[: out.index("\n[")]  # up to the first progress line
    assert "train.fail_at_step: 0, 1 (grid)" in plan and f"{log} (Tune's status tables" in plan and uri in plan, out
    assert any(" trial " in line and " started: train.fail_at_step=0" in line for line in lines)
    assert any(" trial " in line and " finished: mrr@10 " in line for line in lines)
    assert any("trials 2/2 done (1 finished, 0 stopped early, 1 errored), 0 running | best mrr@10 " in line
               for line in lines)
    assert "# leaderboard (mrr@10" in out and "champion: models:/tiny@champion (version 1)" in out
    assert out.index("# plan") < out.index("trials 2/2 done") < out.index("# leaderboard") < out.index("# next")
    assert (f"samtone serve --set tracking.uri={uri} --model models:/tiny@champion --index {tiny_beir}" in out
            and f"samtone encode --set tracking.uri={uri} --model models:/tiny@champion --input {tiny_beir}/corpus.jsonl"
            in out)
    # The failed trial reaches the terminal, naming the log; Ray's own output does not.
    assert "error: trial " in err and " failed: " in err and "/out/tune/" in err and str(log) in err
    for ray_output in ("Trial status:", "Configuration for experiment", "RayTrainWorker pid=", "TrainController pid="):
        assert ray_output not in out and ray_output not in err, ray_output
    text = log.read_text()
    assert "Trial status:" in text and "Configuration for experiment" in text  # Tune's tables
    assert "RayTrainWorker pid=" in text or "TrainController pid=" in text  # the workers' output
    assert "Autoscaler status" not in text  # of the monitor's log, only its events (as Ray shows them)


def test_tune_verbose_keeps_rays_output_on_the_terminal(ray_cluster, tiny_model_dir, tiny_beir, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _tune_cfg(tiny_model_dir, tiny_beir, tmp_path / "out", uri,
                    tune={"scheduler": "none", "space": {"loss.same_tower": "none"}})
    code, out, err = _cli_tune(cfg, tmp_path, capsys, "--verbose")
    assert code == 0, err
    assert "# resolved config" in out and "# plan: tuning " in out
    assert "Configuration for experiment" in out and "Trial status:" in out  # Tune's tables, as before
    assert "trials 1/1 done" not in out  # no progress view beside them
    assert "# leaderboard" in out and "samtone serve --set tracking.uri=" in out
    assert not (tmp_path / "out" / "ray.log").exists()
