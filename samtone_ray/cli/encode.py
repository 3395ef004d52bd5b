"""``samtone encode``: re-encode a corpus with a model on Ray Data, resumable and exactly once."""

from __future__ import annotations

import argparse
import sys

from samtone_ray.cli.args import config_args, count_range, load, positive_float, positive_int


def add_parser(sub) -> None:
    from samtone_ray.core.choices import PRECISIONS

    p = sub.add_parser("encode", help="re-encode a corpus with a model on Ray Data (resumable, exactly once)")
    config_args(p)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a local dir")
    p.add_argument("--input", required=True, help="BEIR corpus.jsonl, JSON Lines or Parquet: a file or a folder (local, s3://, ...)")
    # Not a Path: Path("s3://bucket/x") is "s3:/bucket/x", a relative local folder.
    p.add_argument("--output", required=True, help="output folder (Parquet parts + manifest.json): local, or s3://... "
                   "with the AWS_* environment")
    p.add_argument("--tower", choices=["document", "query"], default="document")
    p.add_argument("--batch-size", type=positive_int, default=64, help="texts per forward pass")
    p.add_argument("--actors", default=(1, 1), type=count_range("--actors", single=True), help="embedding actors: N or MIN:MAX (autoscaling)")
    p.add_argument("--cpus-per-actor", type=positive_float, default=1.0, help="CPUs (and torch threads) per actor")
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (bf16 where native), fp32, bf16, or int8 (dynamic int8 linear layers, CPU only)")
    p.add_argument("--id-field", default="_id")
    p.add_argument("--text-fields", default="title,text", help="comma-separated fields joined into the text")
    p.add_argument("--on-bad-record", choices=["error", "skip"], default="error",
                   help="skip: write bad records to rejects.jsonl and go on")
    p.add_argument("--rows-per-file", type=positive_int, help="rows per output file (= per input shard; default 10000)")
    p.add_argument("--file-mb", type=positive_float, help="size output files by MiB instead of rows")
    p.add_argument("--overwrite", action="store_true", help="replace an output written by another model or settings")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from samtone_ray.encode.job import EncodeOptions, log_to_mlflow, run_encode

    cfg = load(args)
    try:
        opts = EncodeOptions(
            model=args.model,
            input=args.input,
            output=args.output,
            tower=args.tower,
            batch_size=args.batch_size,
            actors=args.actors,
            cpus_per_actor=args.cpus_per_actor,
            gpu=args.gpu,
            precision=args.precision,
            id_field=args.id_field,
            text_fields=tuple(f for f in args.text_fields.split(",") if f),
            on_bad_record=args.on_bad_record,
            overwrite=args.overwrite,
            rows_per_file=args.rows_per_file,
            file_mb=args.file_mb,
            tracking_uri=cfg.tracking.uri or None,
        )
        result = run_encode(opts)
    except ValueError as exc:  # EncodeOptions' own checks (EncodeError is one)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"encoded {result.rows_encoded} rows in {result.wall_s:.1f} s ({result.rows_per_s:.1f} rows/s); "
        f"output {result.output}: {result.rows} rows, {result.rejected} rejected"
    )
    if result.rows_encoded:
        print("seconds: setup (model, input plan) and pipeline are wall time; read, tokenize, embed and write "
              "are summed over workers: " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
    if cfg.tracking.enabled and result.rows_encoded:
        print(f"mlflow run: {log_to_mlflow(cfg, result)}")
    return 0
