"""Ray Train's torch set-up, with gloo and NCCL bound to the interface that carries each node's Ray IP.

Ray Train creates the process group in its torch backend's ``on_start``, on every worker, before
the training function runs: a prelude in the training function is too late. So the backend here
first runs ``bind_to_node_interface`` on each worker (setting ``GLOO_SOCKET_IFNAME`` /
``NCCL_SOCKET_IFNAME`` unless the user did), then Ray's own set-up. On one machine that names
``lo`` (the local cluster's IP is 127.0.0.1); across nodes the interface peers can reach, which
gloo does not find by itself when the hostname resolves to loopback. Ray's own ``TorchftConfig``
extends the torch backend the same way (Ray is pinned).
"""

from __future__ import annotations

import logging

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

log = logging.getLogger(__name__)


def bind_to_node_interface() -> dict[str, str]:
    """Runs in a training worker: binds the collectives to this node's Ray IP's interface."""
    import ray

    from samtone_ray.core.runtime import bind_collectives

    ip = ray.util.get_node_ip_address()
    chosen = bind_collectives(ip)
    if chosen:
        log.info("collectives bound to the interface of this node's Ray IP %s: %s", ip, chosen)
    return chosen


class _NodeInterfaceTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        worker_group.execute(bind_to_node_interface)
        super().on_start(worker_group, backend_config)


class NodeInterfaceTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group uses the interface of each node's Ray IP."""

    @property
    def backend_cls(self):
        return _NodeInterfaceTorchBackend
