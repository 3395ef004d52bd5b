"""How ``train.eval_max_docs`` changes the dev metrics: the same models scored on the whole eval
corpus and on bounded ones (every judged document plus a fixed sample of the rest).

Fewer distractors can only move relevant documents up, so every metric rises; what matters for
a tuning run is whether the differences between models survive. For each model and cap this prints
and writes the metrics, and for the first two models their paired mrr@10 difference over the
same queries (95% bootstrap interval).

Usage (CPU-heavy: run it under the shared lock)::

    flock /tmp/samtone-ray.lock python benchmarks/eval_cap_metrics.py --precision bf16 \\
        --model all-MiniLM-L6-v2 --model RUN/trials/A/model --model RUN/trials/B/model \\
        --out benchmarks/results/eval_cap_metrics.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samtone_ray.core.env import apply_defaults  # noqa: E402

apply_defaults()

from samtone_ray.data.sources import bound_eval_corpus, load_beir, resolve_data_path  # noqa: E402
from samtone_ray.evaluation.retrieval import DEFAULT_TABLE_KEYS, evaluate_model  # noqa: E402
from samtone_ray.core.files import atomic_write_json  # noqa: E402
from samtone_ray.evaluation.statistics import align, paired_test  # noqa: E402
from samtone_ray.model.towers import DualEncoder  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="model dir or all-MiniLM-L6-v2 (repeatable)")
    parser.add_argument("--data", default="bundled:debian")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--caps", default="0,2000,1000,500", help="train.eval_max_docs values (0 = whole corpus)")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_cap_metrics.json"))
    args = parser.parse_args()

    split = load_beir(resolve_data_path(args.data), args.split)
    caps = [int(c) for c in args.caps.split(",")]
    splits = {cap: bound_eval_corpus(split, cap) for cap in caps}
    rows, per_query = [], {}
    for name in args.model:
        model = DualEncoder.from_pretrained(name)
        for cap, bounded in splits.items():
            t0 = time.perf_counter()
            means, queries = evaluate_model(model, bounded, args.batch_size, args.precision, per_query=True)
            seconds = time.perf_counter() - t0
            per_query[(name, cap)] = {q: v["mrr@10"] for q, v in queries.items()}
            rows.append({"model": name, "eval_max_docs": cap, "documents": len(bounded.corpus), "seconds": seconds}
                        | {k: means[k] for k in DEFAULT_TABLE_KEYS})
            print(json.dumps(rows[-1]), flush=True)
    paired = []
    if len(args.model) >= 2:
        a, b = args.model[:2]
        for cap in caps:
            test = paired_test(*align(per_query[(a, cap)], per_query[(b, cap)]))
            paired.append({"eval_max_docs": cap, "a": a, "b": b, "mrr@10_diff": test.diff, "low": test.low,
                           "high": test.high, "p_value": test.p_value, "queries": test.queries})
            print(json.dumps(paired[-1]), flush=True)
    atomic_write_json(args.out, {
        "what": "dev metrics on the whole eval corpus vs bounded by train.eval_max_docs (benchmarks/eval_cap_metrics.py)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "data": f"{args.data} [{args.split}]", "queries": len(split.qrels), "corpus": len(split.corpus),
        "precision": args.precision, "rows": rows, "paired_a_minus_b": paired,
        "note": "Shared 2-core machine: seconds are indicative only (other helpers and a niced background "
                "tuning run may have been running).",
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
