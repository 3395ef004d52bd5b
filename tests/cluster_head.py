"""A real Ray head for tests, on loopback, with ports of its own; stopped by its process group.

Started with ``ray start --head --block`` in a new session so that stopping it (SIGTERM to the
group, SIGKILL after a grace period) reaches only this head's processes: other local clusters
on the machine are never touched (no ``ray stop``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from samtone_ray.core.runtime import free_loopback_port as free_port  # test_cluster imports it from here


@dataclass
class Head:
    address: str  # the job server, http://127.0.0.1:PORT
    gcs_address: str
    temp_dir: Path
    metrics_port: int
    proc: subprocess.Popen

    @property
    def service_discovery_file(self) -> Path:
        return self.temp_dir / "session_latest" / "prom_metrics_service_discovery.json"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                # The group's Ray processes exit on the SIGTERM; the `ray start --block` loop itself
                # often does not, and waiting out a longer grace cost every module 30 s.
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # any worker the block process left behind
        except ProcessLookupError:
            pass


def start_head(*, num_cpus: int, num_gpus: int, timeout_s: float = 120) -> Head:
    from ray.job_submission import JobSubmissionClient

    # Short: Ray's unix socket paths under the temp dir must stay below ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="samtone-head-", dir="/tmp"))
    ports = {name: free_port() for name in (
        "port", "dashboard-port", "metrics-export-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "ray-client-server-port", "runtime-env-agent-port",
    )}
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ)
    env.update({
        "PATH": f"{bindir}:{env.get('PATH', '')}",  # the job's `python` is this environment's
        "RAY_AUTH_MODE": "disabled",  # a loopback-only test cluster; real clusters keep token auth
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_metrics_report_interval_ms": "1000",  # metrics reach Prometheus within a second or two
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    })
    env.pop("RAY_ADDRESS", None)
    cmd = [
        os.path.join(bindir, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
        f"--temp-dir={temp_dir}", "--include-dashboard=true", "--disable-usage-stats",
        "--object-store-memory=268435456",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]
    log = open(temp_dir / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(
        address=f"http://127.0.0.1:{ports['dashboard-port']}",
        gcs_address=f"127.0.0.1:{ports['port']}",
        temp_dir=temp_dir,
        metrics_port=ports["metrics-export-port"],
        proc=proc,
    )
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}: {(temp_dir / 'ray-start.log').read_text()[-3000:]}")
        try:
            JobSubmissionClient(head.address).list_jobs()
            return head
        except Exception:
            if time.monotonic() > deadline:
                head.stop()
                raise RuntimeError(f"the head's job server did not answer within {timeout_s}s")
            time.sleep(1)
