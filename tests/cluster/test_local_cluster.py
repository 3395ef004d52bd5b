"""The local multi-node cluster's bookkeeping, without creating anything (tests/cluster/test_multinode.py
builds a real one)."""

from __future__ import annotations

import os
import sys

from samtone_ray.cluster.local import DROPPED_ENV, Node, State, down, names, node_env


def test_names_fit_linux_interface_names_and_follow_the_subnet():
    bridge, plan = names(255, 9)
    assert bridge == "samtone-br255"
    assert [(n, ip) for n, _, ip, _ in plan][:3] == [("head", "10.231.255.1"), ("w1", "10.231.255.2"), ("w2", "10.231.255.3")]
    for _, netns, _, veth in plan:
        assert len(veth) <= 15 and len(bridge) <= 15 and netns.startswith("samtone255-")
    assert names(0, 2)[0] == "samtone-br0"


def test_the_state_round_trips_and_clients_get_the_token_path_not_the_token(tmp_path):
    state = State(net=7, bridge="samtone-br7", state_dir=str(tmp_path), bridge_ifindex=12, token_path=str(tmp_path / "auth_token"),
                  nodes=[Node("head", "samtone7-head", "10.231.7.1", "st7-head", netns_inode=5, pgid=99)])
    state.save()
    loaded = State.load(tmp_path)
    assert loaded == state and loaded.address == "http://10.231.7.1:8265" and loaded.gcs_address == "10.231.7.1:6379"
    assert loaded.client_env() == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "auth_token"),
                                   "RAY_API_SERVER_ADDRESS": "http://10.231.7.1:8265"}


def test_nodes_run_this_environment_with_token_auth_and_nothing_that_would_break_them(tmp_path, monkeypatch):
    for key in DROPPED_ENV:
        monkeypatch.setenv(key, "0")
    state = State(net=7, bridge="b", state_dir=str(tmp_path), token_path="/x/auth_token",
                  nodes=[Node("head", "n", "10.231.7.1", "v")])
    env = node_env(state, {"EXTRA": "1"})
    assert env["PATH"].split(":")[0] == os.path.dirname(sys.executable)
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == "/x/auth_token"
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env and "RAY_ADDRESS" not in env and "RAY_AUTH_TOKEN" not in env
    assert env["RAY_API_SERVER_ADDRESS"] == "http://10.231.7.1:8265" and env["EXTRA"] == "1"


def test_down_without_a_recorded_cluster_does_nothing(tmp_path, capsys):
    assert down(tmp_path) == []
    assert "nothing to do" in capsys.readouterr().out


def test_a_local_file_system_every_node_was_seen_to_share_is_accepted():
    """Nodes on one machine (this cluster) share its disk: `check_ray_cluster` shows it by having a
    task on every node read a file written there, and then accepts an ext4 output_dir."""
    import pytest

    from samtone_ray.core.runtime import ClusterConfigError, check_cluster

    with pytest.raises(ClusterConfigError, match="local to one node"):
        check_cluster(3, None, "/tmp/out", "ext4")
    check_cluster(3, None, "/tmp/out", "ext4", output_seen_by_all=True)


def test_nodes_get_the_s3_keys_from_a_0600_file_and_status_never_prints_them(tmp_path, capsys):
    """`up --s3`: fresh keys in <state dir>/s3.env (owner-only), the endpoint on the bridge; every
    node's environment carries them; `status` names the file, never a key."""
    from samtone_ray.cluster.local import S3_ENV_FILE, _prepare_s3, status

    state = State(net=7, bridge="b", state_dir=str(tmp_path), token_path=str(tmp_path / "auth_token"),
                  nodes=[Node("head", "n", "10.231.7.1", "v")])
    (tmp_path / "auth_token").write_text("t")
    _prepare_s3(state)
    path = tmp_path / S3_ENV_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    env = node_env(state, {})
    assert env["AWS_ENDPOINT_URL"] == f"http://10.231.7.254:{state.s3_port}"
    secret = env["AWS_SECRET_ACCESS_KEY"]
    assert len(secret) == 40 and secret in path.read_text() and env["AWS_ACCESS_KEY_ID"] in path.read_text()
    assert State.load(tmp_path).s3_port == state.s3_port and secret not in (tmp_path / "state.json").read_text()
    status(tmp_path)
    out = capsys.readouterr().out
    assert str(path) in out and secret not in out and env["AWS_ACCESS_KEY_ID"] not in out
