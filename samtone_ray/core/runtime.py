"""Where and how the work runs: precision, device names, CPU threads and the Ray connection.

Shared by training, evaluation, serving and re-encoding so each picks bf16 and joins Ray the same way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from samtone_ray.core.storage import is_uri

log = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where bf16 matrix multiplies are native, else fp32 (never int8: it costs
    quality, so it is only ever asked for). int8 on a GPU is refused."""
    from samtone_ray.core.choices import check_precision

    check_precision(precision, gpu=device.type != "cpu")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        # Pre-Ampere GPUs emulate bf16 (slower than fp32): only native support counts.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if _cpu_has_amx() else "fp32"


@functools.lru_cache(maxsize=1)
def _cpu_has_amx() -> bool:
    # Without AMX, CPU bf16 is emulated and slower than fp32; with it, ~2.4x faster (measured).
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the encoders (the loss upcasts to float32 itself); fp32 = no-op; int8 =
    no-op too: the quantised layers (``prepare_inference``) take fp32 activations themselves."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_inference(model: torch.nn.Module, precision: str) -> str:
    """Make ``model`` (loaded for inference only) run at ``precision``; returns the resolved precision.

    ``int8``: every ``nn.Linear`` (attention, feed-forward, projection: nearly all of an encoder's
    multiply-adds) is replaced, in place and once per model, by torch's dynamic int8 version
    (weights int8 per channel, activations quantised per batch on the fly, int32 accumulation, fp32
    out); embeddings, LayerNorm and pooling stay fp32. A model quantised once refuses to be asked
    for another precision rather than silently running int8. Other precisions leave it untouched.
    """
    device = next(model.parameters()).device
    resolved = resolve_precision(precision, device)
    quantised = getattr(model, "_samtone_int8", False)
    if resolved == "int8" and not quantised:
        model.eval()
        # Per-channel weight scales: per-tensor ones cost visibly more quality on MiniLM (cosine to
        # fp32 on 64 Debian documents: mean 0.94, min 0.90, against 0.98 and 0.97 per channel).
        torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, inplace=True
        )
        model._samtone_int8 = True
    elif resolved != "int8" and quantised:
        raise ValueError(f"this model was quantised to int8 for inference; load it again to run it at {resolved}")
    return resolved


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


@contextlib.contextmanager
def cpu_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block, restored after it."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


TRAIN_POLL_INTERVAL_S = 0.5


def starts_local_cluster() -> bool:
    """Whether ``connect_ray`` will start a local cluster (so the cluster inherits this process's
    environment) rather than join ``$RAY_ADDRESS`` or keep the connection this process has."""
    import ray

    return not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")


def connect_ray(num_cpus: int | None = None) -> None:
    """Join ``$RAY_ADDRESS`` when set, else start a local cluster bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    if not starts_local_cluster():
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep every listener on loopback
    # Ray Train's controller notices started and finished workers (and passes reports to Tune) once
    # per poll, every 2 s by default: each trial waited several polls. Inherited by the cluster.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(TRAIN_POLL_INTERVAL_S))
    # One logical CPU more than the cores: Tune trial drivers hold a sliver of a CPU while their
    # workers train, and without the spare a 2-worker trial could never start on a 2-core box.
    start_local_ray(num_cpus=num_cpus or max(2, os.cpu_count() or 2) + 1, logging_level=logging.WARNING)


def start_local_ray(*, num_cpus: int, **init_kwargs) -> None:
    """A fresh local cluster on 127.0.0.1 whose own processes find its state API, whatever else runs.

    Ray Train's PlacementGroupCleaner frees the workers of a trial that ASHA stops by asking the
    state API (served by the dashboard) whether the trial's controller is alive. Without an address
    that API picks "the latest cluster" on the machine, so a second local cluster (another
    ``samtone`` command, a test head) made it ask the wrong one and the stopped trial's workers
    stayed reserved. The dashboard therefore gets a known port, and the raylet (hence every worker)
    inherits ``RAY_API_SERVER_ADDRESS`` pointing at it. The driver's own environment is restored:
    there the variable would override every explicit address, e.g. ``samtone submit --address``.
    """
    import ray

    port = free_loopback_port()
    key = "RAY_API_SERVER_ADDRESS"
    before = os.environ.get(key)
    os.environ[key] = f"http://127.0.0.1:{port}"
    try:
        context = ray.init(
            address="local",  # a fresh cluster even if another one runs on this machine
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            _node_ip_address="127.0.0.1",
            **init_kwargs,
        )
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
    if not str(context.dashboard_url).endswith(f":{port}"):
        log.warning("Ray's dashboard took %s instead of port %d: early-stopped trials may keep their "
                    "workers while another Ray cluster runs on this machine", context.dashboard_url, port)


# Ports Ray's components take by default whatever else they are given: a "free" port handed to
# Ray as the dashboard's was once 52365, and the node refused to start (port used twice).
RAY_DEFAULT_PORTS = frozenset({6379, 8076, 8265, 10001, 52365, 52366})


def free_loopback_port() -> int:
    """A port free on 127.0.0.1 now, and none of Ray's default ports."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS:
            return port


