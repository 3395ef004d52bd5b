"""``data.negatives: bm25 | dense``: mined before training, once per setting, shared by every run
and trial that asks for the same setting."""

from __future__ import annotations

import shutil

import pytest

from samtone_ray.core.config import CombinationError, ConfigError, load_config
from samtone_ray.data.sources import load_training_pairs
from samtone_ray.mining.prepare import check_not_sampled, prepare_negatives


def config(data, **overrides):
    return load_config(None, {"data.train": str(data), "data.negatives": "bm25", "data.num_hard_negatives": 2,
                              "mining.num_negatives": 2} | overrides)


def test_a_setting_is_mined_once_and_trains_as_it_is(tiny_sample, tmp_path, caplog):
    caplog.set_level("INFO", logger="samtone_ray.mining.prepare")
    first = prepare_negatives(config(tiny_sample), tmp_path)
    mined = tmp_path / first.data.train.rsplit("/", 1)[1]
    stamp = mined.stat().st_mtime_ns
    assert f"hard negatives: bm25 mined into {mined}" in caplog.text and "removed by positive" in caplog.text
    # Other training settings, same mining setting: the same file, not mined again.
    again = prepare_negatives(config(tiny_sample, **{"train.lr": 1e-4, "loss.temperature": 0.1}), tmp_path)
    assert again.data.train == first.data.train and mined.stat().st_mtime_ns == stamp
    assert f"hard negatives: {mined} (mined before with these settings)" in caplog.text
    assert first.data.negatives == "file"
    pairs = load_training_pairs(first.data.train, num_negatives=first.data.num_hard_negatives)
    assert len(pairs) > 0 and pairs.has_negatives


def test_another_mining_setting_or_other_data_is_mined_apart(tiny_sample, tmp_path):
    base = prepare_negatives(config(tiny_sample), tmp_path).data.train
    margin = prepare_negatives(config(tiny_sample, **{"mining.relative_margin": 0.05}), tmp_path).data.train
    copy = shutil.copytree(tiny_sample, tmp_path / "copy")
    same_bytes = prepare_negatives(config(copy), tmp_path).data.train
    qrels = copy / "qrels" / "train.tsv"
    qrels.write_text("\n".join(qrels.read_text().splitlines()[:-1]) + "\n")
    changed = prepare_negatives(config(copy), tmp_path).data.train
    assert len({base, margin, changed}) == 3
    assert same_bytes == base  # the key is the data's content, not its path


def test_dense_mining_is_keyed_by_the_model(tiny_sample, st_model_dir, tiny_model_dir, tmp_path):
    dense = {"data.negatives": "dense", "data.mining_model": str(st_model_dir)}
    a = prepare_negatives(config(tiny_sample, **dense), tmp_path).data.train
    b = prepare_negatives(config(tiny_sample, **dense | {"data.mining_model": str(tiny_model_dir)}), tmp_path).data.train
    assert a != b and "dense-" in a
    assert len(load_training_pairs(a, num_negatives=2)) > 0


def test_other_negative_sources_are_left_as_they_are(tmp_path):
    cfg = load_config(None, {"data.negatives": "none"})
    assert prepare_negatives(cfg, tmp_path) is cfg and not list(tmp_path.iterdir())


@pytest.mark.parametrize(("overrides", "message"), [
    ({"data.negatives": "none", "data.num_hard_negatives": 2}, "data.negatives=none trains without hard negatives"),
    ({"data.negatives": "bm25"}, "data.negatives=bm25 mines hard negatives that data.num_hard_negatives=0"),
])
def test_a_source_and_a_count_that_disagree_are_a_combination_error(overrides, message):
    with pytest.raises(CombinationError, match=message):
        load_config(None, overrides)


def test_a_search_may_vary_the_mining_only_as_a_grid():
    check_not_sampled({"loss.temperature", "data.num_hard_negatives"})
    with pytest.raises(ConfigError, match=r"tune.space samples mining.relative_margin: .* only as a grid"):
        check_not_sampled({"mining.relative_margin", "train.lr"})
    with pytest.raises(ConfigError, match="tune.space samples data.negatives"):
        check_not_sampled({"data.negatives"})


def test_a_tuning_run_sampling_the_source_stops_before_ray(tmp_path):
    import ray

    from samtone_ray.tune.tuner import tune

    cfg = load_config(None, {"output_dir": str(tmp_path / "run"), "data.num_hard_negatives": 2,
                             "tune.algorithm": "random",
                             "tune.space": {"data.negatives": {"choice": ["bm25", "dense"]}}})
    ray_was_up = ray.is_initialized()  # another test's session cluster may be
    with pytest.raises(ConfigError, match="tune.space samples data.negatives"):
        tune(cfg, verbose=True)
    assert ray.is_initialized() == ray_was_up
    assert not (tmp_path / "run" / "tune.json").exists()  # refused before the run wrote anything


def test_each_mining_setting_of_a_search_is_mined_once_and_its_trials_train_on_it(ray_cluster, tiny_model_dir,
                                                                                   tiny_sample, tmp_path, monkeypatch):
    """A grid over the mining (two margins) and the loss (two strategies): two settings mined,
    once each, before the trials; each trial trains on its own setting's file, which is the file
    mining that setting alone gives."""
    import json

    from samtone_ray.tune.tuner import tune

    monkeypatch.chdir(tmp_path)  # the mined files' cache, .samtone/cache/mined, is relative to it
    settings = {
        "output_dir": str(tmp_path / "run"), "model.name_or_path": str(tiny_model_dir), "model.query_max_length": 16,
        "model.doc_max_length": 32, "data.train": str(tiny_sample), "data.negatives": "bm25",
        "data.num_hard_negatives": 2, "mining.num_negatives": 2, "train.batch_size": 8, "train.max_steps": 1,
        "train.eval_max_docs": 100, "scaling.num_workers": 1, "tracking.enabled": False, "tune.scheduler": "none"}
    cfg = load_config(None, settings | {"tune.space": {"loss.same_tower": {"grid": ["none", "both"]},
                                                       "mining.relative_margin": {"grid": [None, 0.05]}}})
    outcome = tune(cfg)
    mined = sorted((tmp_path / ".samtone" / "cache" / "mined").glob("*.parquet"))
    assert len(mined) == 2  # one file per mining setting, not per trial
    trials = [json.loads(p.read_text()) for p in (tmp_path / "run" / "trials").glob("*/config.json")]
    assert len(trials) == 4
    for margin in (None, 0.05):
        alone = prepare_negatives(load_config(None, settings | {"mining.relative_margin": margin}), tmp_path / "alone")
        used = {t["data"]["train"] for t in trials if t["mining"]["relative_margin"] == margin}
        assert used == {str(tmp_path / ".samtone" / "cache" / "mined" / alone.data.train.rsplit("/", 1)[1])}
    assert all(t["data"]["negatives"] == "file" for t in trials)
    assert [row["status"] for row in outcome.leaderboard if row["trial"] != "-"] == ["finished"] * 4
