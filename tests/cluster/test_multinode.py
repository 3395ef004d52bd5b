"""Across real nodes (tests/cluster/multinode.py): a head and two workers in network namespaces of
their own, jobs submitted from outside the cluster as a user submits them."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from samtone_ray.cluster.local import Node, State, free_net, names, unavailable_reason

from cluster.multinode import NETS, samtone, script, train_workers, write_tiny_beir

pytestmark = pytest.mark.system


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(Path(directory).rglob("model.safetensors"))))


def _bucket(state: State):
    """The cluster's S3 bucket as this machine (outside the cluster) reads it, with the keys from
    the harness's 0600 file; pyarrow directly, not samtone's Store."""
    import pyarrow.fs as pafs

    from samtone_ray.cluster.local import S3_BUCKET, s3_env

    env = s3_env(state)
    fs = pafs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                           endpoint_override=env["AWS_ENDPOINT_URL"], region=env["AWS_DEFAULT_REGION"])
    return fs, S3_BUCKET


def _read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def test_two_workers_on_two_nodes_train_the_weights_of_one_process(
    multinode_cluster, ray_cluster, tiny_model_dir, tmp_path_factory
):
    """`samtone submit train` to the head's job server, 2 workers with STRICT_SPREAD: one on each
    worker node, so the loss's all_gather (with gradients) crosses nodes over TCP on gloo, bound
    to the nodes' interface by samtone alone (no GLOO_SOCKET_IFNAME anywhere). The final weights
    equal one process training on the same global batches (as tests/train/test_trainer.py checks
    on one node). ``output_dir`` is the cluster's S3 bucket: the multi-node check takes object
    storage as shared, and the model, history and Ray Train's checkpoints are objects there."""
    from samtone_ray.core.config import load_config
    from samtone_ray.data.sources import load_data
    from samtone_ray.train.trainer import train

    state = multinode_cluster
    root = tmp_path_factory.mktemp("multinode-train")
    # Input model and data on the file system the nodes share (they run on this one machine); a
    # real cluster would read them from shared storage.
    (root / "beir").mkdir()
    beir = write_tiny_beir(root / "beir")
    settings = {
        "name": "across-nodes",
        "model.name_or_path": str(tiny_model_dir), "model.query_max_length": 16, "model.doc_max_length": 32,
        "data.train": str(beir), "data.eval": str(beir),
        "loss.same_tower": "both", "loss.bidirectional": True,
        # fp32 and no warm-up, as the single-node equivalence test: numbers compared to 1e-5.
        "train.batch_size": 8, "train.lr": 1e-3, "train.max_steps": 6, "train.chunk_size": 3,
        "train.warmup_ratio": 0.0, "train.precision": "fp32", "train.eval_every": 6,
        "scaling.max_failures": 0, "tracking.enabled": False,
    }
    fs, bucket = _bucket(state)
    prefix = f"{bucket}/multinode-train/{root.name}"
    two = settings | {"scaling.num_workers": 2, "scaling.placement_strategy": "STRICT_SPREAD",
                      "output_dir": f"s3://{prefix}"}
    sets = [arg for key, value in two.items() for arg in ("--set", f"{key}={value}")]
    started = time.monotonic()
    job = samtone("submit", "train", "--address", state.address, "--follow", *sets, "--", "--no-baseline",
                  env=state.client_env())
    # The oracle, while the job runs (much of a job's time is processes starting): one worker on
    # the tests' own single-node cluster.
    cfg = load_config(None, [f"{k}={v}" for k, v in (settings | {"scaling.num_workers": 1,
                                                                 "output_dir": str(root / "one")}).items()])
    try:
        train(cfg, data=load_data(cfg))
        stdout, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    took = time.monotonic() - started
    assert job.returncode == 0, stdout[-4000:] + stderr[-4000:]
    assert "fine-tuned" in stdout  # the job's own output, tailed
    assert "'GLOO_SOCKET_IFNAME': 'eth0'" in stdout  # each worker bound gloo to its node's veth

    workers = train_workers(state)
    worker_ips = sorted(w["node_ip"] for w in workers)
    assert worker_ips == sorted(n.ip for n in state.nodes[1:]), f"not one worker per worker node: {workers}"
    assert not (root / "two").exists() and "s3:" not in {p.name for p in root.iterdir()}
    stored = {i.path for i in fs.get_file_info(pafs.FileSelector(prefix, recursive=True)) if i.is_file}
    assert {f"{prefix}/model/model.safetensors", f"{prefix}/trained_batches.json"} <= stored
    assert any(p.startswith(f"{prefix}/ray/") and p.endswith("/state.pt") for p in stored), stored  # checkpoints
    one = _weights(root / "one" / "model")
    across = load_safetensors(_read(fs, f"{prefix}/model/model.safetensors"))
    assert one.keys() == across.keys()
    worst = max((across[k] - one[k]).abs().max().item() for k in one)
    waited = "job agent is not ready yet" in stderr  # a head a few seconds old: submit waits for it
    print(f"\njob across nodes {state.nodes[1].ip} and {state.nodes[2].ip}: {took:.0f}s from submit to end "
          f"(the oracle ran meanwhile){', waited for the job agent' if waited else ''}; "
          f"max |weight difference| to one process: {worst:.2e} over {len(one)} tensors")
    for name in one:
        torch.testing.assert_close(across[name], one[name], atol=1e-5, rtol=1e-4, msg=name)


