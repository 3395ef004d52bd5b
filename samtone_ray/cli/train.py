"""``samtone train``: fine-tune a dual encoder on Ray Train."""

from __future__ import annotations

import argparse

from samtone_ray.cli.args import config_args, echo, load


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a dual encoder on Ray Train")
    config_args(p)
    p.add_argument("--no-baseline", action="store_true", help="skip the zero-shot evaluation before training")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from samtone_ray.data.sources import load_data
    from samtone_ray.evaluation.retrieval import evaluate_model, format_metrics_table
    from samtone_ray.mining.prepare import prepare_negatives
    from samtone_ray.model.towers import DualEncoder
    from samtone_ray.train.trainer import train

    cfg = load(args).with_output_dir()
    echo(cfg)
    cfg = prepare_negatives(cfg, show_progress=True)  # data.negatives: bm25|dense (a mined setting is reused)
    data = load_data(cfg)
    rows = {}
    if data[1] is not None and not args.no_baseline:
        print("evaluating the base model zero-shot ...", flush=True)
        rows["zero-shot"] = evaluate_model(DualEncoder.from_config(cfg.model), data[1], cfg.train.eval_batch_size, cfg.train.precision)
    outcome = train(cfg, data=data)
    if data[1] is not None:
        rows["fine-tuned"] = {k: v for k, v in outcome.metrics.items() if "@" in k}
        print(f"eval corpus: {data[1].corpus_summary()}")
        print(format_metrics_table(rows))
    print(f"model: {outcome.model_dir}")
    if outcome.run_id:
        print(f"mlflow run: {outcome.run_id} ({outcome.model_uri})")
    return 0
