"""Quality cost of a cheaper inference precision: ``samtone eval --precision P`` for each P, same data.

Runs the real CLI (``python -m samtone_ray.cli eval --json``) once per precision on one BEIR split
and prints MRR@10 / nDCG@10 / recall@100 side by side with the delta to the first precision (fp32).

The Debian dev split has 5,889 queries and 59k documents; encoding all of them in fp32 takes about
15 minutes on this 2-core machine, so ``--others N`` (default 15,000) evaluates on every document
relevant to a dev query plus a fixed random sample (``--seed``) of N other documents, written as a
BEIR folder under a temporary directory; ``--queries N`` also samples N of the split's queries
(and keeps only their relevant documents) when even that is too slow. Scores on such a corpus are higher than on the full one
(fewer distractors); the fp32 -> int8 delta is what this measures. ``--others 0`` keeps the full corpus.

No Ray, no timing: it needs no lock. Results go to ``results/precision_quality.json``; the last line
is the MRR@10 delta of the last precision against the first.

Usage::

    python benchmarks/precision_quality.py --precisions fp32 int8 [--others 15000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))
from benchmarks.encode_throughput import DEFAULT_DATA, MODEL  # noqa: E402

KEYS = ("mrr@10", "ndcg@10", "recall@100")


def subset(beir: Path, split: str, queries: int, others: int, seed: int, out: Path) -> dict:
    """A BEIR folder at ``out``: ``queries`` of ``split``'s queries (all if 0) drawn with ``seed``, their
    qrels and relevant documents, and ``others`` other documents drawn with ``seed``. Returns its sizes."""
    header, *rows = [line for line in (beir / "qrels" / f"{split}.tsv").read_text().splitlines() if line.strip()]
    qids = sorted({row.split("\t")[0] for row in rows})
    if queries:
        qids = set(random.Random(seed).sample(qids, min(queries, len(qids))))
    rows = [row for row in rows if row.split("\t")[0] in qids]
    relevant = {row.split("\t")[1] for row in rows}
    with open(beir / "corpus.jsonl", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    ids = [json.loads(line)["_id"] for line in lines]
    rest = sorted(i for i, doc_id in enumerate(ids) if doc_id not in relevant)
    keep = {i for i, doc_id in enumerate(ids) if doc_id in relevant} | set(random.Random(seed).sample(rest, min(others, len(rest))))
    (out / "qrels").mkdir(parents=True)
    (out / "corpus.jsonl").write_text("".join(lines[i] for i in sorted(keep)), encoding="utf-8")
    shutil.copy(beir / "queries.jsonl", out / "queries.jsonl")
    (out / "qrels" / f"{split}.tsv").write_text("\n".join([header, *rows]) + "\n")
    return {"queries": len(qids), "documents": len(keep), "relevant": len(relevant), "others": len(keep) - len(relevant)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA.parent, help="a BEIR folder")
    p.add_argument("--split", default="dev")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    p.add_argument("--queries", type=int, default=0, help="queries of the split sampled (0 = all)")
    p.add_argument("--others", type=int, default=15000, help="non-relevant documents sampled (0 = the full corpus)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", type=Path, default=_REPO / "benchmarks" / "results" / "precision_quality.json")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="precision-quality-"))
    data, sizes = args.data, None
    if args.others or args.queries:
        data = work / "beir"
        sizes = subset(args.data, args.split, args.queries, args.others, args.seed, data)
        print(f"{sizes['queries']} queries; corpus: {sizes['relevant']} relevant + {sizes['others']} sampled documents "
              f"(seed {args.seed})", flush=True)
    rows = {}
    env = dict(os.environ, PYTHONPATH=str(_REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for precision in args.precisions:
        cmd = [sys.executable, "-m", "samtone_ray.cli", "eval", "--model", args.model, "--data", str(data),
               "--split", args.split, "--batch-size", str(args.batch_size), "--precision", precision, "--json"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows[precision] = {k: result[k] for k in KEYS} | {"wall_s": time.perf_counter() - t0, "queries": result["queries"],
                                                          "documents": result["documents"]}
        print(f"{precision:<6} " + "  ".join(f"{k} {result[k]:.4f}" for k in KEYS) + f"  ({rows[precision]['wall_s']:.0f} s)", flush=True)
    shutil.rmtree(work, ignore_errors=True)

    first, last = args.precisions[0], args.precisions[-1]
    payload = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"data": str(args.data), "split": args.split, "model": args.model, "queries": args.queries, "others": args.others,
                     "seed": args.seed, "batch_size": args.batch_size, "corpus": sizes},
        "command": "samtone eval --model M --data D --split S --precision P --json",
        "results": rows,
        "delta_vs_" + first: {p: {k: rows[p][k] - rows[first][k] for k in KEYS} for p in args.precisions[1:]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    for k in KEYS[:2]:
        print(f"{k}: {last} - {first} = {rows[last][k] - rows[first][k]:+.4f}")
    print(f"mrr@10 delta ({last} - {first}): {rows[last]['mrr@10'] - rows[first]['mrr@10']:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
