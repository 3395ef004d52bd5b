"""Typed config: YAML + dotted overrides, errors that name the key, every shipped job validates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from samtone_ray.core.config import CombinationError, Config, ConfigError, load_config, parse_overrides
from shipped import SAMTONE_JOB_CONFIGS

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_dataclass_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.train.batch_size == 64 and cfg.loss.same_tower == "both" and cfg.scaling.num_workers == 2


@pytest.mark.parametrize("path", SAMTONE_JOB_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_job_config_validates(path):
    cfg = load_config(path)
    if cfg.tune.space:
        from samtone_ray.tune.space import parse_space

        parse_space(cfg.tune.space, cfg)


def test_yaml_and_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: 32\nloss:\n  same_tower: none\n")
    cfg = load_config(path, ["train.lr=1e-4", "loss.bidirectional=false", "model.projection_dim=16"])
    assert cfg.train.batch_size == 32 and cfg.loss.same_tower == "none"
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.loss.bidirectional is False and cfg.model.projection_dim == 16
    flat = cfg.flat()
    assert flat["train.lr"] == pytest.approx(1e-4) and flat["loss.same_tower"] == "none"
    assert not any(k.startswith(("tune.", "registry.")) for k in flat)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["train.batchsize=3"], "train.batchsize"),
        (["nosuch.key=1"], "nosuch"),
        (["loss.same_tower=sideways"], "loss.same_tower"),
        (["train.batch_size=abc"], "train.batch_size"),
        (["train.batch_size=0"], "train.batch_size"),
        (["train.eval_max_docs=-1"], "train.eval_max_docs"),
        (["train.eval_max_docs=1.5"], "train.eval_max_docs"),
        (["loss.temperature=-1"], "loss.temperature"),
        (["loss.bidirectional=maybe"], "loss.bidirectional"),
        (["train.precision=fp8"], "train.precision"),
        (["train.batch_size=63"], "divisible by scaling.num_workers"),
        (["model.tower_mode=separate_shared_projection"], "model.projection_dim"),
        (["train"], "section.key=value"),
    ],
)
def test_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, overrides)


@pytest.mark.parametrize("override", ["train.weight_decay=.nan", "train.lr=inf", "loss.temperature=nan",
                                      "train.warmup_ratio=-.inf", "loss.temperature=1e999"])
def test_nan_and_infinite_floats_fail_at_load(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*finite"):
        load_config(None, [override])


def test_nan_inside_the_tuning_space_fails_at_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tune:\n  space:\n    train.lr: {uniform: [1.0e-5, .nan]}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*tune\.space\.train\.lr\.uniform\[1\].*finite"):
        load_config(path)


def test_directly_built_config_refuses_nan():
    from samtone_ray.core.config import LossConfig

    with pytest.raises(ConfigError, match="loss.temperature"):
        LossConfig(temperature=float("nan"))


@pytest.mark.parametrize("key, spec", [
    ("train.weight_decay", {"grid": [0.0, float("nan")]}),
    ("train.lr", {"choice": [1e-4, float("nan")]}),
    ("train.lr", {"loguniform": [float("nan"), 1e-3]}),
    ("train.seed", {"randint": [0, float("inf")]}),
    ("train.weight_decay", float("nan")),
])
def test_tuned_nan_or_infinite_values_fail_before_any_trial(key, spec):
    from samtone_ray.tune.space import parse_space

    with pytest.raises(ConfigError, match=f"tune\\.space\\.{key.replace('.', '[.]')}.*finite"):
        parse_space({key: spec}, Config())


def test_loss_knobs_load_validate_and_reach_the_params():
    cfg = load_config(None, ["loss.same_tower_weight=0.25", "loss.false_negative_margin=0.1"])
    assert cfg.loss.same_tower_weight == 0.25 and cfg.loss.false_negative_margin == pytest.approx(0.1)
    assert cfg.flat()["loss.same_tower_weight"] == 0.25
    defaults = load_config(None, ["loss.false_negative_margin=null"])
    assert defaults.loss.same_tower_weight == 1.0 and defaults.loss.false_negative_margin is None
    with pytest.raises(ConfigError, match=r"loss\.same_tower_weight.*>= 0"):
        load_config(None, ["loss.same_tower_weight=-0.5"])
    with pytest.raises(ConfigError, match=r"loss\.false_negative_margin"):
        load_config(None, ["loss.false_negative_margin=wide"])


def test_loss_knobs_are_tunable():
    from samtone_ray.tune.space import parse_space

    space = parse_space({"loss.same_tower_weight": {"grid": [0.0, 0.5, 1.0]},
                         "loss.false_negative_margin": {"grid": [None, 0.1]}}, Config())
    assert len(space.grid) == 6
    assert {"loss.same_tower_weight": 0.0, "loss.false_negative_margin": None} in space.grid
    with pytest.raises(ConfigError, match=r"tune\.space\.loss\.same_tower_weight.*>= 0"):
        parse_space({"loss.same_tower_weight": {"uniform": [-1.0, 1.0]}}, Config())


# ----------------------------------------------------------------- the old section name 'search'


def test_the_old_section_search_is_read_as_tune_with_a_future_warning_naming_the_file(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("search:\n  metric: ndcg@10\n  space:\n    loss.same_tower: {grid: [none, both]}\n")
    with pytest.warns(FutureWarning, match=r"old\.yaml: the config section 'search' is now 'tune'; 'search' goes in samtone-ray 0\.3"):
        cfg = load_config(path, ["tune.num_samples=2"])  # the new name in an override still applies
    assert cfg.tune.metric == "ndcg@10" and cfg.tune.num_samples == 2
    assert cfg.tune.space == {"loss.same_tower": {"grid": ["none", "both"]}}
    assert "search" not in cfg.to_dict() and cfg.to_dict()["tune"]["metric"] == "ndcg@10"


def test_the_old_section_in_a_dict_and_in_overrides_is_read_as_tune_with_a_future_warning():
    from samtone_ray.core.config import from_dict

    with pytest.warns(FutureWarning, match="the config section 'search' is now 'tune'"):
        assert from_dict({"search": {"grace_period": 3}}).tune.grace_period == 3
    with pytest.warns(FutureWarning, match=r"override search\.metric, search\.space\.train\.lr: the config section "
                                           r"'search' is now 'tune'") as caught:
        cfg = load_config(None, ["search.metric=recall@10", "search.space.train.lr=0.0001"])
    assert len(caught) == 1  # one warning per command line, naming every old key
    assert cfg.tune.metric == "recall@10" and cfg.tune.space == {"train.lr": 0.0001}
    with pytest.warns(FutureWarning, match="'search' is now 'tune'"):
        assert Config().with_overrides({"search.mode": "min"}).tune.mode == "min"
    with pytest.warns(FutureWarning, match="'search' is now 'tune'"):
        assert load_config(None, {"search": {"num_samples": 4}}).tune.num_samples == 4


def test_the_new_section_name_warns_nothing(tmp_path):
    import warnings

    path = tmp_path / "new.yaml"
    path.write_text("tune:\n  metric: ndcg@10\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(path, ["tune.num_samples=2", "tune.space.train.lr=1e-4"])
        cfg = cfg.with_overrides({"tune.mode": "min"})
    assert (cfg.tune.metric, cfg.tune.num_samples, cfg.tune.mode) == ("ndcg@10", 2, "min")


def test_both_section_names_at_once_is_an_error_naming_both(tmp_path):
    from samtone_ray.core.config import from_dict

    path = tmp_path / "both.yaml"
    path.write_text("search:\n  metric: ndcg@10\ntune:\n  metric: mrr@10\n")
    with pytest.raises(ConfigError, match=r"both\.yaml: both sections 'search' and 'tune' are set.*keep only 'tune'"):
        load_config(path)
    with pytest.raises(ConfigError, match="both sections 'search' and 'tune' are set"):
        from_dict({"search": {}, "tune": {}})
    with pytest.raises(ConfigError, match=r"both search\.metric and tune\.metric are set"):
        load_config(None, ["search.metric=ndcg@10", "tune.metric=mrr@10"])


def test_doc_side_negatives_need_both_directions():
    with pytest.raises(CombinationError, match="loss.same_tower=doc"):
        load_config(None, ["loss.same_tower=doc", "loss.bidirectional=false"])


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: [\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml.*train\.learning_rate"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_parse_overrides_reads_yaml_scalars():
    assert parse_overrides(["a.b=1", "a.c=true", "a.d=x", "a.e=[1, 2]"]) == {"a.b": 1, "a.c": True, "a.d": "x", "a.e": [1, 2]}


@pytest.mark.system
def test_cli_reports_config_errors_with_exit_code_2():
    proc = subprocess.run(
        [sys.executable, "-m", "samtone_ray.cli", "train", "--set", "train.batchsize=3"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "train.batchsize" in proc.stderr
