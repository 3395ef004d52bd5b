"""A real multi-node Ray cluster on one Linux machine: each node in a network namespace of its own.

``up`` builds, as root: a bridge in the root namespace (``samtone-br<N>``, 10.231.<N>.254/24), one
network namespace per node joined to it by a veth pair (the node's side is ``eth0``), a head at
10.231.<N>.1 started with ``--num-cpus=0`` (as KubeRay recommends: the head only coordinates) and
workers at .2, .3, ... Each node is ``ray start --block`` in a new session (``setsid``) inside its
namespace (``ip netns exec``), with a Ray temp dir of its own, Ray token auth on (one generated
token, in a mode-0600 file that every node and client reads; never printed) and this Python
environment first on ``PATH`` (a job's entrypoint runs ``python`` from ``PATH``, as in a cluster
image). The root namespace reaches every node through the bridge, as a laptop reaches a cluster.

Everything created is recorded in ``<state dir>/state.json`` as it is created, with the identity of
each namespace (its inode) and link (its ifindex), so ``down`` removes exactly that and nothing
else: processes by the process groups it recorded (SIGTERM, then SIGKILL), then any process still
inside a namespace it created, then the namespaces, veths and bridge. A name that now belongs to
something else is left alone (and said so). ``down`` is idempotent, and also cleans up after a
failed ``up``.

Used by ``scripts/local_cluster.sh`` (for users) and the multi-node test fixture alike.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

GCS_PORT = 6379
DASHBOARD_PORT = 8265
STATE_FILE = "state.json"
TOKEN_FILE = "auth_token"
S3_ENV_FILE = "s3.env"  # AWS_* of the cluster's S3 server, mode 0600: what every node gets
S3_BUCKET = "samtone"
# Set on a node, they would break or redirect it: Windows/OSX mode refuses worker nodes even on
# Linux; an inherited address or token would point the node's processes at another cluster.
DROPPED_ENV = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN",
               "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")


class LocalClusterError(RuntimeError):
    """The cluster cannot be built or removed as asked; the message says why."""


@dataclass
class Node:
    name: str  # head, w1, w2, ...
    netns: str
    ip: str
    host_veth: str
    temp_dir: str = ""
    netns_inode: int | None = None
    veth_ifindex: int | None = None
    pgid: int | None = None  # the `ray start --block` process, leader of its own session and group
    log: str = ""
    args: list[str] = field(default_factory=list)  # what `ray start` was given, for `restart_node`


@dataclass
class State:
    net: int
    bridge: str
    state_dir: str
    s3_port: int | None = None  # an S3 server (moto) on the bridge address, when `up --s3`
    s3_pgid: int | None = None
    bridge_ifindex: int | None = None
    nodes: list[Node] = field(default_factory=list)
    token_path: str = ""
    env: dict[str, str] = field(default_factory=dict)  # the extra node environment, for `restart_node`
    redis_port: int | None = None  # GCS fault tolerance: the head keeps its state in this redis-server
    redis_pgid: int | None = None

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def bridge_ip(self) -> str:
        return subnet_ip(self.net, 254)

    @property
    def address(self) -> str:
        """The head's job server / dashboard, reachable from the root namespace."""
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    @property
    def gcs_address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    @property
    def redis_address(self) -> str | None:
        return f"{self.bridge_ip}:{self.redis_port}" if self.redis_port else None

    def client_env(self) -> dict[str, str]:
        """What a client (``samtone submit``, ``ray job submit``, the state API) needs to reach the cluster."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path, "RAY_API_SERVER_ADDRESS": self.address}

    def save(self) -> None:
        path = Path(self.state_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, state_dir: str | os.PathLike[str]) -> State | None:
        path = Path(state_dir) / STATE_FILE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        raw["nodes"] = [Node(**n) for n in raw.get("nodes", [])]
        return cls(**raw)


def subnet_ip(net: int, host: int) -> str:
    return f"10.231.{net}.{host}"


def names(net: int, workers: int) -> tuple[str, list[tuple[str, str, str, str]]]:
    """(bridge, [(node, netns, ip, host-side veth)]); interface names stay within Linux's 15 characters."""
    nodes = ["head"] + [f"w{i}" for i in range(1, workers + 1)]
    return f"samtone-br{net}", [(n, f"samtone{net}-{n}", subnet_ip(net, i + 1), f"st{net}-{n}") for i, n in enumerate(nodes)]


