"""`samtone submit` / `samtone jobs` against a REAL Ray head started here, and the Grafana
dashboards against a REAL Prometheus scraping that head while a tiny tuning run runs on it.

One head for the module (loopback, ports of its own, token auth disabled, one logical GPU so the
pending path can be tested); the CLI runs in subprocesses exactly as a user runs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from samtone_ray.data.sources import bundled_sample_path, read_qrels

from cluster_head import free_port, start_head

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def head():
    h = start_head(num_cpus=3, num_gpus=1)
    yield h
    h.stop()
    shutil.rmtree(h.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_beir(tmp_path_factory):
    """A few dozen real Debian pairs and queries, as a BEIR folder at an absolute path."""
    src = bundled_sample_path()
    out = tmp_path_factory.mktemp("tiny-beir")
    train = dict(list(read_qrels(src / "qrels" / "train.tsv").items())[:48])
    dev = dict(list(read_qrels(src / "qrels" / "dev.tsv").items())[:16])
    docs = {d for qrels in (train, dev) for q in qrels.values() for d in q}
    queries = set(train) | set(dev)
    corpus_lines = [line for line in (src / "corpus.jsonl").read_text().splitlines() if json.loads(line)["_id"] in docs]
    corpus_lines += (src / "corpus.jsonl").read_text().splitlines()[:40]  # distractors
    (out / "corpus.jsonl").write_text("\n".join(dict.fromkeys(corpus_lines)) + "\n")
    (out / "queries.jsonl").write_text(
        "\n".join(line for line in (src / "queries.jsonl").read_text().splitlines() if json.loads(line)["_id"] in queries) + "\n"
    )
    (out / "qrels").mkdir()
    for split, qrels in (("train", train), ("dev", dev)):
        rows = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, ds in qrels.items() for d, s in ds.items()]
        (out / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return out


def samtone(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ) | {"PYTHONPATH": str(REPO)}
    full_env.pop("RAY_ADDRESS", None)
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env |= env or {}
    return subprocess.run(
        [sys.executable, "-m", "samtone_ray.cli", *args], capture_output=True, text=True, timeout=timeout,
        cwd=REPO, env=full_env,
    )


def train_settings(tiny_model_dir, tiny_beir, tmp_path, **extra) -> list[str]:
    settings = {
        "name": "cluster-test",
        "model.name_or_path": str(tiny_model_dir),
        "model.query_max_length": 16,
        "model.doc_max_length": 32,
        "data.train": str(tiny_beir),
        "data.eval": str(tiny_beir),
        "train.batch_size": 8,
        "train.epochs": 100,  # max_steps decides
        "train.max_steps": 12,
        "train.eval_every": 6,
        "train.precision": "fp32",
        "scaling.num_workers": 1,
        "scaling.max_failures": 0,
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment": "cluster-test",
        "output_dir": str(tmp_path / "out"),
    } | extra
    out = []
    for key, value in settings.items():
        out += ["--set", f"{key}={value}"]
    return out


def job_status(head, sid: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(head.address).get_job_status(sid).value)


def submission_id(stdout: str) -> str:
    match = re.search(r"(samtone-\w+-[a-z0-9-]+-[0-9a-f]{12})", stdout)
    assert match, stdout
    return match.group(1)


# ------------------------------------------------------------------------------- submission


def test_workers_ask_their_own_clusters_state_api_while_another_cluster_runs(head, ray_cluster):
    """Ray Train frees an ASHA-stopped trial's workers only once the state API, asked from inside
    the cluster, says the trial's controller is gone. With the test head running beside the
    session cluster, an address-less state API call would pick one of the two; a worker of the
    session cluster must find its own cluster's actors."""
    from ray.util.state import get_actor

    @ray_cluster.remote(num_cpus=0)
    class Probe:
        def ask(self, actor_id: str):
            state = get_actor(actor_id, timeout=30)
            return os.environ.get("RAY_API_SERVER_ADDRESS"), state.state if state else None

    probe = Probe.remote()
    actor_id = probe._actor_id.hex()
    address, state = ray_cluster.get(probe.ask.remote(actor_id), timeout=120)
    assert state == "ALIVE", f"the state API at {address} did not see this cluster's actor"
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", address or ""), address
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # the driver's explicit addresses are not redirected
    ray_cluster.kill(probe)


