"""``samtone index``: a search index (exact or faiss) built from ``samtone encode`` output."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from samtone_ray.cli.args import positive_int, tracking_uri_arg


def add_parser(sub) -> None:
    p = sub.add_parser("index", help="build a search index (exact or faiss) from `samtone encode` output")
    p.add_argument("--embeddings", required=True, type=Path, help="a `samtone encode` output folder")
    p.add_argument("--output", required=True, type=Path, help="index folder (for `samtone serve --index`)")
    p.add_argument("--kind", choices=["exact", "faiss-ivf", "faiss-hnsw"], default="exact")
    p.add_argument("--queries", help="JSONL queries (`text`) for recall@10 vs exact; default: queries.jsonl beside the corpus")
    p.add_argument("--sample", type=positive_int, default=500, help="queries sampled for recall@10")
    p.add_argument("--nlist", type=positive_int, help="faiss-ivf: lists (default ~4 sqrt(N))")
    p.add_argument("--nprobe", type=positive_int, default=32, help="faiss-ivf: lists probed per query")
    p.add_argument("--hnsw-m", type=positive_int, default=32, help="faiss-hnsw: links per node")
    p.add_argument("--ef-search", type=positive_int, default=128, help="faiss-hnsw: search breadth")
    tracking_uri_arg(p, "for models:/ and runs:/ URIs in the manifest; ")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from samtone_ray.encode.index import build_from_encoded, recall_at_k, recall_queries
    from samtone_ray.encode.job import read_manifest

    params = {"nlist": args.nlist, "nprobe": args.nprobe} if args.kind == "faiss-ivf" else {}
    if args.kind == "faiss-hnsw":
        params = {"m": args.hnsw_m, "ef_search": args.ef_search}
    t0 = time.perf_counter()
    index = build_from_encoded(args.embeddings, args.kind, params)
    built = time.perf_counter() - t0
    index.save(args.output)
    model = index.model
    print(f"index {args.output}: {len(index)} documents, dim {index.dim}, kind {index.kind} "
          f"{index.params or ''} built in {built:.1f} s; model {model.get('uri')} "
          f"(version {model.get('version') or '-'}, fingerprint {model.get('fingerprint')})")
    if index.kind != "exact":
        queries, source = recall_queries(index, read_manifest(args.embeddings), args.queries, args.sample, args.tracking_uri or None)
        print(f"recall@10 vs exact search on {source}: {recall_at_k(index, queries, 10):.4f}")
    return 0