# File systems that every node of a cluster can see the same way (network, parallel or FUSE-backed
# object stores). Anything else is taken to be local to one node.
SHARED_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "cephfs", "glusterfs",
     "fuse.glusterfs", "fuse.gcsfuse", "fuse.s3fs", "fuse.mountpoint-s3", "fuse.juicefs", "fuse.sshfs",
     "fuse.blobfuse2", "fuse.cephfs", "fuse.lustre", "9p", "virtiofs", "wekafs", "panfs", "orangefs"}
)


class ClusterConfigError(ValueError):
    """A setting that cannot work on this cluster; the message names it and what to use instead."""


def check_cluster(
    num_nodes: int, tracking_uri: str | None, output_dir: str, output_fs: str, *, output_seen_by_all: bool = False
) -> None:
    """Refuse, before any work starts, settings that only work on one node.

    On a cluster of ``num_nodes`` > 1 nodes rank 0 may run on any node: a SQLite tracking URI
    names a file on one node only, and ``output_dir`` (models, checkpoints, leaderboards) must be
    object storage (a URI such as ``s3://bucket/run``: every node reaches it), on a file system that
    every node shares (``output_fs``: its type, e.g. from ``filesystem_type``), or one that every node
    was seen to share (``output_seen_by_all``: ``seen_by_every_node``).
    """
    if num_nodes <= 1:
        return
    scheme = urlparse(tracking_uri or "").scheme
    if tracking_uri and (scheme in ("sqlite", "file") or (not scheme and "/" in tracking_uri)):
        raise ClusterConfigError(
            f"tracking.uri (or $MLFLOW_TRACKING_URI) is {tracking_uri!r}, a store on one node, but Ray has "
            f"{num_nodes} nodes and rank 0 may log from any of them: use an MLflow server every node "
            "can reach (tracking.uri=http://HOST:5000) or set tracking.enabled=false"
        )
    if output_fs not in SHARED_FILESYSTEMS and not output_seen_by_all and not is_uri(output_dir):
        raise ClusterConfigError(
            f"output_dir {output_dir!r} is on a {output_fs or 'unknown'} file system, local to one node, but "
            f"Ray has {num_nodes} nodes and rank 0 writes models and checkpoints from whichever node it "
            "runs on: set output_dir to object storage every node reaches (s3://bucket/run, with "
            "AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / ... set on the nodes) or a folder on a shared file "
            "system mounted on every node (NFS, Lustre, a FUSE-mounted bucket, ...)"
        )


def filesystem_type(path: str | os.PathLike[str]) -> str:
    """The type (``/proc/mounts``) of the file system holding ``path`` or its nearest existing parent."""
    target = Path(path).absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    target = target.resolve()
    best, kind = "", ""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        if (target == Path(mount) or Path(mount) in target.parents) and len(mount) > len(best):
            best, kind = mount, fields[2]
    return kind


def check_ray_cluster(tracking_uri: str | None, output_dir: str) -> None:
    """``check_cluster`` on the connected Ray cluster's alive nodes."""
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if is_uri(output_dir):  # object storage: every node reaches the same objects
        check_cluster(len(nodes), tracking_uri, output_dir, "", output_seen_by_all=True)
        return
    fs = filesystem_type(output_dir)
    # A file system of a local type may still be every node's (nodes sharing one machine, a
    # host path mounted into every container): then every node reads what rank 0 writes there.
    seen = len(nodes) > 1 and fs not in SHARED_FILESYSTEMS and seen_by_every_node(output_dir, nodes)
    check_cluster(len(nodes), tracking_uri, output_dir, fs, output_seen_by_all=seen)


