"""Where and how the work runs: precision, device names, CPU threads and the Ray connection.

Shared by training, evaluation, serving and re-encoding so each picks bf16 and joins Ray the same way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where bf16 matrix multiplies are native, else fp32."""
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
    """bf16 autocast for the encoders (the loss upcasts to float32 itself); fp32 = no-op."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


@contextlib.contextmanager
def cpu_threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def connect_ray(num_cpus: int | None = None) -> None:
    """Join ``$RAY_ADDRESS`` when set, else start a local cluster bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep every listener on loopback
    # One logical CPU more than the cores: Tune trial drivers hold a sliver of a CPU while their
    # workers train, and without the spare a 2-worker trial could never start on a 2-core box.
    ray.init(
        address="local",  # a fresh cluster even if another one runs on this machine
        num_cpus=num_cpus or max(2, os.cpu_count() or 2) + 1,
        # The dashboard serves the state API that Ray Train's PlacementGroupCleaner polls: without
        # it, the workers of a trial stopped early by ASHA are never released.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
    )
