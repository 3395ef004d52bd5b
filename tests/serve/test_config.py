"""The `serve deploy` configs: jobs/serve.yaml and `samtone serve --print-config` pass Ray's own
ServeDeploySchema, and their user_config is a valid serve section. No Ray cluster needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from samtone_ray.core.config import ConfigError, from_dict

ROOT = Path(__file__).resolve().parents[2]


def _check(doc: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(doc)
    (app,) = schema.applications
    assert app.import_path == "samtone_ray.serve.app:build_app" and app.args["model"]
    (dep,) = doc["applications"][0]["deployments"]
    serve_cfg = from_dict({"serve": dep["user_config"]["serve"]}).serve
    assert dep["max_ongoing_requests"] == serve_cfg.max_ongoing_requests >= serve_cfg.max_batch_size


def test_shipped_serve_yaml_is_a_valid_deploy_config():
    doc = yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text())
    _check(doc)
    dep = doc["applications"][0]["deployments"][0]
    assert dep["ray_actor_options"]["num_gpus"] == 1 and dep["autoscaling_config"]["max_replicas"] > 1


@pytest.mark.system
@pytest.mark.parametrize("flags", [["--autoscale", "1:4", "--gpu"], ["--replicas", "2", "--set", "serve.max_batch_size=32"]])
def test_print_config_is_a_valid_deploy_config(flags):
    out = subprocess.run(
        [sys.executable, "-m", "samtone_ray.cli", "serve", "--print-config", "--model", "models:/m@champion", *flags],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    doc = yaml.safe_load(out)
    _check(doc)
    dep = doc["applications"][0]["deployments"][0]
    if "--gpu" in flags:
        assert dep["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64}
    else:
        assert dep["num_replicas"] == 2 and dep["user_config"]["serve"]["max_batch_size"] == 32


def test_serve_settings_are_validated():
    with pytest.raises(ConfigError, match="serve.max_ongoing_requests"):
        from_dict({"serve": {"max_batch_size": 512, "max_ongoing_requests": 100}})
    with pytest.raises(ConfigError, match="serve.max_top_k"):
        from_dict({"serve": {"max_top_k": 0}})


def test_batch_cost_counts_texts_and_padded_tokens():
    from samtone_ray.serve.app import _Item, _batch_cost

    def items(*tokens, scale):
        return [_Item(None, "t", "document", n, scale) for n in tokens]

    # max_batch_size=64, max_batch_tokens=1024 -> scale 1/16: 64 texts of <= 16 tokens fit, 8 of 128 do
    assert _batch_cost(items(*[16] * 64, scale=1 / 16)) == 64
    assert _batch_cost(items(*[128] * 8, scale=1 / 16)) == 64
    assert _batch_cost(items(*[128] * 9, scale=1 / 16)) == 72  # over: Ray leaves the 9th for the next batch
    assert _batch_cost(items(3, 128, scale=1 / 16)) == 16  # padding to the longest counts
    assert _batch_cost(items(*[500] * 5, scale=0.0)) == 5  # tokens off: texts only


@pytest.mark.system
def test_serve_refuses_a_missing_model_before_starting_ray(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "samtone_ray.cli", "serve", "--model", str(tmp_path / "nope")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert r.returncode == 2 and "nor an existing local directory" in r.stderr, r.stderr
