"""``samtone mine``: training pairs of a BEIR split with mined hard negatives (BM25 or dense)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from samtone_ray.cli.args import config_args, load, non_negative, positive_int

# Flag -> MiningConfig field; a flag left out keeps the field's default (defined once, there).
_MINING_FLAGS = ("num_negatives", "range_min", "range_max", "max_score", "min_score", "absolute_margin",
                 "relative_margin", "sampling", "seed")


def add_parser(sub) -> None:
    from samtone_ray.core.choices import NEGATIVE_SAMPLINGS
    from samtone_ray.core.config import MiningConfig
    from samtone_ray.mining.embeddings import DEFAULT_CACHE_DIR
    from samtone_ray.mining.job import RETRIEVERS
    from samtone_ray.mining.retrievers import DENSE_SEARCHES

    p = sub.add_parser("mine", help="mine hard negatives for a BEIR split: training pairs with a negatives column")
    config_args(p)
    p.add_argument("--data", required=True, help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/), or bundled:debian")
    p.add_argument("--split", default="train")
    p.add_argument("--retriever", choices=RETRIEVERS, default="bm25")
    p.add_argument("--model", help="dense retriever's model: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a dir")
    p.add_argument("--out", required=True, type=Path,
                   help="X.parquet (summary in X.summary.json beside it) or a folder (pairs.parquet + summary.json)")
    p.add_argument("--search", choices=DENSE_SEARCHES, default="exact",
                   help="dense top-k: exact (chunked), faiss (flat, exact), faiss-hnsw / faiss-ivf (approximate)")
    default = MiningConfig()
    p.add_argument("--num-negatives", type=positive_int, help=f"negatives per query (default {default.num_negatives})")
    p.add_argument("--range-min", type=non_negative,
                   help=f"skip this many best candidates that pass the filters (default {default.range_min})")
    p.add_argument("--range-max", type=positive_int, help="pick among the first RANGE_MAX candidates that pass")
    p.add_argument("--max-score", type=float, help="drop candidates scoring above this")
    p.add_argument("--min-score", type=float, help="drop candidates scoring below this")
    p.add_argument("--absolute-margin", type=float, help="keep a candidate only if score <= lowest positive score - MARGIN")
    p.add_argument("--relative-margin", type=float,
                   help="keep a candidate only if score <= p - |p| * MARGIN, p the lowest positive score (0.05: TopK-PercPos 95%%)")
    p.add_argument("--sampling", choices=NEGATIVE_SAMPLINGS,
                   help=f"the best candidates, or random ones within the range (default {default.sampling})")
    p.add_argument("--seed", type=int, help=f"seed of --sampling random (default {default.seed})")
    p.add_argument("--drop-empty", action="store_true",
                   help="leave out the pairs of queries that got no negative (train with data.num_hard_negatives > 0 refuses them)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="texts per forward pass (dense)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="embedding cache (dense)")
    p.add_argument("--no-cache", action="store_true", help="encode without reading or writing the embedding cache")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from samtone_ray.core.config import MiningConfig
    from samtone_ray.mining.job import MineOptions, format_report, log_to_mlflow, run_mine

    cfg = load(args)
    mining = MiningConfig(**{name: getattr(args, name) for name in _MINING_FLAGS if getattr(args, name) is not None})
    try:
        opts = MineOptions(data=args.data, out=args.out, split=args.split, retriever=args.retriever, model=args.model,
                           mining=mining, search=args.search, batch_size=args.batch_size,
                           cache_dir=None if args.no_cache else args.cache_dir,
                           tracking_uri=cfg.tracking.uri or None, show_progress=True, drop_empty=args.drop_empty)
    except ValueError as exc:  # MineOptions' own checks
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_mine(opts)
    s = result.summary
    print(f"mined {s['retriever']} negatives for {s['pairs']} pairs of {s['data']} [{s['split']}] "
          f"({s['documents']} documents) in {s['timings']['total_s']:.1f} s -> {result.out}")
    print(format_report(result.report))
    if s["dropped_pairs"]:
        print(f"left out {s['dropped_pairs']} pairs whose query got no negative (--drop-empty)")
    print(f"summary: {result.summary_path}")
    if cfg.tracking.enabled:
        print(f"mlflow run: {log_to_mlflow(cfg.tracking.uri, cfg.tracking.experiment, result)}")
    return 0
