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


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# File systems that every node of a cluster can see the same way (network, parallel or FUSE-backed
# object stores). Anything else is taken to be local to one node.
SHARED_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "cephfs", "glusterfs",
     "fuse.glusterfs", "fuse.gcsfuse", "fuse.s3fs", "fuse.mountpoint-s3", "fuse.juicefs", "fuse.sshfs",
     "fuse.blobfuse2", "fuse.cephfs", "fuse.lustre", "9p", "virtiofs", "wekafs", "panfs", "orangefs"}
)


class ClusterConfigError(ValueError):
    """A setting that cannot work on this cluster; the message names it and what to use instead."""


def check_cluster(num_nodes: int, tracking_uri: str | None, output_dir: str, output_fs: str) -> None:
    """Refuse, before any work starts, settings that only work on one node.

    On a cluster of ``num_nodes`` > 1 nodes rank 0 may run on any node: a SQLite tracking URI
    names a file on one node only, and ``output_dir`` (models, checkpoints, leaderboards) must be
    on a file system that every node shares (``output_fs``: its type, e.g. from ``filesystem_type``).
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
    if output_fs not in SHARED_FILESYSTEMS:
        raise ClusterConfigError(
            f"output_dir {output_dir!r} is on a {output_fs or 'unknown'} file system, local to one node, but "
            f"Ray has {num_nodes} nodes and rank 0 writes models and checkpoints from whichever node it "
            "runs on: set output_dir to a folder on a shared file system mounted on every node (NFS, "
            "Lustre, a FUSE-mounted bucket, ...)"
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

    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    check_cluster(nodes, tracking_uri, output_dir, filesystem_type(output_dir))
