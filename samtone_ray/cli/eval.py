"""``samtone eval``: exact-search retrieval metrics of a model on a BEIR split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from samtone_ray.cli.args import non_negative, positive_int


def add_parser(sub) -> None:
    from samtone_ray.core.choices import PRECISIONS

    p = sub.add_parser("eval", help="exact-search retrieval metrics of a model on a BEIR split")
    p.add_argument("--model", required=True, help="a samtone model dir, or a plain HF / sentence-transformers dir")
    p.add_argument("--data", required=True, help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    p.add_argument("--split", default="dev")
    p.add_argument("--baseline", choices=["bm25"], help="add a baseline row")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--max-docs", type=non_negative, default=0,
                   help="search the judged documents plus a fixed sample of the rest, this many in all "
                        "(as train.eval_max_docs; default 0 = the whole corpus)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="auto/fp32/bf16 (autocast), or int8 (dynamic int8 linear layers, CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object (last line of stdout)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from samtone_ray.data.sources import bound_eval_corpus, load_beir, resolve_data_path
    from samtone_ray.evaluation.retrieval import (
        bm25_run,
        evaluate_model,
        format_metrics_table,
        retrieval_metrics,
    )
    from samtone_ray.model.towers import DualEncoder

    split = bound_eval_corpus(load_beir(resolve_data_path(args.data), args.split), args.max_docs)
    rows = {}
    if args.baseline == "bm25":
        rows["bm25"] = retrieval_metrics(bm25_run(split.corpus, split.queries, k=100), split.qrels)
    model = DualEncoder.from_pretrained(args.model)
    rows[Path(args.model).name or args.model] = evaluate_model(model, split, args.batch_size, args.precision)
    if args.json:
        payload = {"data": args.data, "split": args.split, "queries": len(split.qrels), "documents": len(split.corpus),
                   "documents_total": split.corpus_params()["eval_docs_total"]}
        print(json.dumps(payload | {"results": rows} | rows[next(reversed(rows))]))
    else:
        print(f"{args.data} [{args.split}]: {len(split.qrels)} queries, {split.corpus_summary()}")
        print(format_metrics_table(rows))
    return 0
