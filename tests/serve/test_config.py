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
        return [_Item(None, [0] * n, "document", n, scale) for n in tokens]

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


# ---------------------------------------------------------------------- API keys and trusted hosts (issue 20)


def _print_config(capsys, *flags: str) -> tuple[int, str, str]:
    from samtone_ray.cli import main

    capsys.readouterr()
    code = main(["serve", "--print-config", "--model", "models:/m@champion", *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_print_config_references_the_key_variable_and_never_holds_a_key(capsys, monkeypatch):
    monkeypatch.setenv("SAMTONE_API_KEY", "sk-must-not-appear")
    code, out, _ = _print_config(capsys, "--host", "0.0.0.0")
    assert code == 0 and "sk-must-not-appear" not in out
    args = yaml.safe_load(out)["applications"][0]["args"]
    assert args["api_key_env"] == "SAMTONE_API_KEY" and "api_key_sha256" not in args
    _check(yaml.safe_load(out))
    code, out, err = _print_config(capsys, "--api-key", "sk-given-on-the-command-line")
    assert code == 2 and "--print-config writes no key" in err and "sk-given" not in out + err
    code, out, _ = _print_config(capsys, "--host", "0.0.0.0", "--allow-unauthenticated", "--trusted-host", "api.example.com")
    args = yaml.safe_load(out)["applications"][0]["args"]
    assert code == 0 and "api_key_env" not in args and args["trusted_hosts"] == ["localhost", "127.0.0.1", "::1", "api.example.com"]


def test_serve_refuses_a_public_host_without_a_key_before_starting_anything(capsys, monkeypatch):
    from samtone_ray.cli import main

    monkeypatch.delenv("SAMTONE_API_KEY", raising=False)
    capsys.readouterr()
    assert main(["serve", "--host", "0.0.0.0", "--model", "models:/m@champion"]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0" in err and "--allow-unauthenticated" in err and "SAMTONE_API_KEY" in err


def test_shipped_serve_configs_take_the_key_from_a_secret():
    """jobs/serve.yaml and the RayService name the variable; the GPU pods set it from a Kubernetes
    secret; neither file holds a key or a digest."""
    rayservice = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice-serve.yaml").read_text())
    served = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    for doc in (served, yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text())):
        args = doc["applications"][0]["args"]
        assert args["api_key_env"] == "SAMTONE_API_KEY" and "api_key_sha256" not in args
        assert "runtime_env" not in doc or "SAMTONE_API_KEY" not in doc["applications"][0]["runtime_env"]["env_vars"]
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            (env,) = [e for e in container["env"] if e["name"] == "SAMTONE_API_KEY"]
            assert set(env) == {"name", "valueFrom"} and env["valueFrom"]["secretKeyRef"]["name"]


def test_keys_come_from_flags_a_file_and_the_environment(tmp_path):
    from samtone_ray.serve.auth import KeyError_, collect_keys

    keys = tmp_path / "keys"
    keys.write_text("# serving keys\nsk-file-1\n\n  sk-file-2  \n")
    got = collect_keys(["sk-flag"], keys, {"SAMTONE_API_KEY": "sk-env-1,sk-env-2"})
    assert got == ["sk-flag", "sk-file-1", "sk-file-2", "sk-env-1", "sk-env-2"]
    assert collect_keys([], None, {}) == []
    (tmp_path / "empty").write_text("# nothing\n")
    for path, message in ((tmp_path / "empty", "holds no key"), (tmp_path / "nope", "cannot read")):
        with pytest.raises(KeyError_, match=message) as exc:
            collect_keys([], path, {})
        assert str(path) in str(exc.value)
    with pytest.raises(KeyError_, match="line 2"):
        collect_keys([], None, {"SAMTONE_API_KEY": "ok\nnot ascii é"})


def test_a_replica_told_to_read_a_missing_variable_fails_closed():
    from samtone_ray.serve.auth import AccessPolicy, KeyError_, digest

    with pytest.raises(KeyError_, match="SAMTONE_API_KEY: the variable is not set"):
        AccessPolicy.build(key_env="SAMTONE_API_KEY", environ={})
    with pytest.raises(KeyError_, match="not a SHA-256"):
        AccessPolicy.build(key_sha256=["abc"])
    policy = AccessPolicy.build([digest("sk-a")], "K", environ={"K": "sk-b\nsk-c"})
    assert [policy.key_valid(f"Bearer {k}") for k in ("sk-a", "sk-b", "sk-c", "sk-d", "")] == [True, True, True, False, False]
    assert policy.key_valid("bearer sk-a") and not policy.key_valid("Basic sk-a") and not policy.key_valid("sk-a")


def test_trusted_hosts_default_to_loopback_and_the_bind_address():
    from samtone_ray.serve.auth import AccessPolicy, trusted_hosts

    assert trusted_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "::1"]
    assert trusted_hosts("10.0.0.5") == ["localhost", "127.0.0.1", "::1", "10.0.0.5"]
    assert trusted_hosts("0.0.0.0") == ["*"]
    policy = AccessPolicy.build(trusted_hosts=trusted_hosts("10.0.0.5", ["*.Example.com"]))
    ok = ["localhost:8000", "[::1]:8000", "10.0.0.5", "api.example.com:443", "LOCALHOST."]
    bad = ["10.0.0.6", "example.com", "evil.com", "localhost.evil.com", "", None, "api.example.com.evil"]
    assert [policy.host_trusted(h) for h in ok] == [True] * len(ok)
    assert [policy.host_trusted(h) for h in bad] == [False] * len(bad)
