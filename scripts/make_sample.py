"""Build the small real BEIR sample bundled with the package (samtone_ray/sample/debian).

    python scripts/make_sample.py --source /work/shared/data/debian \
        --out samtone_ray/sample/debian --train-queries 2950 --dev-queries 300 \
        --distractors 2000 --seed 0

Queries are sampled (without replacement) from the source's train and dev qrels; every qrels row
of a sampled query is kept, so the sample's splits stay disjoint as the source's are (the source
splits by connected component of shared texts and source packages). The corpus holds every
document judged for a sampled query plus ``--distractors`` documents drawn from the rest of the
source corpus. The same arguments give byte-identical output: ids are sorted before sampling
with ``random.Random(seed)`` and files are written in source order.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
from pathlib import Path

# Runs from a checkout whether or not the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samtone_ray.data.sources import iter_jsonl, load_beir, read_qrels  # noqa: E402

LICENCE = """\
Debian package descriptions (Debian 12). Each description comes from its package's
`debian/control` under that package's free licence; attribute "Debian package descriptions
(Debian 12)". The corpus is a snapshot: the archive changes at each point release."""


def sample_queries(qrels: dict[str, dict[str, int]], n: int, rng: random.Random) -> dict[str, dict[str, int]]:
    """``n`` queries of ``qrels`` drawn without replacement, with all their rows, in source order."""
    if n > len(qrels):
        raise ValueError(f"asked for {n} queries, the split has only {len(qrels)}")
    chosen = set(rng.sample(sorted(qrels), n))
    return {qid: docs for qid, docs in qrels.items() if qid in chosen}


def write_qrels(path: Path, qrels: dict[str, dict[str, int]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, docs in qrels.items():
            for did, score in docs.items():
                f.write(f"{qid}\t{did}\t{score}\n")


def copy_records(source: Path, out: Path, keep: set[str]) -> int:
    """Copy the JSONL records of ``source`` whose ``_id`` is in ``keep``; return how many."""
    n = 0
    with out.open("w", encoding="utf-8", newline="\n") as f:
        for _, record in iter_jsonl(source):
            if record["_id"] in keep:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
    return n


def build(args: argparse.Namespace) -> tuple[dict[str, int], dict[str, int]]:
    """Write the sample; return (sample counts, source counts)."""
    source, out = Path(args.source), Path(args.out)
    rng = random.Random(args.seed)
    full_train = read_qrels(source / "qrels" / "train.tsv")
    full_dev = read_qrels(source / "qrels" / "dev.tsv")
    train = sample_queries(full_train, args.train_queries, rng)
    dev = sample_queries(full_dev, args.dev_queries, rng)

    judged = {did for split in (train, dev) for docs in split.values() for did in docs}
    all_ids = sorted(record["_id"] for _, record in iter_jsonl(source / "corpus.jsonl"))
    pool = sorted(set(all_ids) - judged)
    distractors = set(rng.sample(pool, args.distractors))

    (out / "qrels").mkdir(parents=True, exist_ok=True)
    n_docs = copy_records(source / "corpus.jsonl", out / "corpus.jsonl", judged | distractors)
    n_queries = copy_records(source / "queries.jsonl", out / "queries.jsonl", set(train) | set(dev))
    write_qrels(out / "qrels" / "train.tsv", train)
    write_qrels(out / "qrels" / "dev.tsv", dev)

    # Read the result back through the loader: it checks every qrels id resolves.
    loaded = {split: load_beir(out, split) for split in ("train", "dev")}
    train_docs = {d for docs in train.values() for d in docs}
    dev_docs = {d for docs in dev.values() for d in docs}
    if set(train) & set(dev) or train_docs & dev_docs:
        raise RuntimeError("train and dev samples share a query or a judged document")
    source_counts = {
        "corpus": len(all_ids),
        "train": sum(len(d) for d in full_train.values()),
        "dev": sum(len(d) for d in full_dev.values()),
    }
    return {
        "corpus documents": n_docs,
        "distractor documents": len(distractors),
        "queries": n_queries,
        "train queries": len(loaded["train"].queries),
        "train pairs": sum(len(d) for d in train.values()),
        "dev queries": len(loaded["dev"].queries),
        "dev qrels rows": sum(len(d) for d in dev.values()),
    }, source_counts


def write_readme(out: Path, args: argparse.Namespace, counts: dict[str, int], source: dict[str, int]) -> None:
    command = "python scripts/make_sample.py " + " ".join(
        f"--{flag} {shlex.quote(str(value))}"
        for flag, value in (
            ("source", args.source),
            ("out", args.out),
            ("train-queries", args.train_queries),
            ("dev-queries", args.dev_queries),
            ("distractors", args.distractors),
            ("seed", args.seed),
        )
    )
    table = "\n".join(f"| {name} | {value} |" for name, value in counts.items())
    text = f"""# Debian package search: bundled sample

A small real sample of the Debian package search dataset (BEIR layout), for tests and quick runs.
Query: a package's one-line synopsis. Document: the package's long description.

## How it was built

```
{command}
```

Source: the full dataset (`corpus.jsonl` {source["corpus"]:,} documents; `qrels/train.tsv`
{source["train"]:,} pairs; `qrels/dev.tsv` {source["dev"]:,} pairs), built from Debian 12
(bookworm, main, amd64 + all) package indexes and their English translations.

Train and dev queries were sampled without replacement (seed {args.seed}) from the source's train
and dev qrels, keeping every qrels row of a sampled query. The corpus holds every document judged
for a sampled query plus random distractors from the rest of the source corpus. The source splits
are disjoint by connected component (shared query text, shared document text, same source
package); sampling whole queries keeps them disjoint here. Figures on this sample are not
comparable with figures on the full corpus.

## Counts

| what | count |
| --- | --- |
{table}

## Licence

{LICENCE}
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="full BEIR folder")
    parser.add_argument("--out", required=True, help="sample folder to write")
    parser.add_argument("--train-queries", type=int, required=True)
    parser.add_argument("--dev-queries", type=int, required=True)
    parser.add_argument("--distractors", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts, source_counts = build(args)
    write_readme(Path(args.out), args, counts, source_counts)
    print(json.dumps(counts, indent=2))


if __name__ == "__main__":
    main()
