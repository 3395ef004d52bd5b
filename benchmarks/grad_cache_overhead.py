"""Gradient-cache overhead in CPU time: ``grad_cache_step`` vs ``train_step`` + backward.

Process CPU time (``time.process_time``, one torch thread) rather than wall time, so that other
jobs on a shared machine do not enter the ratio. Alternating order per repetition, same batches
for both, dropout on, no optimizer step (it is the same for both). Prints the medians and the
ratio cache / plain. The cache cannot cost less than one extra forward without a graph, so the
run also times that forward alone and prints the floor (plain + no-graph forward) / plain: the
part of the ratio the method itself costs, and the excess above it that an implementation could
still win back. Results go to ``benchmarks/results/grad_cache_overhead.json``.

Usage::

    python benchmarks/grad_cache_overhead.py --model all-MiniLM-L6-v2 --batch-size 256 --reps 4
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from samtone_ray.data.batching import make_shard  # noqa: E402
from samtone_ray.core.config import from_dict  # noqa: E402
from samtone_ray.data.sources import bundled_sample_path, load_training_pairs  # noqa: E402
from samtone_ray.core.files import atomic_write_json  # noqa: E402
from samtone_ray.train.gradcache import grad_cache_step  # noqa: E402
from samtone_ray.model.tokenization import as_token_chunks  # noqa: E402
from samtone_ray.train.trainer import shard_loss, train_step  # noqa: E402
from samtone_ray.model.losses import SamToNeLoss  # noqa: E402
from samtone_ray.model.towers import DualEncoder  # noqa: E402

DEFAULT_DATA = Path("/work/shared/data/debian")
RESULTS = Path(__file__).resolve().parent / "results" / "grad_cache_overhead.json"


def forward_without_graph(model, shard) -> None:
    """The cache's first pass: every chunk through its tower under no_grad (dropout on)."""
    with torch.no_grad():
        for chunks, embed in ((shard.queries, model.embed_queries), (shard.documents, model.embed_documents)):
            for chunk in chunks.chunks:
                embed(as_token_chunks(chunk))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=4)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = from_dict({"model": {"name_or_path": args.model}, "scaling": {"num_workers": 1}})
    pairs = load_training_pairs(DEFAULT_DATA if DEFAULT_DATA.is_dir() else bundled_sample_path(), "train")
    model = DualEncoder.from_config(cfg.model).train()
    loss_fn = functools.partial(shard_loss, loss_fn=SamToNeLoss(cfg.loss), keys=None, rank=0)
    seconds: dict[str, list[float]] = {"plain": [], "cache": [], "forward_no_graph": []}
    for rep in range(args.reps):
        indices = np.arange(rep * args.batch_size, (rep + 1) * args.batch_size) % len(pairs)
        shard = make_shard(pairs, indices, model.tokenizer, query_max_length=cfg.model.query_max_length,
                           doc_max_length=cfg.model.doc_max_length, num_negatives=0, chunk_size=args.chunk_size)
        order = ("plain", "cache", "forward_no_graph") if rep % 2 else ("forward_no_graph", "cache", "plain")
        for name in order:
            model.zero_grad(set_to_none=True)
            t0 = time.process_time()
            if name == "plain":
                train_step(model, shard, SamToNeLoss(cfg.loss), keys=None, rank=0).backward()
            elif name == "cache":
                grad_cache_step(model, shard, loss_fn, micro_batch_size=args.micro_batch_size)
            else:
                forward_without_graph(model, shard)
            seconds[name].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    ratio = med["cache"] / med["plain"]
    floor = (med["plain"] + med["forward_no_graph"]) / med["plain"]
    print(f"CPU seconds per step, batch {args.batch_size}, {args.model}: " + str({k: [round(x, 2) for x in v] for k, v in seconds.items()}))
    print(f"median plain {med['plain']:.2f} s, forward without graph {med['forward_no_graph']:.2f} s, cache {med['cache']:.2f} s")
    print(f"floor (plain + no-graph forward) / plain: {floor:.2f}x; excess above the floor: {ratio - floor:+.2f}")
    print(f"ratio cache / plain: {ratio:.2f}x")
    atomic_write_json(RESULTS, {
        "what": "gradient cache vs plain step, process CPU seconds, one torch thread (benchmarks/grad_cache_overhead.py)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "settings": vars(args) | {"query_max_length": cfg.model.query_max_length, "doc_max_length": cfg.model.doc_max_length},
        "seconds": seconds, "median_s": med, "ratio": ratio, "floor": floor,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