def _embed_actor_ips(state: State) -> list[str]:
    """The node IPs of the cluster's live Ray Data actors that run EmbedWriter."""
    from cluster.multinode import state_api

    ips = {n["node_id"]: n["node_ip"] for n in state_api(state, "nodes") or []}
    actors = state_api(state, "actors") or []
    return sorted(ips.get(a.get("node_id")) for a in actors
                  if "EmbedWriter" in (a.get("class_name") or "") and a.get("state") == "ALIVE")


def _encode_job(state: State, model, corpus: Path, output: str, *extra: str):
    return samtone("submit", "encode", "--address", state.address, "--follow", "--", "--model", str(model),
                   "--input", str(corpus), "--output", output, "--batch-size", "4", "--precision", "fp32", *extra,
                   env=state.client_env())


def _write_corpus(path: Path, n: int, seed: int) -> list[dict]:
    import json

    import numpy as np

    words = ["debian", "package", "kernel", "mount", "disk", "network", "apt", "grub", "sound", "driver"]
    rng = np.random.default_rng(seed)
    docs = [{"_id": f"d{i}", "text": " ".join(rng.choice(words, size=int(rng.integers(1, 24))))} for i in range(n)]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))  # on the file system the nodes share
    return docs


def _stored_ids(fs, prefix: str) -> tuple[list[str], list[str]]:
    """(part objects, the ids they hold), read from the bucket."""
    import io

    import pyarrow.parquet as pq

    parts = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(prefix, allow_not_found=True))
                   if i.base_name.startswith("part-"))
    ids = [i for p in parts for i in pq.read_table(io.BytesIO(_read(fs, p)), columns=["id"]).column("id").to_pylist()]
    return parts, ids


