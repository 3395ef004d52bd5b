"""Cluster definitions, validated by their owners' schemas: cluster.yaml by Ray's cluster-launcher
schema, deploy/kuberay/ by the vendored KubeRay CRDs (closed, so a misspelt field fails), and the
RayService's Serve config by Ray Serve's own ServeDeploySchema. No cluster needed."""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from shipped import SAMTONE_JOB_CONFIGS

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
CRDS = KUBERAY / "crds"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


# ------------------------------------------------------------------------- cluster.yaml


@pytest.fixture(scope="module")
def cluster_config():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_own_validation(cluster_config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster_config)))  # what `ray up` runs
    # The same schema without Ray's private helpers (they may move between releases).
    jsonschema.validate(cluster_config, json.loads(RAY_SCHEMA.read_text()))


def test_rays_schema_rejects_a_misspelt_key(cluster_config):
    bad = copy.deepcopy(cluster_config)
    bad["setup_comands"] = bad.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        jsonschema.validate(bad, json.loads(RAY_SCHEMA.read_text()))


def test_cluster_yaml_pins_what_a_cluster_needs(cluster_config):
    image = cluster_config["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-") and image.endswith("-gpu"), image
    for name, node in cluster_config["available_node_types"].items():
        assert {"CPU", "GPU"} <= set(node["resources"]), f"{name}: resources must be explicit"
    assert any(n["resources"]["GPU"] > 0 for n in cluster_config["available_node_types"].values())
    head = " ".join(cluster_config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "--metrics-export-port=8080" in head
    assert "--metrics-export-port=8080" in " ".join(cluster_config["worker_start_ray_commands"])
    assert "mlflow server" in " ".join(cluster_config["head_setup_commands"])
    # Shared storage for output_dir (Train/Tune storage_path) on every node, inside the container.
    assert "/mnt/shared:/mnt/shared" in " ".join(cluster_config["docker"]["run_options"])
    assert any("mount" in c and "/mnt/shared" in c for c in cluster_config["initialization_commands"])


def mlflow_server_options(cluster_config) -> dict[str, str | bool]:
    """The options of the `mlflow server` that cluster.yaml starts on the head."""
    (command,) = [c for c in cluster_config["head_setup_commands"] if "mlflow server" in c]
    argv = shlex.split(command.split("nohup", 1)[1])
    options: dict[str, str | bool] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith(("--", ">")) else True
            options[arg] = value
    return options


def tracking_server_uri(cluster_config) -> str:
    """The URI the head's tracking server answers on for other nodes: the Host it accepts."""
    server = mlflow_server_options(cluster_config)
    host = server["--allowed-hosts"].split(",")[0]
    assert host.endswith(f":{server['--port']}")
    return f"http://{host}"


def test_serving_follows_the_tracking_server_the_cluster_jobs_log_to(cluster_config):
    server = mlflow_server_options(cluster_config)
    serve = yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text())
    (app,) = serve["applications"]
    # One store: the champion a job registers through the server is the one the replicas follow.
    assert app["args"]["tracking_uri"] == tracking_server_uri(cluster_config)
    # A cluster's store: PostgreSQL, not SQLite on a shared disk; artifacts proxied to S3, so a
    # replica needs only the server's URI. The password is no part of any of it (PGPASSWORD).
    store = server["--backend-store-uri"]
    assert store.startswith("postgresql+psycopg2://") and ":" not in store.split("://")[1].split("@")[0]
    assert server["--artifacts-destination"].startswith("s3://") and "--no-serve-artifacts" not in server
    (command,) = [c for c in cluster_config["head_setup_commands"] if "mlflow server" in c]
    assert 'PGPASSWORD="$(' in command and "secretsmanager" in command