def seen_by_every_node(directory: str, nodes: list[dict], timeout_s: float = 120) -> bool:
    """Whether a file written in ``directory`` here is read back, same content, by a task on each
    of ``nodes`` (``ray.nodes()`` entries). Says nothing about nodes that join later."""
    import secrets

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(16)
    marker = Path(directory) / f".samtone-shared-{token}"
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    except OSError:
        return False

    @ray.remote(num_cpus=0, max_retries=0)
    def read(path: str) -> str | None:
        try:
            return Path(path).read_text()
        except OSError:
            return None

    try:
        refs = [
            read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(str(marker))
            for node in nodes
        ]
        return all(found == token for found in ray.get(refs, timeout=timeout_s))
    except Exception as exc:  # a node that cannot answer cannot be shown to share it
        log.warning("could not check whether every node sees %s: %s", directory, exc)
        return False
    finally:
        marker.unlink(missing_ok=True)


# Collective libraries pick their network interface from the hostname unless told: on a node
# whose hostname resolves to 127.0.0.1 (or to another node's address) gloo listens on loopback and
# a peer on another node gets "connection refused". These name the interface instead.
COLLECTIVE_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def interface_addresses() -> dict[str, list[str]]:
    """``{interface: [addresses]}`` in this process's network namespace: IPv4 from the kernel's
    interface list (``SIOCGIFCONF``: every address, aliases included), IPv6 from /proc/net/if_inet6."""
    import array
    import fcntl
    import struct

    found: dict[str, list[str]] = {}
    ifreq = 16 + (24 if struct.calcsize("P") == 8 else 16)  # name + the ifr_ifru union
    buf = array.array("B", bytes(ifreq * 1024))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            out = fcntl.ioctl(s.fileno(), 0x8912, struct.pack("iL", len(buf), buf.buffer_info()[0]))  # SIOCGIFCONF
        length = struct.unpack("iL", out)[0]
        data = buf.tobytes()[:length]
        for i in range(0, length, ifreq):
            name = data[i:i + 16].split(b"\0", 1)[0].decode()
            # sockaddr_in after the name: family (2 bytes), port (2), address (4). "eth0:1" is an
            # alias label on eth0; collectives want the device.
            found.setdefault(name.split(":", 1)[0], []).append(socket.inet_ntoa(data[i + 20:i + 24]))
    except OSError as exc:
        log.debug("could not list IPv4 interfaces: %s", exc)
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 6:
                packed = bytes.fromhex(fields[0])
                found.setdefault(fields[5], []).append(socket.inet_ntop(socket.AF_INET6, packed))
    except (OSError, ValueError):
        pass
    return found


def interface_for_address(ip: str, addresses: dict[str, list[str]] | None = None) -> str | None:
    """The interface that carries ``ip`` (from ``addresses``, default: this machine's), or None."""
    import ipaddress

    try:
        wanted = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    for name, addrs in sorted((addresses if addresses is not None else interface_addresses()).items()):
        for addr in addrs:
            try:
                if ipaddress.ip_address(addr.split("%", 1)[0]) == wanted:
                    return name
            except ValueError:
                continue
    return None


def bind_collectives(node_ip: str, environ: dict[str, str] | os._Environ | None = None,
                     addresses: dict[str, list[str]] | None = None) -> dict[str, str]:
    """Point gloo and NCCL at the interface carrying ``node_ip`` (the node's Ray IP) unless the user
    named one (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``); returns what was set. Must run in
    the worker process before its process group is created."""
    environ = os.environ if environ is None else environ
    missing = [var for var in COLLECTIVE_IFNAME_VARS if not environ.get(var)]
    if not missing:
        return {}
    interface = interface_for_address(node_ip, addresses)
    if interface is None:
        log.warning("no network interface carries this node's Ray IP %s: gloo/NCCL choose their own (set "
                    "GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME if workers on other nodes cannot connect)", node_ip)
        return {}
    chosen = {var: interface for var in missing}
    environ.update(chosen)
    return chosen
