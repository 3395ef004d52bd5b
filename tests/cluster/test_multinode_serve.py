"""Serving across real nodes (tests/cluster/multinode.py), and the faults a served model lives
through: a worker node killed under load, a worker node drained first, the head (and its GCS)
killed with GCS fault tolerance on Redis.

One cluster for the module (head with 0 CPUs, two 1-CPU workers, a redis-server of its own on
the bridge), one deployment made as a user makes it: ``samtone serve --print-config`` for two
half-CPU replicas (room for a replacement on either worker), ``serve deploy`` to the head's
address with the cluster's token, the API key in the nodes' environment (``SAMTONE_API_KEY``, as
from a secret). Clients query from the root namespace, outside the cluster, over HTTP with the
key. The tests run in order and each leaves every node alive for the next, but the last (the
head's loss). ``-s`` prints the figures (docs/cluster.md#faults).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import pytest
import yaml
from cluster.multinode import samtone, start, stop

from samtone_ray.cluster.local import (
    State,
    kill_node,
    restart_node,
    state_api,
    unavailable_reason,
)

pytestmark = pytest.mark.system

SERVE_PORT = 8000
HEADLESS_S = 30.0
BIN = Path(sys.executable).parent


@dataclass
class Served:
    state: State
    key: str
    model: str  # the served name clients send
    secret_env: dict[str, str]

    def url(self, ip: str | None = None) -> str:
        return f"http://{ip or self.state.head.ip}:{SERVE_PORT}"

    def node_ips(self) -> list[str]:
        return [n.ip for n in self.state.nodes[1:]]


def _client_env(state: State) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)} | state.client_env()


def _replicas(state: State) -> dict[str, str]:
    """The deployment's RUNNING replicas, actor id -> node IP, from the head's Serve REST API (what
    `serve status` reads); empty while the head does not answer."""
    token = Path(state.token_path).read_text().strip()
    req = urllib.request.Request(f"{state.address}/api/serve/applications/", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            app = json.load(resp)["applications"].get("samtone") or {}
    except (OSError, ValueError, KeyError):
        return {}
    replicas = ((app.get("deployments") or {}).get("Embedder") or {}).get("replicas") or []
    return {r["actor_id"]: r["node_ip"] for r in replicas if r.get("state") == "RUNNING"}


def _post(url: str, body: dict, key: str | None, timeout: float = 30) -> tuple[int | str, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:  # a proxy's own error page is not JSON
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"{}")
        except ValueError:
            return exc.code, {"body": body.decode(errors="replace")}
    except OSError as exc:  # refused, reset, timed out: a failed request all the same
        return type(exc).__name__, {}


def _wait(what: str, ok, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := ok():
            return value
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout:.0f}s")


@dataclass
class Load:
    """Clients that each send one short query after another (a steady load, one request in flight
    per client) and record when each request was sent, when it ended and how."""

    urls: list[str]
    served: Served
    clients: int = 4
    results: list[tuple[float, float, int | str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(self.urls[i % len(self.urls)],), daemon=True)
                         for i in range(self.clients)]

    def _run(self, url: str) -> None:
        body = {"model": self.served.model, "input": "how do I pin a package version with apt"}
        while not self._stop.is_set():
            sent = time.monotonic()
            status, _ = _post(f"{url}/v1/embeddings", body, self.served.key)
            self.results.append((sent, time.monotonic(), status))

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def failed(self) -> list[tuple[float, float, int | str]]:
        return [r for r in self.results if r[2] != 200]

    def rate(self, start: float, end: float) -> float:
        return sum(start <= r[1] < end for r in self.results if r[2] == 200) / max(end - start, 1e-9)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"a multi-node Ray cluster on this machine needs root and `ip netns`: {reason}")
    if shutil.which("redis-server") is None:
        pytest.skip("GCS fault tolerance needs redis-server (Debian: apt-get install redis-server)")
    state_dir = tmp_path_factory.mktemp("serve-cluster")
    state = None
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt()))
    # The key reaches the nodes' environment as a secret would, never a command line.
    secret_env = {"SAMTONE_API_KEY": secrets.token_hex(16)}
    try:
        started = time.monotonic()
        state = start(state_dir, options=("--redis",), secret_env=secret_env)
        up_s = time.monotonic() - started
        # The config a user deploys: as printed, with a proxy on every node (as the RayService in
        # deploy/kuberay has) so that worker nodes answer while the head is down.
        printed = samtone("serve", "--print-config", "--model", str(tiny_model_dir), "--host", "0.0.0.0",
                          "--port", str(SERVE_PORT), "--replicas", "2", "--num-cpus", "0.5", env={})
        out, err = printed.communicate(timeout=120)
        assert printed.returncode == 0, err
        assert secret_env["SAMTONE_API_KEY"] not in out
        config = yaml.safe_load(out)
        assert config["applications"][0]["args"]["api_key_env"] == "SAMTONE_API_KEY"
        config["proxy_location"] = "EveryNode"
        path = state_dir / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        started = time.monotonic()
        deploy = subprocess.run([str(BIN / "serve"), "deploy", str(path), "-a", state.address], capture_output=True,
                                text=True, env=_client_env(state), timeout=300, check=False)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        served = Served(state, secret_env["SAMTONE_API_KEY"], Path(tiny_model_dir).name, secret_env)
        _wait("both replicas running", lambda: len(_replicas(state)) == 2, 300, every=2)
        print(f"\ncluster up in {up_s:.0f}s; `serve deploy` to both replicas running in {time.monotonic() - started:.0f}s")
        yield served
    finally:
        try:
            stop(state_dir, state)
        finally:
            signal.signal(signal.SIGTERM, previous)


def test_two_replicas_on_two_nodes_answer_behind_the_heads_proxy(served):
    """Two replicas, one on each worker node (Serve spreads them); the head's proxy, reached from
    outside the cluster, balances them; the key is asked for."""
    state = served.state
    replicas = _replicas(state)
    assert sorted(replicas.values()) == sorted(served.node_ips()), f"not one replica per worker node: {replicas}"
    url = served.url()
    status, body = _post(f"{url}/v1/embeddings", {"model": served.model, "input": ["apt pinning", "dpkg"]}, served.key)
    assert status == 200, body
    vectors = [d["embedding"] for d in body["data"]]
    assert len(vectors) == 2 and all(len(v) == 32 for v in vectors)  # the tiny BERT's width
    status, body = _post(f"{url}/v1/embeddings", {"model": served.model, "input": "x"}, None)
    assert status == 401, body
    status, body = _post(f"{url}/v1/embeddings", {"model": served.model, "input": "x"}, "not-" + served.key)
    assert status == 401, body
    # Both replicas take requests: each node's replica logs the requests it answered.
    before = {n.name: _answered(n) for n in state.nodes[1:]}
    with Load([url], served, clients=4) as load:
        time.sleep(4)
    assert not load.failed() and len(load.results) > 8, load.failed()[:5]
    time.sleep(1)  # the replicas' access logs are flushed
    answered = {n.name: _answered(n) - before[n.name] for n in state.nodes[1:]}
    assert all(answered.values()) and sum(answered.values()) >= len(load.results), answered
    print(f"\n2 replicas on {sorted(replicas.values())}: {len(load.results)} requests in 4 s through the head's proxy, "
          f"{load.rate(load.results[0][0], load.results[-1][1]):.0f}/s, 0 failed, answered by node: {answered}")


def _answered(node) -> int:
    """Requests to /v1/embeddings that the replicas of ``node`` answered 200, from their access logs."""
    logs = Path(node.temp_dir, "session_latest", "logs", "serve").glob("replica_samtone_Embedder_*.log")
    return sum(line.count("POST /v1/embeddings 200") for log in logs for line in log.read_text(errors="replace").splitlines())


def _victim(served: Served) -> str:
    """The name of a worker node that hosts a replica."""
    hosts = set(_replicas(served.state).values())
    return next(n.name for n in served.state.nodes[1:] if n.ip in hosts)


def test_a_serving_node_killed_under_load_fails_only_requests_in_flight(served):
    """SIGKILL to every process of a worker node that hosts a replica while 4 clients query
    through the head's proxy: the requests that fail are the ones sent before the kill (in flight
    on that replica, at most one per client); every request sent once the proxy has dropped the
    dead replica succeeds, and a replacement replica starts on the other node (Serve routes it no
    request before its model is loaded)."""
    state = served.state
    victim = _victim(served)
    node = next(n for n in state.nodes if n.name == victim)
    with Load([served.url()], served, clients=4) as load:
        time.sleep(3)
        killed = time.monotonic()
        kill_node(state, victim)
        _wait("a replacement replica running", lambda: len(_replicas(state)) == 2
              and node.ip not in _replicas(state).values(), 300, every=2)
        replaced = time.monotonic() - killed
        time.sleep(3)  # the replacement takes requests
    failed = load.failed()
    after = [r for r in load.results if r[0] > killed]
    last_failure = max((r[1] for r in failed), default=killed) - killed
    print(f"\nworker {victim} killed under {load.rate(killed - 3, killed):.0f} req/s: {len(failed)} of "
          f"{len(load.results)} requests failed ({sorted({str(r[2]) for r in failed})}), all ok again "
          f"{last_failure:.1f}s after the kill; replacement replica running after {replaced:.0f}s")
    assert all(r[0] < killed for r in failed), f"requests sent after the kill failed: {[r for r in failed if r[0] >= killed]}"
    assert len(failed) <= load.clients
    assert sum(r[2] == 200 for r in after) > 10
    started = time.monotonic()
    restart_node(state, victim, env=served.secret_env)  # a replacement machine joins
    print(f"node {victim} rejoined in {time.monotonic() - started:.0f}s")


def test_a_drained_node_loses_no_request(served):
    """`ray drain-node` (preemption, with a deadline) on the node that hosts the replicas: Serve
    starts replacements on the other node before it stops the drained ones; the node is then
    killed, as its deadline would. Not one request fails."""
    state = served.state
    victim = _victim(served)
    node = next(n for n in state.nodes if n.name == victim)
    node_id = next(r["node_id"] for r in state_api(state, "nodes") or [] if r["node_ip"] == node.ip and r["state"] == "ALIVE")
    with Load([served.url()], served, clients=4) as load:
        time.sleep(3)
        drained = time.monotonic()
        drain = subprocess.run(
            [str(BIN / "ray"), "drain-node", f"--address={state.gcs_address}", f"--node-id={node_id}",
             "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=samtone test: node preempted",
             "--deadline-remaining-seconds=600"], capture_output=True, text=True, env=_client_env(state), timeout=60,
            check=False)
        assert drain.returncode == 0, drain.stdout + drain.stderr
        _wait("the replicas moved off the drained node", lambda: len(_replicas(state)) == 2
              and node.ip not in _replicas(state).values(), 300, every=2)
        moved = time.monotonic() - drained
        kill_node(state, victim)
        time.sleep(3)
    failed = load.failed()
    print(f"\nworker {victim} drained under {load.rate(drained - 3, drained):.0f} req/s: replicas moved in {moved:.0f}s, "
          f"node then killed; {len(failed)} of {len(load.results)} requests failed")
    assert not failed, failed[:5]
    restart_node(state, victim, env=served.secret_env)


def test_the_head_lost_with_gcs_on_redis_leaves_the_replicas_answering(served):
    """The head killed (GCS, Serve controller, its proxy, everything in its namespace): the worker
    nodes' proxies and replicas answer on without it, with no failure, for as long as the nodes
    wait for a GCS to come back (600 s here, GCS fault tolerance on Redis). Starting the head again
    is ``restart_node(state, "head")``; on this 2-core machine under load its raylet missed Ray's
    fixed 30 s startup waits (docs/cluster.md#faults), so the test stops at the loss."""
    state = served.state
    workers = sorted(set(_replicas(state).values()))
    for ip in workers:  # each worker node with a replica runs a proxy (EveryNode)
        _wait(f"the proxy on {ip}", lambda ip=ip: _post(f"{served.url(ip)}/v1/embeddings",
                                                          {"model": served.model, "input": "x"}, served.key)[0] == 200, 120)
    with Load([served.url(ip) for ip in workers], served, clients=4) as load:
        time.sleep(3)
        killed = time.monotonic()
        kill_node(state, "head")
        time.sleep(HEADLESS_S)
    failed = load.failed()
    headless = [r for r in load.results if r[0] >= killed]
    print(f"\nhead killed: {len(headless)} requests through the worker nodes' proxies in the {HEADLESS_S:.0f} s "
          f"that followed ({len(headless) / HEADLESS_S:.0f}/s), {len(failed)} of {len(load.results)} failed")
    assert not failed, failed[:5]
    assert len(headless) > HEADLESS_S
