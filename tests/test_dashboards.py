"""Dashboard files: current with their generator, well formed, every metric documented.
(The expressions are run against a real Prometheus in tests/cluster/test_jobs.py.)"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
JSON_FILES = sorted(DASHBOARDS.glob("*.json"))


def _generator():
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARDS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_json_files_are_what_generate_py_writes():
    rendered = _generator().render()
    assert sorted(rendered) == [p.name for p in JSON_FILES]
    for path in JSON_FILES:
        assert path.read_text() == rendered[path.name], f"{path.name} is stale: run python dashboards/generate.py"


def test_the_four_workloads_have_their_panels():
    titles = {json.loads(p.read_text())["uid"]: {x["title"] for x in json.loads(p.read_text())["panels"]} for p in JSON_FILES}
    assert {"Loss", "Pairs per second", "Tokens per second", "Data-wait share", "Eval MRR@10",
            "Step time per worker (median)", "GPU utilisation", "GPU memory used"} <= titles["samtone-training"]
    assert {"Trials by state", "Best metric so far"} <= titles["samtone-tuning"]
    assert {"Requests per second", "Latency p50 / p99", "Errors by status", "Batch size (texts)",
            "Model version served"} <= titles["samtone-serving"]
    assert {"Rows per second", "Rows done vs total", "Failed blocks"} <= titles["samtone-encoding"]


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path):
    board = json.loads(path.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert board["templating"]["list"][0]["name"] == "datasource"
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            # Only Grafana's $__rate_interval: anything else would not run in Prometheus unaided.
            assert set(re.findall(r"\$\w+", target["expr"])) <= {"$__rate_interval"}, target["expr"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(ray_[a-z0-9_]+)", expr))


def test_every_metric_used_is_documented_in_the_readme():
    readme = (DASHBOARDS / "README.md").read_text()
    documented = set()
    for name in re.findall(r"`(ray_[a-z0-9_]+)(?:_\{([a-z,]+)\})?`", readme):
        base, suffixes = name
        documented |= {f"{base}_{s}" for s in suffixes.split(",")} if suffixes else {base}
    used = {m for p in JSON_FILES for panel in json.loads(p.read_text())["panels"] for t in panel["targets"]
            for m in metric_names(t["expr"])}
    assert used - documented == set(), f"undocumented metrics: {sorted(used - documented)}"


def test_the_declared_project_metrics_are_the_documented_ones():
    # The names declared by training/tuning, serving and re-encoding, exported with Ray's prefix.
    source = "".join((ROOT / "samtone_ray" / f).read_text() for f in ("core/telemetry.py", "serve/app.py", "encode/job.py"))
    declared = set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(samtone_[a-z_]+)"', source))
    assert {n.split("_")[1] for n in declared} >= {"train", "tune", "serve", "encode"}, declared
    readme = (DASHBOARDS / "README.md").read_text()
    for name in declared:
        assert f"ray_{name}" in readme, f"ray_{name} is declared but not documented"


def test_provisioning_files_are_valid_yaml():
    datasource = yaml.safe_load((DASHBOARDS / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    provider = yaml.safe_load((DASHBOARDS / "provisioning" / "dashboards" / "samtone.yaml").read_text())
    assert provider["providers"][0]["type"] == "file"
    scrape = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


@pytest.mark.system
def test_prometheus_accepts_the_scrape_config():
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (it comes with Debian's prometheus package)")
    proc = subprocess.run([promtool, "check", "config", str(DASHBOARDS / "prometheus.yml")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
