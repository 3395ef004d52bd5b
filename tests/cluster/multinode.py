"""A real three-node Ray cluster for tests: a head (0 CPUs) and two 1-CPU workers, each in a
network namespace of its own, token auth on, started and removed by ``scripts/local_cluster.sh``
(the script users run; its implementation is ``samtone_ray.cluster.local``).

Each node has its own Ray temp dir. The nodes share this machine's file system, so the input
model and data of a test may lie anywhere on it (a real cluster would read them from shared
storage); ``output_dir`` is accepted because every node is seen to read what is written there.
With ``--s3`` (the fixture's) the cluster also has an S3 server on the bridge: jobs write to
``s3://samtone/...`` as they would to a cluster's object store.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from samtone_ray.cluster.local import State, alive_nodes, free_net, net_in_use, state_api

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "local_cluster.sh"
# Far from the default (10.231.0.0/24, a user's cluster) and different per pytest process, so that
# concurrent test runs on one machine each get a subnet of their own.
NETS = [100 + (os.getpid() + i) % 150 for i in range(150)]


def script(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``env``: more environment for the script (and so for every node it starts): secrets a
    cluster's nodes get from a secret store rather than on a command line."""
    env = dict(os.environ) | {"SAMTONE_PYTHON": sys.executable} | (env or {})
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def leftovers(state: State) -> list[str]:
    """What of the cluster still exists after ``down``: names, links, processes in its groups."""
    from samtone_ray.cluster.local import _group_members

    found = net_in_use(state.net, len(state.nodes) - 1)
    found += [f"process group {n.pgid} ({n.name})" for n in state.nodes if n.pgid and _group_members(n.pgid)]
    if state.redis_pgid and _group_members(state.redis_pgid):
        found.append(f"process group {state.redis_pgid} (redis-server)")
    if state.s3_pgid and _group_members(state.s3_pgid):
        found.append(f"process group {state.s3_pgid} (moto_server)")
    return found


def start(state_dir: Path, *node_env: str, options: tuple[str, ...] = (), secret_env: dict[str, str] | None = None) -> State:
    """``options``: more `local_cluster.sh up` flags (e.g. ``--redis``)."""
    extra = [arg for item in node_env for arg in ("--env", item)] + list(options)
    for _ in range(3):  # a concurrent test run may claim the same free subnet first
        net = free_net(NETS)
        proc = script("up", "--state-dir", str(state_dir), "--net", str(net), *extra, env=secret_env)
        if proc.returncode == 0:
            state = State.load(state_dir)
            assert state is not None and sorted(alive_nodes(state) or []) == sorted(n.ip for n in state.nodes)
            return state
        if "in use" not in proc.stderr and "File exists" not in proc.stderr:
            break
    pytest.fail(f"scripts/local_cluster.sh up failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def stop(state_dir: Path, state: State | None) -> None:
    proc = script("down", "--state-dir", str(state_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if state is not None:
        assert not leftovers(state), f"left behind by down: {leftovers(state)}"


def train_workers(state: State) -> list[dict]:
    """The cluster's Ray Train workers (alive or dead) with the IP of their node."""
    ips = {n["node_id"]: n["node_ip"] for n in state_api(state, "nodes") or []}
    actors = state_api(state, "actors", filter_keys="class_name", filter_predicates="=",
                       filter_values="RayTrainWorker") or []
    return [a | {"node_ip": ips.get(a.get("node_id"))} for a in actors]


def write_tiny_beir(out: Path, *, train_pairs: int = 48, dev_queries: int = 16) -> Path:
    """A few dozen real Debian pairs and queries from the bundled sample, as a BEIR folder."""
    import json

    from samtone_ray.data.sources import bundled_sample_path, read_qrels

    src = bundled_sample_path()
    train = dict(list(read_qrels(src / "qrels" / "train.tsv").items())[:train_pairs])
    dev = dict(list(read_qrels(src / "qrels" / "dev.tsv").items())[:dev_queries])
    docs = {d for qrels in (train, dev) for q in qrels.values() for d in q}
    corpus = (src / "corpus.jsonl").read_text().splitlines()
    lines = [line for line in corpus if json.loads(line)["_id"] in docs] + corpus[:40]  # 40 distractors
    (out / "corpus.jsonl").write_text("\n".join(dict.fromkeys(lines)) + "\n")
    queries = set(train) | set(dev)
    (out / "queries.jsonl").write_text("\n".join(
        line for line in (src / "queries.jsonl").read_text().splitlines() if json.loads(line)["_id"] in queries) + "\n")
    (out / "qrels").mkdir()
    for split, qrels in (("train", train), ("dev", dev)):
        rows = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, ds in qrels.items() for d, s in ds.items()]
        (out / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return out


def samtone(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """The samtone CLI started as a user runs it on their own machine (the root namespace)."""
    full = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    full |= {"PYTHONPATH": str(REPO)} | env
    return subprocess.Popen([sys.executable, "-m", "samtone_ray.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=full)