def test_submit_refuses_paths_the_cluster_cannot_see(head, tmp_path):
    proc = samtone("submit", "train", "--address", head.address, "--set", "data.train=../elsewhere/beir")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "data.train=../elsewhere/beir" in proc.stderr and "cannot see it" in proc.stderr
    proc = samtone("submit", "train", "--address", head.address, "--set", "train.batch_size=0")
    assert proc.returncode == 2 and "train.batch_size" in proc.stderr
    from ray.job_submission import JobSubmissionClient

    assert JobSubmissionClient(head.address).list_jobs() == []  # nothing was sent


def test_no_secret_is_uploaded_and_no_password_reaches_the_job(head, tmp_path):
    """Issue 20's working directory, and a tracking URI with a password, against a real head: what the
    cluster unpacked, the job's runtime_env and entrypoint, and every line samtone printed."""
    from ray.job_submission import JobSubmissionClient

    secret = "s3cret-Pw-20"
    work = tmp_path / "work"
    marker = f"marker_{os.getpid()}_{time.monotonic_ns()}.py"  # finds this job's copy among the head's
    files = {".env": f"PASSWORD={secret}\n", ".aws/credentials": f"aws_secret_access_key={secret}\n",
             ".ssh/id_rsa": secret, "server.pem": secret, ".netrc": f"machine h password {secret}\n",
             "gcp-credentials.json": secret, "mlflow.db": secret, marker: "x = 1\n", "pkg/code.py": "y = 2\n"}
    for rel, text in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    with open(work / "model.bin", "wb") as f:
        f.truncate(12 << 20)
    tracking = f"http://alice:{secret}@127.0.0.1:{free_port()}"
    proc = samtone("submit", "train", "--address", head.address, "--working-dir", str(work), "--follow",
                   "--set", f"data.train={tmp_path / 'not-here'}", "--set", f"output_dir={tmp_path / 'out'}",
                   env={"MLFLOW_TRACKING_URI": tracking})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # the job fails: no data, by design
    sid = submission_id(proc.stdout)
    assert "2 files to upload" in proc.stdout and "model.bin (12.0 MiB)" in proc.stdout and ".aws/" in proc.stdout

    copies = list((head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files").glob(f"*/{marker}"))
    assert len(copies) == 1, copies
    unpacked = sorted(p.relative_to(copies[0].parent).as_posix() for p in copies[0].parent.rglob("*") if p.is_file())
    assert unpacked == sorted([marker, "pkg/code.py"])

    info = JobSubmissionClient(head.address).get_job_info(sid)
    env = info.runtime_env["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == tracking.replace(f"alice:{secret}@", "")
    assert env["MLFLOW_TRACKING_PASSWORD"] == "${MLFLOW_TRACKING_PASSWORD}"
    shown = samtone("jobs", sid, "--address", head.address).stdout + samtone("jobs", sid, "--logs", "--address", head.address).stdout
    assert f"{sid}" in shown and "entrypoint: python -m samtone_ray.cli train" in shown
    for text in (repr(info.runtime_env), info.entrypoint, repr(info.metadata), proc.stdout, proc.stderr, shown):
        assert secret not in text and "alice" not in text


def test_tiny_train_job_succeeds_tagged_and_is_not_run_twice(head, tiny_model_dir, tiny_beir, tmp_path):
    import mlflow

    args = ["submit", "train", "--address", head.address, "--follow",
            *train_settings(tiny_model_dir, tiny_beir, tmp_path), "--", "--no-baseline"]
    proc = samtone(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sid = submission_id(proc.stdout)
    assert "fine-tuned" in proc.stdout  # the job's own output, tailed by --follow
    assert job_status(head, sid) == "SUCCEEDED"

    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(head.address).get_job_info(sid)
    assert info.metadata["samtone.kind"] == "train" and len(info.metadata["config_hash"]) == 64
    assert info.metadata["mlflow_experiment"] == "cluster-test" and info.metadata["git_commit"]

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["cluster-test"], filter_string=f"tags.`samtone.submission_id` = '{sid}'")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"

    again = samtone(*args)  # a retried submit: the same id, attached, not started again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "submitted before (SUCCEEDED)" in again.stdout and submission_id(again.stdout) == sid
    runs = mlflow.search_runs(experiment_names=["cluster-test"], filter_string=f"tags.`samtone.submission_id` = '{sid}'")
    assert len(runs) == 1
    assert [j.submission_id for j in JobSubmissionClient(head.address).list_jobs()].count(sid) == 1

    listing = samtone("jobs", "--address", head.address)
    assert listing.returncode == 0 and re.search(rf"{sid}\s+SUCCEEDED\s+train", listing.stdout), listing.stdout
    logs = samtone("jobs", sid, "--logs", "--address", head.address)
    assert logs.returncode == 0 and "fine-tuned" in logs.stdout
    shown = samtone("jobs", sid, "--address", head.address)
    assert shown.returncode == 0 and re.search(rf"{sid}\s+SUCCEEDED\s+train", shown.stdout), shown.stdout
    assert "entrypoint:" in shown.stdout and f"config_hash: {info.metadata['config_hash']}" in shown.stdout


def test_a_job_asking_for_missing_gpus_stays_pending_until_stopped(head, tiny_model_dir, tiny_beir, tmp_path):
    proc = samtone("submit", "train", "--address", head.address, "--num-gpus", "2", "--no-wait",
                   *train_settings(tiny_model_dir, tiny_beir, tmp_path, name="wants-two-gpus"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sid = submission_id(proc.stdout)
    time.sleep(8)  # plenty for a job that could start to leave PENDING on this head
    assert job_status(head, sid) == "PENDING"
    stop = samtone("jobs", sid, "--stop", "--address", head.address)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert job_status(head, sid) == "STOPPED"
    assert f"{sid}: STOPPED" in stop.stdout


def test_follow_exits_non_zero_when_the_job_fails(head, tiny_model_dir, tiny_beir, tmp_path):
    # Absolute paths may exist only on the cluster, so this passes the local checks and fails there.
    missing = tmp_path / "not-on-the-cluster"
    proc = samtone("submit", "train", "--address", head.address, "--follow",
                   *train_settings(tiny_model_dir, tiny_beir, tmp_path, name="fails", **{"data.train": str(missing)}))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    sid = submission_id(proc.stdout)
    assert job_status(head, sid) == "FAILED"
    assert str(missing) in proc.stdout  # the job's error, tailed


def train_workers(head) -> list:
    from ray.util.state import list_actors

    actors = list_actors(address=head.address, filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
    return [a for a in actors if a.class_name == "RayTrainWorker"]


def test_stop_ends_a_running_job_and_frees_its_workers(head, tiny_model_dir, tiny_beir, tmp_path):
    proc = samtone("submit", "train", "--address", head.address, "--no-wait",
                   *train_settings(tiny_model_dir, tiny_beir, tmp_path, name="long-run", **{"train.epochs": 100000, "train.max_steps": 0}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sid = submission_id(proc.stdout)
    deadline = time.monotonic() + 180
    while not (job_status(head, sid) == "RUNNING" and train_workers(head)):
        assert time.monotonic() < deadline and job_status(head, sid) in ("PENDING", "RUNNING"), job_status(head, sid)
        time.sleep(1)
    stop = samtone("jobs", sid, "--stop", "--address", head.address)
    assert stop.returncode == 0 and f"{sid}: STOPPED" in stop.stdout, stop.stdout + stop.stderr
    assert job_status(head, sid) == "STOPPED"
    deadline = time.monotonic() + 60  # the worker group goes with the job's driver
    while train_workers(head):
        assert time.monotonic() < deadline, f"training workers outlived the stopped job: {train_workers(head)}"
        time.sleep(1)


def test_the_node_count_comes_from_the_clusters_state_api(head):
    from samtone_ray.cluster.submit import alive_nodes

    deadline = time.monotonic() + 60  # a dashboard lists no nodes for a few seconds after `ray start`
    while (n := alive_nodes(head.address)) is None:
        assert time.monotonic() < deadline, "the head's state API never listed its node"
        time.sleep(1)
    assert n == 1
    assert alive_nodes(f"http://127.0.0.1:{free_port()}") is None  # nothing there: cannot say, submit goes on


# ------------------------------------------------------------------------------- dashboards

DASHBOARDS = REPO / "dashboards"


def has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def prometheus(head, tmp_path_factory):
    """A real Prometheus scraping the head every second through Ray's service-discovery file."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Prometheus is not installed (Debian/Ubuntu: apt-get install -y prometheus; .ci/run does it)")
    import requests

    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: ray\n"
        f"    file_sd_configs: [{{files: ['{head.service_discovery_file}'], refresh_interval: 1s}}]\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=open(work / "prometheus.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            targets = requests.get(f"{url}/api/v1/targets", timeout=2).json()["data"]["activeTargets"]
            if any(t["health"] == "up" for t in targets):
                break
        except (requests.RequestException, KeyError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"Prometheus did not scrape the head: {(work / 'prometheus.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def query_range(prom_url: str, expr: str, start: float) -> dict:
    """Prometheus's answer to ``expr`` over [start, now] at 1 s steps, as Grafana would ask."""
    import requests

    return requests.get(f"{prom_url}/api/v1/query_range", timeout=30,
                        params={"query": expr, "start": start, "end": time.time(), "step": "1s"}).json()


def panels_without_data(prom_url: str, dashboard: Path, start: float) -> tuple[list[str], list[str], int]:
    """Runs every target of every panel over [start, now] as Grafana would; returns the panels
    (with the expression) that returned no data, the GPU panels whose data was not required (no
    GPU here; their expressions still have to run), and the count checked for data."""
    missing, skipped, checked = [], [], 0
    gpu = has_gpu()
    for p in json.loads(dashboard.read_text())["panels"]:
        without_gpu = p.get("samtoneNeedsGpu") and not gpu
        for target in p["targets"]:
            expr = target["expr"].replace("$__rate_interval", "15s")
            body = query_range(prom_url, expr, start)
            # Every expression must parse and run, a GPU panel's too; only data needs a GPU.
            assert body["status"] == "success", f"{dashboard.name} / {p['title']}: {expr}: {body.get('error')}"
            if without_gpu:
                continue
            checked += 1
            if not any(series["values"] for series in body["data"]["result"]):
                missing.append(f"{dashboard.name} / {p['title']}: {expr}")
        if without_gpu:
            skipped.append(p["title"])
    return missing, skipped, checked


def test_training_and_tuning_dashboards_have_data_in_prometheus(head, prometheus, tiny_model_dir, tiny_beir, tmp_path):
    start = time.time()
    proc = samtone(
        "submit", "tune", "--address", head.address, "--follow",
        *train_settings(tiny_model_dir, tiny_beir, tmp_path, name="dashboards", **{
            # Long enough (seconds) for several 1 s scrapes of every trial's counters.
            "train.max_steps": 120, "train.eval_every": 60, "train.log_every": 20,
            "tune.space": '{"loss.same_tower": {"grid": [none, both]}}',
        }),
        "--", "--no-baseline",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    time.sleep(3)  # the last export and scrape
    missing, skipped, checked = [], [], 0
    for name in ("samtone-training.json", "samtone-tuning.json"):
        m, s, c = panels_without_data(prometheus, DASHBOARDS / name, start)
        missing += m
        skipped += s
        checked += c
    print(f"\n{checked} training/tuning expressions returned data; GPU panels run, data not required: {skipped}")
    assert not missing, "no data for:\n" + "\n".join(missing)
    assert checked >= 12


def peak(prom_url: str, expr: str, start: float) -> float:
    """The largest value ``expr`` took since ``start`` (a finished job's series have gone stale by now)."""
    result = query_range(prom_url, expr, start)["data"]["result"]
    assert len(result) == 1, f"{expr}: {result}"
    return max(float(v) for _, v in result[0]["values"])


def test_encoding_dashboard_has_data_in_prometheus(head, prometheus, tiny_model_dir, tiny_beir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"  # one malformed line among real documents, skipped to rejects
    lines = (tiny_beir / "corpus.jsonl").read_text().splitlines()
    corpus.write_text("\n".join([*lines[:10], '{"_id": "broken", "text": ', *lines[10:]]) + "\n")
    output = tmp_path / "embeddings"
    start = time.time()
    proc = samtone("submit", "encode", "--address", head.address, "--follow", "--",
                   "--model", str(tiny_model_dir), "--input", str(corpus), "--on-bad-record", "skip",
                   "--output", str(output), "--precision", "fp32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    time.sleep(3)
    missing, _, checked = panels_without_data(prometheus, DASHBOARDS / "samtone-encoding.json", start)
    assert not missing, "no data for:\n" + "\n".join(missing)
    print(f"\n{checked} encoding expressions returned data")
    assert checked >= 6
    # The two panels that count trouble show what happened, not merely something.
    tag = f'{{output="{output.name}"}}'
    assert peak(prometheus, f"sum(ray_samtone_encode_rejected_records{tag})", start) == 1
    assert peak(prometheus, f"sum(ray_samtone_encode_failed_blocks{tag})", start) == 0
    assert peak(prometheus, f"sum(ray_samtone_encode_rows_done{tag})", start) == len(lines)


def test_serving_dashboard_has_data_in_prometheus(head, prometheus, tiny_model_dir, tmp_path):
    import requests

    from samtone_ray.tracking import runs as tracking

    # A registered model, so the "model version served" panel has a version to show.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    c.create_registered_model("tiny")
    c.create_model_version("tiny", source=str(tiny_model_dir))
    c.set_registered_model_alias("tiny", "champion", "1")
    start = time.time()
    port = free_port()
    env = dict(os.environ) | {"PYTHONPATH": str(REPO), "RAY_ADDRESS": head.gcs_address, "RAY_AUTH_MODE": "disabled"}
    server = subprocess.Popen(
        [sys.executable, "-m", "samtone_ray.cli", "serve", "--model", "models:/tiny@champion", "--port", str(port),
         "--set", f"tracking.uri={uri}"],
        cwd=REPO, env=env, stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        for i in range(24):  # 12 s of traffic (1 s scrapes), a refused request among it
            r = requests.post(f"{url}/v1/embeddings",
                              json={"model": "tiny", "input": [f"text {i}", "another text"], "encoding_format": "float"})
            assert r.status_code == 200, r.text
            refused = requests.post(f"{url}/v1/embeddings", json={"model": "tiny", "input": []})
            assert refused.status_code == 422, refused.text
            time.sleep(0.5)
        time.sleep(3)
        missing, _, checked = panels_without_data(prometheus, DASHBOARDS / "samtone-serving.json", start)
        assert not missing, "no data for:\n" + "\n".join(missing)
        print(f"\n{checked} serving expressions returned data")
        assert checked >= 8
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