def test_down_removes_only_what_it_created_and_up_refuses_names_in_use(tmp_path):
    """A namespace of the cluster's name that it did not create (another inode) is left alone by
    `down`; `up` refuses its subnet while the namespace exists; `down` twice is harmless."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"needs root and `ip netns`: {reason}")
    net = free_net(NETS)
    bridge, plan = names(net, 2)
    node, netns, ip, veth = plan[0]
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    # What a cluster recorded, for a namespace of this name that has since been replaced.
    State(net=net, bridge=bridge, state_dir=str(state_dir),
          nodes=[Node(name=node, netns=netns, ip=ip, host_veth=veth, netns_inode=1)]).save()
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        down = script("down", "--state-dir", str(state_dir))
        assert down.returncode == 1 and f"left alone: network namespace {netns}" in down.stdout, down.stdout + down.stderr
        assert Path(f"/run/netns/{netns}").exists()
        again = script("down", "--state-dir", str(state_dir))
        assert again.returncode == 0 and "nothing to do" in again.stdout
        up = script("up", "--state-dir", str(tmp_path / "other"), "--net", str(net))
        assert up.returncode == 2 and f"network namespace {netns}" in up.stderr and "left alone" in up.stderr, up.stderr
        assert not (tmp_path / "other" / "state.json").exists()
        assert not Path(f"/sys/class/net/{bridge}").exists()
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


def test_encode_across_nodes_into_s3_survives_a_worker_node_killed_mid_run(multinode_cluster, tiny_model_dir, tmp_path):
    """`samtone submit encode` with two embedding actors, one on each worker node, each committing
    its shards' Parquet files to the cluster's S3. Once both actors run and some shards are in the
    bucket, one worker node is lost: SIGKILL to its whole process group and whatever else runs in
    its namespace. The job (its driver runs on the head) finishes on the other node, and the bucket
    holds every id exactly once, with the embedding the model gives it here (the oracle). Last in
    this module: the node stays dead (the fixture's `down` removes it)."""
    import io
    import json
    import os
    import signal

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from samtone_ray.cluster.local import _kill_netns_leftovers
    from samtone_ray.model.towers import DualEncoder

    state = multinode_cluster
    docs = _write_corpus(tmp_path / "corpus.jsonl", 60, seed=13)
    fs, bucket = _bucket(state)
    prefix = f"{bucket}/multinode-encode/{tmp_path.name}"
    # 0.25 CPU per actor: the two spread over the two 1-CPU workers (Ray Data's default), and after
    # the kill the survivor, its lost twin restarted beside it and the tokenising tasks all fit the
    # one node that is left.
    started = time.monotonic()
    job = _encode_job(state, tiny_model_dir, tmp_path / "corpus.jsonl", f"s3://{prefix}", "--actors", "2",
                      "--cpus-per-actor", "0.25", "--rows-per-file", "2")
    victim = state.nodes[2]
    killed_at = committed = None
    spread = []
    try:
        deadline = time.monotonic() + 500
        while job.poll() is None and time.monotonic() < deadline:
            committed = len(_stored_ids(fs, prefix)[0])
            spread = _embed_actor_ips(state)
            if committed >= 2 and spread == sorted(n.ip for n in state.nodes[1:]):
                os.killpg(victim.pgid, signal.SIGKILL)  # the node's `ray start --block` and every Ray process under it
                _kill_netns_leftovers(victim.netns)
                killed_at = time.monotonic()
                break
            time.sleep(0.5)
        assert killed_at is not None and committed < 30, \
            f"no kill while both actors ran and shards were pending (committed {committed}, actors on {spread})"
        stdout, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    recovered = time.monotonic() - killed_at
    assert job.returncode == 0, stdout[-4000:] + stderr[-4000:]
    parts, ids = _stored_ids(fs, prefix)
    assert len(parts) == 30 and sorted(ids) == sorted(d["_id"] for d in docs) and len(ids) == len(docs)  # exactly once
    assert json.loads(_read(fs, f"{prefix}/manifest.json"))["rows"] == len(docs)
    table = pa.concat_tables(pq.read_table(io.BytesIO(_read(fs, p))) for p in parts)
    emb = table.column("embedding").combine_chunks()
    expected = DualEncoder.from_pretrained(tiny_model_dir).encode_documents([d["text"] for d in docs]).numpy()
    row = {d["_id"]: i for i, d in enumerate(docs)}
    np.testing.assert_allclose(np.asarray(emb.values).reshape(-1, emb.type.list_size),
                               expected[[row[i] for i in table.column("id").to_pylist()]], atol=1e-5)
    print(f"\nencode into s3://{prefix} with actors on {spread}: worker node {victim.ip} killed after "
          f"{killed_at - started:.0f}s with {committed}/30 shards in S3; the job finished {recovered:.0f}s later on "
          "the other node, every id once")