# ------------------------------------------------------------------------------------ system


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise LocalClusterError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def unavailable_reason() -> str | None:
    """Why this machine cannot host the cluster (None when it can): root and ``ip netns`` are needed."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces, veth pairs and a bridge needs root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed (Debian/Ubuntu: apt-get install -y iproute2)"
    try:
        proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns list` failed: {exc}"
    if proc.returncode != 0:
        return f"`ip netns` is unavailable: {proc.stderr.strip()}"
    probe = f"samtone-probe-{os.getpid()}"  # root in an unprivileged container still may not create one
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        return f"`ip netns add` is not permitted here: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30, check=False)
    return None


def _netns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def _ifindex(name: str) -> int | None:
    try:
        return int(Path(f"/sys/class/net/{name}/ifindex").read_text())
    except (OSError, ValueError):
        return None


def _addresses_in_subnet(net: int) -> list[str]:
    """Root-namespace interfaces that already hold an address in 10.231.<net>.0/24."""
    out = _ip("-o", "-4", "addr", "show").stdout
    prefix = f"10.231.{net}."
    return [f"{f[1]} ({f[3]})" for f in (line.split() for line in out.splitlines()) if len(f) > 3 and f[3].startswith(prefix)]


def net_in_use(net: int, workers: int = 2) -> list[str]:
    """What already holds a name or an address of cluster ``net`` in the root namespace."""
    bridge, plan = names(net, workers)
    taken = [f"network namespace {ns}" for _, ns, _, _ in plan if _netns_inode(ns) is not None]
    taken += [f"link {name}" for name in [bridge, *(v for *_, v in plan)] if _ifindex(name) is not None]
    return taken + [f"address {a}" for a in _addresses_in_subnet(net)]


def free_net(candidates, workers: int = 2) -> int:
    """The first of ``candidates`` (third octets) whose names and subnet nothing holds."""
    for net in candidates:
        if not net_in_use(net, workers):
            return net
    raise LocalClusterError(f"every candidate subnet 10.231.<net>.0/24 is in use: {list(candidates)}")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


def stop_groups(pgids: list[int], *, grace_s: float = 5.0) -> None:
    """SIGTERM to every group at once, SIGKILL to what is left after ``grace_s``: ``ray start
    --block`` and Ray's runtime-env agent often outlive a SIGTERM by 10 s and more, and a node of
    this cluster keeps nothing worth a longer wait (no GCS persistence)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pgids = [g for g in pgids if _group_members(g)]
        for pgid in pgids:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while any(_group_members(g) for g in pgids) and time.monotonic() < deadline:
            time.sleep(0.2)


