"""Which network interface carries the node's Ray IP, and the collective libraries bound to it."""

from __future__ import annotations

from samtone_ray.core.runtime import bind_collectives, interface_addresses, interface_for_address

ADDRESSES = {
    "lo": ["127.0.0.1", "::1"],
    "eth0": ["10.231.0.2", "fe80::1%eth0"],
    "eth1": ["192.168.7.5", "192.168.7.6", "fd00::7"],  # a second address on one device
}


def test_the_interface_is_the_one_holding_the_address():
    assert interface_for_address("10.231.0.2", ADDRESSES) == "eth0"
    assert interface_for_address("192.168.7.6", ADDRESSES) == "eth1"
    assert interface_for_address("127.0.0.1", ADDRESSES) == "lo"
    assert interface_for_address("fd00:0::7", ADDRESSES) == "eth1"  # compared as addresses, not strings
    assert interface_for_address("fe80::1", ADDRESSES) == "eth0"
    assert interface_for_address("10.231.0.3", ADDRESSES) is None
    assert interface_for_address("not-an-ip", ADDRESSES) is None


def test_this_machines_loopback_is_found():
    found = interface_addresses()
    loopback = interface_for_address("127.0.0.1", found)
    assert loopback is not None and "127.0.0.1" in found[loopback]
    assert all(":" not in name for name in found)  # alias labels (eth0:1) name their device


def test_gloo_and_nccl_are_bound_unless_the_user_named_an_interface():
    env: dict[str, str] = {}
    assert bind_collectives("10.231.0.2", env, ADDRESSES) == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}
    assert env == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}
    env = {"GLOO_SOCKET_IFNAME": "ib0"}
    assert bind_collectives("10.231.0.2", env, ADDRESSES) == {"NCCL_SOCKET_IFNAME": "eth0"}
    assert env["GLOO_SOCKET_IFNAME"] == "ib0"
    env = {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "ib1"}
    assert bind_collectives("10.231.0.2", env, ADDRESSES) == {} and env == {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "ib1"}
    env = {}
    assert bind_collectives("10.9.9.9", env, ADDRESSES) == {} and env == {}  # no such interface: left to gloo