def test_the_kubernetes_tracking_server_is_the_one_the_ray_jobs_log_to():
    from urllib.parse import urlparse

    deployment, service = yaml.safe_load_all((ROOT / "deploy" / "mlflow" / "tracking-server.yaml").read_text())
    uris = {yaml.safe_load(yaml.safe_load(p.read_text())["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"]
            for p in KUBERAY.glob("rayjob-*.yaml")}
    (uri,) = uris
    url = urlparse(uri)
    assert url.hostname == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"] if a.startswith("--"))
    assert url.netloc in args["allowed-hosts"].split(",") and args["port"] == str(url.port)
    assert args["backend-store-uri"].startswith("postgresql+psycopg2://") and args["artifacts-destination"].startswith("s3://")
    # The password: from a secret into PGPASSWORD, in no URI and no literal.
    assert ":" not in args["backend-store-uri"].split("://")[1].split("@")[0]
    env = {e["name"]: e for e in container["env"]}
    assert set(env["PGPASSWORD"]) == {"name", "valueFrom"} and "secretKeyRef" in env["PGPASSWORD"]["valueFrom"]


@pytest.mark.parametrize("path", SAMTONE_JOB_CONFIGS, ids=lambda p: p.name)
def test_cluster_job_configs_keep_their_state_on_shared_storage(path):
    from samtone_ray.core.config import load_config

    cfg = load_config(path)
    if not cfg.scaling.use_gpu:
        pytest.skip(f"{path.name} is a local (CPU) config")
    for value in (cfg.output_dir, cfg.data.train, cfg.data.eval):
        assert value.startswith("/mnt/shared/"), f"{path.name}: {value} is not on the cluster's shared storage"


# ------------------------------------------------------------------------- KubeRay


def close(schema):
    """The schema with every object that lists its properties closed to others (recursively).

    CRDs accept unknown fields (the API server prunes them silently): a typo would vanish on apply.
    Objects marked x-kubernetes-preserve-unknown-fields, and maps (additionalProperties), stay open.
    """
    if isinstance(schema, dict):
        schema = {k: close(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [close(v) for v in schema]
    return schema


@functools.cache
def vendored_crds() -> tuple[dict, ...]:
    """The three CRDs (3 MB of YAML), parsed once, with libyaml: the pure-Python parser takes ~30 s."""
    return tuple(yaml.load(p.read_text(), Loader=yaml.CSafeLoader) for p in sorted(CRDS.glob("ray.io_*.yaml")))


def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    out = {}
    for crd in vendored_crds():
        for version in crd["spec"]["versions"]:
            if version.get("storage"):
                kind = f"{crd['spec']['group']}/{version['name']}/{crd['spec']['names']['kind']}"
                out[kind] = jsonschema.Draft7Validator(close(version["schema"]["openAPIV3Schema"]))
    return out


@pytest.fixture(scope="module")
def validators():
    return crd_validators()


MANIFESTS = sorted(KUBERAY.glob("*.yaml"))


def test_the_vendored_crds_are_kuberays_and_named_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    version = re.search(r"KubeRay (v\d+\.\d+\.\d+)", readme)
    assert version, "the README must name the KubeRay release the CRDs come from"
    notice = (CRDS / "README.md").read_text()
    assert version.group(1) in notice and (CRDS / "LICENSE").read_text().lstrip().startswith("Apache License")
    kinds = {crd["spec"]["names"]["kind"] for crd in vendored_crds()}
    assert kinds == {"RayJob", "RayService", "RayCluster"}


def test_there_is_a_manifest_per_workload():
    kinds = sorted(
        (yaml.safe_load(p.read_text())["kind"], p.name) for p in MANIFESTS
    )
    assert [k for k, _ in kinds].count("RayJob") == 3 and [k for k, _ in kinds].count("RayService") == 1
    entrypoints = " ".join(yaml.safe_load(p.read_text())["spec"].get("entrypoint", "") for p in MANIFESTS)
    for command in ("samtone train", "samtone tune", "samtone encode"):
        assert command in entrypoints


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly_against_the_crd(path, validators):
    doc = yaml.safe_load(path.read_text())
    kind = f"{doc['apiVersion']}/{doc['kind']}"
    assert kind in validators, f"{path.name}: no vendored CRD for {kind}"
    errors = sorted(validators[kind].iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, f"{path.name}: " + "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_runs_gpu_workers_with_the_projects_ray(path):
    doc = yaml.safe_load(path.read_text())
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == ray.__version__
    groups = spec["workerGroupSpecs"]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            res = container["resources"]
            assert res["requests"].get("nvidia.com/gpu") == res["limits"].get("nvidia.com/gpu"), path.name
            assert int(res["limits"]["nvidia.com/gpu"]) >= 1, path.name
    if doc["kind"] == "RayJob":
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        assert doc["spec"]["activeDeadlineSeconds"] > 0


def test_the_dockerfile_builds_on_the_projects_ray_image():
    first = next(line for line in (KUBERAY / "Dockerfile").read_text().splitlines() if line.startswith("FROM"))
    assert first.split()[1].startswith(f"rayproject/ray:{ray.__version__}-") and first.endswith("-gpu")


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d["spec"].update(shutdownAfterJobFinish=True), id="misspelt-spec-field"),
        pytest.param(lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replica=2), id="misspelt-group-field"),
        pytest.param(
            lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
                imagePullPolicies="Always"
            ),
            id="misspelt-container-field",
        ),
        pytest.param(lambda d: d["spec"].update(activeDeadlineSeconds="6h"), id="wrong-type"),
    ],
)
def test_the_strict_check_catches_mistakes(mutate, validators):
    doc = yaml.safe_load((KUBERAY / "rayjob-train.yaml").read_text())
    mutate(doc)
    assert list(validators["ray.io/v1/RayJob"].iter_errors(doc))