def _kill_netns_leftovers(netns: str) -> None:
    """SIGKILL whatever still runs inside a namespace this cluster created (a process that left its
    group, e.g. by starting a session of its own)."""
    proc = _ip("netns", "pids", netns, check=False)
    for pid in (int(p) for p in proc.stdout.split() if p.isdigit()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------------ up


def _write_token(path: Path) -> None:
    """A new 256-bit token in a file only its owner may read (Ray's own generator does the same)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def node_env(state: State, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    bindir = os.path.dirname(sys.executable)  # not resolved: a venv's bin/python is a symlink
    env.update({
        "PATH": f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": state.token_path,
        "RAY_USAGE_STATS_ENABLED": "0",
        # Every process on every node asks the head's state API, never "the latest local cluster".
        "RAY_API_SERVER_ADDRESS": state.address,
    })
    env.update(s3_env(state))
    env.update(extra or {})
    return env


def s3_env(state: State) -> dict[str, str]:
    """The AWS variables of the cluster's S3 server (none without one), read from their 0600 file:
    a node's environment is the only other place they go."""
    if not state.s3_port:
        return {}
    lines = (Path(state.state_dir) / S3_ENV_FILE).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _prepare_s3(state: State) -> None:
    """A port and fresh credentials for the S3 server, in a file only its owner reads, before any
    node starts (each node's environment carries them); the server itself starts once the bridge
    that it listens on exists (``_start_s3``)."""
    from samtone_ray.core.runtime import free_loopback_port

    state.s3_port = free_loopback_port()  # the bridge it will listen on does not exist yet
    fd = os.open(Path(state.state_dir) / S3_ENV_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"AWS_ENDPOINT_URL=http://{state.bridge_ip}:{state.s3_port}\n"
                f"AWS_ACCESS_KEY_ID=samtone{secrets.token_hex(6)}\nAWS_SECRET_ACCESS_KEY={secrets.token_hex(20)}\n"
                "AWS_DEFAULT_REGION=us-east-1\n")
    state.save()


def _start_s3(state: State) -> None:
    """moto's S3 server (PyPI ``moto[server]``: the real S3 HTTP API, objects in memory) on the
    bridge address, which every node reaches as a cluster reaches its object store, with the bucket
    ``samtone``. For tests and trials on this machine only: nothing persists it."""
    import pyarrow.fs as pafs

    moto = Path(sys.executable).parent / "moto_server"
    if not moto.exists():
        raise LocalClusterError("--s3 needs moto's S3 server in this environment (pip install 'moto[server]')")
    log = Path(state.state_dir) / "s3.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(moto), "-H", state.bridge_ip, "-p", str(state.s3_port)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    state.s3_pgid = proc.pid
    state.save()
    deadline = time.monotonic() + 60
    while not _listening(state.bridge_ip, state.s3_port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LocalClusterError(f"moto_server did not listen at {state.bridge_ip}:{state.s3_port}:\n"
                                    f"{log.read_text()[-2000:]}")
        time.sleep(0.2)
    env = s3_env(state)
    pafs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                      endpoint_override=env["AWS_ENDPOINT_URL"], region=env["AWS_DEFAULT_REGION"],
                      allow_bucket_creation=True).create_dir(S3_BUCKET)


def _start_node(state: State, node: Node, args: list[str], env: dict[str, str]) -> None:
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    if not node.temp_dir:  # a restarted node keeps its own
        node.temp_dir = tempfile.mkdtemp(prefix=f"samtone{state.net}-{node.name}-", dir="/tmp")  # short: unix socket paths
    node.log = str(Path(state.state_dir) / f"{node.name}.log")
    node.args = list(args)
    with open(node.log, "a") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", node.netns, ray, "start", "--block", f"--node-ip-address={node.ip}",
             f"--temp-dir={node.temp_dir}", "--disable-usage-stats", *args],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # setsid: its own session and process group, stopped as one
        )
    node.pgid = proc.pid
    state.save()


