"""Across real nodes (tests/cluster/multinode.py): a head and two workers in network namespaces of
their own, jobs submitted from outside the cluster as a user submits them."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from samtone_ray.cluster.local import Node, State, free_net, names, unavailable_reason

from cluster.multinode import NETS, samtone, script, train_workers, write_tiny_beir

pytestmark = pytest.mark.system


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(Path(directory).rglob("model.safetensors"))))


def test_two_workers_on_two_nodes_train_the_weights_of_one_process(
    multinode_cluster, ray_cluster, tiny_model_dir, tmp_path_factory
):
    """`samtone submit train` to the head's job server, 2 workers with STRICT_SPREAD: one on each
    worker node, so the loss's all_gather (with gradients) crosses nodes over TCP on gloo, bound
    to the nodes' interface by samtone alone (no GLOO_SOCKET_IFNAME anywhere). The final weights
    equal one process training on the same global batches (as tests/train/test_trainer.py checks
    on one node)."""
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
    two = settings | {"scaling.num_workers": 2, "scaling.placement_strategy": "STRICT_SPREAD",
                      "output_dir": str(root / "two")}
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
    one, across = _weights(root / "one" / "model"), _weights(root / "two" / "model")
    assert one.keys() == across.keys()
    worst = max((across[k] - one[k]).abs().max().item() for k in one)
    waited = "job agent is not ready yet" in stderr  # a head a few seconds old: submit waits for it
    print(f"\njob across nodes {state.nodes[1].ip} and {state.nodes[2].ip}: {took:.0f}s from submit to end "
          f"(the oracle ran meanwhile){', waited for the job agent' if waited else ''}; "
          f"max |weight difference| to one process: {worst:.2e} over {len(one)} tensors")
    for name in one:
        torch.testing.assert_close(across[name], one[name], atol=1e-5, rtol=1e-4, msg=name)


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