def test_rayservice_serve_config_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((KUBERAY / "rayservice-serve.yaml").read_text())
    serve = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"])) if hasattr(
        ServeDeploySchema, "model_validate"
    ) else ServeDeploySchema.parse_obj(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    (app,) = serve.applications
    assert app.import_path == "samtone_ray.serve.app:build_app" and app.args["model"] == "models:/samtone@champion"
    (deployment,) = app.deployments
    assert deployment.ray_actor_options.num_gpus == 1


# ------------------------------------------------------------------------- Serve configs

# The flags the cluster's serve configs are printed with (GPU replicas, 1-4 of them, batching
# sized for a GPU); each file's comment quotes its command.
SERVE_FLAGS = (
    "--autoscale 1:4 --gpu --num-cpus 4 --set serve.max_batch_size=128 --set serve.max_batch_tokens=32768 "
    "--set serve.max_ongoing_requests=512 --set serve.max_pending_texts=16384 --set serve.index_batch_size=256 "
    "--set serve.precision=auto"
)


def printed_serve_config(capsys, extra: list[str], quoted_in: Path) -> dict:
    """`samtone serve --print-config` for SERVE_FLAGS + ``extra``, after checking that the comment
    of ``quoted_in`` names that command (so the claim in the file stays true)."""
    from samtone_ray.cli import main

    argv = ["serve", "--print-config", *shlex.split(SERVE_FLAGS), *extra]
    comment = " ".join(line.lstrip("# ") for line in quoted_in.read_text().splitlines() if line.startswith("#"))
    assert "samtone " + shlex.join(argv) in re.sub(r"\s+", " ", comment.replace("\\", " ")), quoted_in.name
    capsys.readouterr()
    assert main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.system
def test_jobs_serve_yaml_is_what_print_config_writes(capsys, cluster_config):
    path = ROOT / "jobs" / "serve.yaml"
    store = tracking_server_uri(cluster_config)
    assert yaml.safe_load(path.read_text()) == printed_serve_config(capsys, ["--set", f"tracking.uri={store}"], path)


@pytest.mark.system
def test_the_rayservice_serves_what_print_config_writes(capsys):
    path = KUBERAY / "rayservice-serve.yaml"
    # One store on Kubernetes too: the one the RayJobs log to (and the tuning run registers the champion in).
    stores = {
        yaml.safe_load(yaml.safe_load(p.read_text())["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"]
        for p in KUBERAY.glob("rayjob-*.yaml")
    }
    (store,) = stores
    served = yaml.safe_load(yaml.safe_load(path.read_text())["spec"]["serveConfigV2"])
    expected = printed_serve_config(capsys, ["--set", f"tracking.uri={store}", "--host", "0.0.0.0"], path)
    # The one difference, explained in the manifest: a proxy on every pod, behind KubeRay's Service.
    assert served.pop("proxy_location") == "EveryNode" and expected.pop("proxy_location") == "HeadOnly"
    assert served == expected