def state_api(state: State, resource: str, timeout_s: float = 5.0, **params: str) -> list[dict] | None:
    """Rows of the head's state API (``nodes``, ``actors``, ...), asked with the cluster's token;
    None when it does not answer."""
    token = Path(state.token_path).read_text().strip()
    query = urllib.parse.urlencode({"limit": "10000", "detail": "true", **params})
    req = urllib.request.Request(f"{state.address}/api/v0/{resource}?{query}", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.load(resp)["data"]["result"]["result"]
    except (OSError, urllib.error.URLError, ValueError, KeyError, TypeError):
        return None


def alive_nodes(state: State, timeout_s: float = 5.0) -> list[str] | None:
    """IPs of the nodes the head's state API lists as alive; None when it does not answer."""
    rows = state_api(state, "nodes", timeout_s)
    return None if rows is None else sorted(r["node_ip"] for r in rows if r.get("state") == "ALIVE")


def _listening(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=1):
            return True
    except OSError:
        return False


def _fail_if_exited(node: Node) -> None:
    if node.pgid is not None and not _group_members(node.pgid):
        tail = Path(node.log).read_text()[-3000:] if node.log and Path(node.log).exists() else ""
        raise LocalClusterError(f"`ray start` on {node.name} ({node.ip}) exited:\n{tail}")


def up(
    state_dir: str | os.PathLike[str],
    *,
    net: int = 0,
    workers: int = 2,
    cpus_per_worker: int = 1,
    object_store_mb: int = 256,
    env: dict[str, str] | None = None,
    redis: bool = False,
    s3: bool = False,
    timeout_s: float = 180.0,
) -> State:
    """Build the cluster and start its nodes; returns once every node is alive in the head's state API.

    ``redis``: GCS fault tolerance. A ``redis-server`` of the cluster's own, in the root namespace on
    the bridge address (reachable from the head, as an external Redis is), holds the GCS's state, so
    that a restarted head (``restart_node(state, "head")``) takes the cluster back.

    ``s3``: an S3 server (moto) on the bridge address with the bucket ``samtone``; every node gets
    its AWS_* variables (``AWS_ENDPOINT_URL`` and generated keys, kept in ``s3.env``, mode 0600).

    On any failure everything created so far is removed again (``down``) before the error is raised.
    """
    reason = unavailable_reason()
    if reason:
        raise LocalClusterError(reason)
    if not 0 <= net <= 255:
        raise LocalClusterError(f"--net must be 0..255 (the third octet of 10.231.<net>.0/24); got {net}")
    if not 1 <= workers <= 9:  # .2 to .10; node names w1..w9 keep veth names within 15 characters
        raise LocalClusterError(f"--workers must be 1..9; got {workers}")
    state_dir = Path(state_dir).resolve()
    existing = State.load(state_dir)
    if existing is not None:
        raise LocalClusterError(
            f"{state_dir} already records a cluster (10.231.{existing.net}.0/24): run `down` first"
        )
    bridge, plan = names(net, workers)
    taken = net_in_use(net, workers)
    if taken:
        raise LocalClusterError(
            f"10.231.{net}.0/24 is in use here ({', '.join(taken)}), not by a cluster recorded in {state_dir}: "
            "left alone. Pick another --net, or `down` with the state dir that created it."
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    if redis and shutil.which("redis-server") is None:
        raise LocalClusterError("--redis needs `redis-server` (Debian/Ubuntu: apt-get install -y redis-server)")
    state = State(net=net, bridge=bridge, state_dir=str(state_dir), env=dict(env or {}))
    state.save()
    try:
        if s3:
            _prepare_s3(state)
        _build(state, plan, workers=workers, cpus_per_worker=cpus_per_worker, object_store_mb=object_store_mb,
               redis=redis, timeout_s=timeout_s)
        if s3:
            _start_s3(state)
    except BaseException:
        down(state_dir, quiet=True)
        raise
    return state


def _build(state: State, plan, *, workers, cpus_per_worker, object_store_mb, redis, timeout_s) -> None:
    # The bridge's name is the claim on the subnet: creating it fails if a concurrent `up` won.
    _ip("link", "add", state.bridge, "type", "bridge")
    state.bridge_ifindex = _ifindex(state.bridge)
    state.save()
    _ip("addr", "add", f"{state.bridge_ip}/24", "dev", state.bridge)
    _ip("link", "set", state.bridge, "up")
    for name, netns, ip, veth in plan:
        node = Node(name=name, netns=netns, ip=ip, host_veth=veth)
        state.nodes.append(node)
        _ip("netns", "add", netns)
        node.netns_inode = _netns_inode(netns)
        state.save()
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        node.veth_ifindex = _ifindex(veth)
        state.save()
        _ip("link", "set", veth, "master", state.bridge, "up")
        _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
    token = Path(state.state_dir) / TOKEN_FILE
    _write_token(token)
    state.token_path = str(token)
    state.save()

    if redis:
        _start_redis(state)
    store = f"--object-store-memory={object_store_mb << 20}"
    _start_node(state, state.head, [
        "--head", f"--port={GCS_PORT}", "--num-cpus=0", "--include-dashboard=true", "--dashboard-host=0.0.0.0",
        f"--dashboard-port={DASHBOARD_PORT}", store,
    ], _node_environ(state, state.head))
    deadline = time.monotonic() + timeout_s
    _wait_gcs(state, deadline, timeout_s)
    for node in state.nodes[1:]:
        _start_node(state, node, [f"--address={state.gcs_address}", f"--num-cpus={cpus_per_worker}", store],
                    _node_environ(state, node))
    _wait_alive(state, sorted(n.ip for n in state.nodes), deadline, timeout_s)


def _node_environ(state: State, node: Node) -> dict[str, str]:
    extra = {}
    if state.redis_address:
        # Nodes wait this long for a restarted GCS before they exit (Ray's default, 60 s, is less
        # than a loaded head takes to come back); KubeRay gives workers 600 s with GCS FT on.
        extra["RAY_gcs_rpc_server_reconnect_timeout_s"] = "600"
        if node is state.head:
            extra["RAY_REDIS_ADDRESS"] = state.redis_address
    return node_env(state, extra | state.env)


def _check_started(state: State, node: Node, tried: dict[str, list[int]], env: dict[str, str] | None) -> None:
    """Raise if ``node``'s `ray start` (its group's leader: an agent it started may outlive it)
    exited, unless it missed Ray's startup timeout with retries left: then start it again.
    ``tried``: node -> log offsets where its retries began."""
    if node.pgid is None or _alive(node.pgid):
        return
    log = Path(node.log).read_text() if node.log and Path(node.log).exists() else ""
    if len(tried.get(node.name, [])) < STARTUP_RETRIES and STARTUP_TIMEOUT in log[(tried.get(node.name) or [0])[-1]:]:
        tried.setdefault(node.name, []).append(len(log))
        print(f"`ray start` on {node.name} ({node.ip}) timed out registering its raylet: starting it again",
              file=sys.stderr, flush=True)
        kill_node(state, node.name)
        _restart(state, node, env)
        return
    raise LocalClusterError(f"`ray start` on {node.name} ({node.ip}) exited:\n{log[-3000:]}")


def _restart(state: State, node: Node, env: dict[str, str] | None) -> None:
    """`ray start` again on ``node`` with the arguments it had."""
    if node is state.head:
        # `ray start --head` refuses an address that its temp dir names as the last cluster while a
        # process of this machine carries `--gcs-address` with it: here the workers' own processes.
        Path(node.temp_dir, "ray_current_cluster").unlink(missing_ok=True)
    _start_node(state, node, node.args, _node_environ(state, node) | (env or {}))


def _wait_gcs(state: State, deadline: float, timeout_s: float) -> None:
    """Until the head's GCS listens (workers may join then; its dashboard comes up in parallel)."""
    while not _listening(state.head.ip, GCS_PORT):
        _fail_if_exited(state.head)
        if time.monotonic() > deadline:
            raise LocalClusterError(f"the head's GCS did not listen at {state.gcs_address} within {timeout_s:.0f}s")
        time.sleep(0.5)


# `ray start` gives a node's raylet a fixed 30 s to register with the GCS, and a raylet gives its
# agents a fixed 30 s to write their ports; on a loaded machine (a suite beside other work on 2
# cores: its Python agents took over 30 s to start) a node misses that now and then.
STARTUP_TIMEOUT = "timed out during startup"
STARTUP_RETRIES = 2


def _wait_alive(state: State, want: list[str], deadline: float, timeout_s: float, env: dict[str, str] | None = None) -> None:
    """Until the head lists exactly ``want`` alive; a node whose `ray start` missed Ray's startup
    timeout is started again (``STARTUP_RETRIES`` times, saying so), any other exit is an error."""
    tried: dict[str, list[int]] = {}
    while (alive := alive_nodes(state)) != want:
        for node in state.nodes:
            _check_started(state, node, tried, env)
        if time.monotonic() > deadline:
            raise LocalClusterError(f"alive nodes after {timeout_s:.0f}s: {alive}; expected {want}")
        time.sleep(0.5)


def _start_redis(state: State) -> None:
    """The GCS's external store, for a cluster on this machine only: bound to the bridge address,
    which only this machine reaches, so without a password (Redis' protected mode would refuse the
    head otherwise) and without snapshots (the GCS restarts here, not Redis). A production Redis is
    highly available, persistent and asks for a password."""
    with socket.socket() as sock:
        sock.bind((state.bridge_ip, 0))
        state.redis_port = sock.getsockname()[1]
    log = Path(state.state_dir) / "redis.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["redis-server", "--bind", state.bridge_ip, "--port", str(state.redis_port), "--protected-mode", "no", "--save", "",
             "--appendonly", "no", "--dir", state.state_dir],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    state.redis_pgid = proc.pid
    state.save()
    deadline = time.monotonic() + 30
    while not _listening(state.bridge_ip, state.redis_port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LocalClusterError(f"redis-server did not listen at {state.redis_address}:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)


# ------------------------------------------------------------------------------------ faults


def kill_node(state: State, name: str) -> None:
    """A node lost at once, as a machine that dies: SIGKILL to its process group and to whatever
    else runs in its namespace; the namespace and its address stay for ``restart_node``."""
    node = _node(state, name)
    if node.pgid is not None:
        try:
            os.killpg(node.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _kill_netns_leftovers(node.netns)
    deadline = time.monotonic() + 10
    while node.pgid is not None and _group_members(node.pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


def restart_node(state: State, name: str, *, env: dict[str, str] | None = None, timeout_s: float = 120.0) -> None:
    """Start node ``name`` again (after ``kill_node``) in its namespace, with its IP, temp dir and
    `ray start` arguments; returns once the head lists every node alive again. The node's
    environment is built as ``up`` built it, from this process's (plus ``env``: the secrets a node
    gets from a secret store, not kept in the state file). A restarted head takes the cluster back
    only with GCS fault tolerance (``up(redis=True)``)."""
    node = _node(state, name)
    before = {r["node_id"] for r in state_api(state, "nodes") or [] if r.get("node_ip") == node.ip}
    kill_node(state, name)
    _restart(state, node, env)
    deadline = time.monotonic() + timeout_s
    # A node that comes back is a new Ray node (a new id at the same IP); the dead one may still
    # be listed alive for a while.
    tried: dict[str, list[int]] = {}
    while not any(r.get("node_ip") == node.ip and r.get("state") == "ALIVE" and r["node_id"] not in before
                  for r in state_api(state, "nodes") or []):
        _check_started(state, node, tried, env)
        if time.monotonic() > deadline:
            raise LocalClusterError(f"{node.name} ({node.ip}) did not rejoin within {timeout_s:.0f}s")
        time.sleep(0.5)
    _wait_alive(state, sorted(n.ip for n in state.nodes), deadline, timeout_s, env)


def _node(state: State, name: str) -> Node:
    for node in state.nodes:
        if node.name == name:
            return node
    raise LocalClusterError(f"no node {name!r} in this cluster: {[n.name for n in state.nodes]}")


# ------------------------------------------------------------------------------------ down


def down(state_dir: str | os.PathLike[str], *, quiet: bool = False, keep_logs: bool = False) -> list[str]:
    """Remove what ``up`` recorded in ``state_dir``: nothing else. Returns what was left alone (why)."""
    say = (lambda *_: None) if quiet else (lambda msg: print(msg, flush=True))
    state = State.load(state_dir)
    if state is None:
        say(f"no cluster recorded in {state_dir}: nothing to do")
        return []
    left = []
    if state.s3_pgid:
        stop_groups([state.s3_pgid])
    stop_groups([n.pgid for n in state.nodes if n.pgid is not None] + ([state.redis_pgid] if state.redis_pgid else []))
    for node in state.nodes:
        mine = node.netns_inode is not None and _netns_inode(node.netns) == node.netns_inode
        if mine:
            _kill_netns_leftovers(node.netns)
            _ip("netns", "del", node.netns, check=False)
        elif _netns_inode(node.netns) is not None:
            left.append(f"network namespace {node.netns} (not the one this cluster created)")
        if node.veth_ifindex is not None and _ifindex(node.host_veth) == node.veth_ifindex:
            _ip("link", "del", node.host_veth, check=False)  # normally gone with its namespace
        elif _ifindex(node.host_veth) is not None:
            left.append(f"link {node.host_veth} (not the one this cluster created)")
        if node.temp_dir and not keep_logs:
            shutil.rmtree(node.temp_dir, ignore_errors=True)
    if state.bridge_ifindex is not None and _ifindex(state.bridge) == state.bridge_ifindex:
        _ip("link", "del", state.bridge, check=False)
    elif _ifindex(state.bridge) is not None:
        left.append(f"link {state.bridge} (not the one this cluster created)")
    if state.token_path:
        Path(state.token_path).unlink(missing_ok=True)
    (Path(state_dir) / S3_ENV_FILE).unlink(missing_ok=True)
    (Path(state_dir) / STATE_FILE).unlink()
    for item in left:
        say(f"left alone: {item}")
    say(f"removed the cluster on 10.231.{state.net}.0/24")
    return left


# ------------------------------------------------------------------------------------ status


def status(state_dir: str | os.PathLike[str]) -> int:
    state = State.load(state_dir)
    if state is None:
        print(f"no cluster recorded in {state_dir}")
        return 1
    alive = alive_nodes(state) or []
    ok = True
    for node in state.nodes:
        running = node.pgid is not None and bool(_group_members(node.pgid))
        in_ray = node.ip in alive
        ok &= running and in_ray
        print(f"{node.name:<5} {node.ip:<13} netns {node.netns:<16} ray start pgid {node.pgid}: "
              f"{'running' if running else 'NOT running'}, {'alive' if in_ray else 'NOT alive'} in the state API")
    print("\nTo use it from this machine (the token itself stays in its file):")
    for key, value in state.client_env().items():
        print(f"  export {key}={value}")
    if state.s3_port:
        up_s3 = state.s3_pgid is not None and bool(_group_members(state.s3_pgid))
        ok &= up_s3
        print(f"  set -a; . {Path(state.state_dir) / S3_ENV_FILE}; set +a   # S3 at {state.bridge_ip}:{state.s3_port} "
              f"({'running' if up_s3 else 'NOT running'}), bucket {S3_BUCKET}; the keys stay in the file")
    print(f"  samtone submit train --address {state.address} ...")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="local_cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("up", "down", "status"))
    p.add_argument("--state-dir", default=".samtone/local-cluster", help="where the cluster is recorded")
    p.add_argument("--net", type=int, default=0, help="third octet of the subnet 10.231.<net>.0/24 (up)")
    p.add_argument("--workers", type=int, default=2, help="worker nodes (up)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="logical CPUs of each worker node (up)")
    p.add_argument("--object-store-mb", type=int, default=256, help="each node's object store (up)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for every node (up)")
    p.add_argument("--redis", action="store_true", help="GCS fault tolerance: the head's state in a redis-server "
                   "started on the bridge (up; needs redis-server)")
    p.add_argument("--s3", action="store_true", help="an S3 server (moto) on the bridge, its AWS_* on every node (up)")
    p.add_argument("--keep-logs", action="store_true", help="keep the nodes' Ray temp dirs (down)")
    args = p.parse_args(argv)
    try:
        if args.command == "up":
            extra = dict(item.split("=", 1) for item in args.env)
            state = up(args.state_dir, net=args.net, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                       object_store_mb=args.object_store_mb, env=extra, redis=args.redis, s3=args.s3)
            print(f"cluster up: head {state.head.ip}, workers {', '.join(n.ip for n in state.nodes[1:])}")
            return status(args.state_dir)
        if args.command == "down":
            return 1 if down(args.state_dir, keep_logs=args.keep_logs) else 0
        return status(args.state_dir)
    except LocalClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
