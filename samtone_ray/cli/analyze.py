"""``samtone analyze``: embedding-space analyses of one or more models on a BEIR split (JSON + PNG)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from samtone_ray.cli.args import non_negative, positive_int, tracking_uri_arg


def add_parser(sub) -> None:
    from samtone_ray.analysis.report import AnalysisSettings

    d = AnalysisSettings()
    p = sub.add_parser("analyze", help="embedding-space analyses of one or more models on a BEIR split (JSON + PNG)")
    p.add_argument("--model", action="append", required=True, metavar="URI",
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, a model dir or all-MiniLM-L6-v2 (repeatable)")
    p.add_argument("--label", action="append", default=[], help="legend label per --model, in order (default: from the URI)")
    p.add_argument("--data", required=True, help="a BEIR folder (or bundled:debian)")
    p.add_argument("--split", default="dev")
    p.add_argument("--out", type=Path, help="output folder (default: .samtone/analysis/<timestamp>)")
    p.add_argument("--max-queries", type=non_negative, default=d.max_queries, help=f"queries analysed, 0 = all (default {d.max_queries})")
    p.add_argument("--max-docs", type=non_negative, default=d.max_docs,
                   help=f"documents searched: all relevant ones plus a fixed sample, 0 = all (default {d.max_docs})")
    p.add_argument("--pair-sample", type=positive_int, default=d.pair_sample, help=f"queries/documents for pair statistics (default {d.pair_sample})")
    p.add_argument("--tsne-per-tower", type=positive_int, default=d.tsne_per_tower, help=f"t-SNE points per tower (default {d.tsne_per_tower})")
    p.add_argument("--seed", type=non_negative, default=d.seed)
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=d.precision)
    tracking_uri_arg(p)
    p.add_argument("--experiment", default="samtone")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from samtone_ray.analysis.report import (
        ANALYSIS_JSON,
        AnalysisSettings,
        analyze_models,
        default_label,
    )
    from samtone_ray.data.sources import load_beir, resolve_data_path
    from samtone_ray.tracking import runs as tracking
    from samtone_ray.tracking.model_uri import ModelURIError, resolve_model

    if args.label and len(args.label) != len(args.model):
        print(f"error: {len(args.label)} --label for {len(args.model)} --model: give one per model or none", file=sys.stderr)
        return 2
    try:
        settings = AnalysisSettings(
            max_queries=args.max_queries, max_docs=args.max_docs, pair_sample=args.pair_sample,
            tsne_per_tower=args.tsne_per_tower, seed=args.seed, batch_size=args.batch_size, precision=args.precision,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uri = None if args.no_tracking else tracking.tracking_uri(args.tracking_uri)
    split = load_beir(resolve_data_path(args.data), args.split)
    models = []
    for i, model_uri in enumerate(args.model):
        try:
            resolved = resolve_model(model_uri, uri)
        except ModelURIError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        label = args.label[i] if args.label else default_label(resolved)
        if label in [m[0] for m in models]:
            label = f"{label} ({i + 1})"
        models.append((label, resolved.path, resolved.as_dict()))
    out = args.out or Path(".samtone/analysis") / time.strftime("%Y%m%d-%H%M%S")
    payload = analyze_models(models, split, out, settings, data_label=f"{args.data}:{args.split}", tracking_uri=uri,
                             experiment=args.experiment)
    print(f"analysis: {Path(out) / ANALYSIS_JSON}")
    if payload.get("mlflow_run_id"):
        print(f"mlflow run: {payload['mlflow_run_id']}")
    return 0
