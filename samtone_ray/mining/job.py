"""``samtone mine``: training pairs of a BEIR split with mined hard negatives.

Output: the pairs ``samtone train`` reads from a BEIR split (one row per qrels row with
relevance > 0, in file order: ``query``, ``document``, ``query_id``, ``doc_id``) plus
``negatives`` (``list<string>``, the texts, best first; every pair of a query gets that query's
list) and ``negative_ids`` (their corpus ids; train ignores the column). ``--out`` ending in
``.parquet`` is one file with ``<stem>.summary.json`` beside it; any other path is a folder
holding ``pairs.parquet`` and ``summary.json``. Both appear whole (temp + rename) or not at all.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from samtone_ray.core.config import MiningConfig
from samtone_ray.core.files import atomic_write_bytes, atomic_write_dir, atomic_write_json
from samtone_ray.data.sources import DataError, iter_jsonl, load_beir, load_training_pairs, resolve_data_path
from samtone_ray.mining.embeddings import DEFAULT_CACHE_DIR, EmbeddingCache
from samtone_ray.mining.filters import MiningReport, QueryCandidates, mine_negatives
from samtone_ray.mining.retrievers import DENSE_SEARCHES, Candidates, DenseSearch

log = logging.getLogger(__name__)

Retriever = Literal["bm25", "dense"]
RETRIEVERS: tuple[str, ...] = ("bm25", "dense")
PAIRS_FILE = "pairs.parquet"
SUMMARY_FILE = "summary.json"


@dataclass
class MineOptions:
    data: str  # a BEIR folder, or bundled:debian
    out: Path
    split: str = "train"
    retriever: Retriever = "bm25"
    model: str | None = None  # any URI resolve_model accepts; dense only
    mining: MiningConfig = field(default_factory=MiningConfig)
    search: DenseSearch = "exact"
    batch_size: int = 128
    cache_dir: Path | None = DEFAULT_CACHE_DIR  # None: encode every time
    tracking_uri: str | None = None
    show_progress: bool = False
    drop_empty: bool = False  # leave out the pairs of queries given no negative (train refuses them)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.retriever not in RETRIEVERS:
            raise ValueError(f"retriever must be one of {RETRIEVERS}; got {self.retriever!r}")
        if self.retriever == "dense" and not self.model:
            raise ValueError("the dense retriever needs a model (--model URI)")
        if self.retriever == "bm25" and self.model:
            raise ValueError(f"--model {self.model} is only used by the dense retriever (--retriever dense)")
        if self.search not in DENSE_SEARCHES:
            raise ValueError(f"search must be one of {DENSE_SEARCHES}; got {self.search!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")

    @property
    def summary_path(self) -> Path:
        if self.out.suffix == ".parquet":
            return self.out.with_name(f"{self.out.stem}.summary.json")
        return self.out / SUMMARY_FILE


@dataclass
class MineResult:
    out: Path
    summary_path: Path
    summary: dict[str, Any]

    @property
    def report(self) -> dict[str, Any]:
        return self.summary["report"]


def run_mine(opts: MineOptions) -> MineResult:
    """Mine ``opts.split`` of ``opts.data`` and write the pairs (see the module docstring)."""
    start = time.perf_counter()
    timings: dict[str, float] = {}
    root = Path(resolve_data_path(opts.data))
    corpus_path = root / "corpus.jsonl"
    if root.is_dir() and corpus_path.is_file() and next(iter_jsonl(corpus_path), None) is None:
        raise DataError(f"{corpus_path}: no documents to mine from (the corpus is empty)")
    split = load_beir(root, opts.split)  # every qrels id checked against the files (file:line)
    pairs = load_training_pairs(root, opts.split).table
    timings["load_s"] = time.perf_counter() - start

    doc_ids = list(split.corpus)
    doc_texts = list(split.corpus.values())
    row_of = {doc_id: row for row, doc_id in enumerate(doc_ids)}
    query_ids = list(dict.fromkeys(pairs.column("query_id").to_pylist()))
    query_texts = [split.queries[qid] for qid in query_ids]
    positives = [np.array([row_of[d] for d, rel in split.qrels[qid].items() if rel > 0], np.int64) for qid in query_ids]
    max_positives = max(len(p) for p in positives)
    window = opts.mining.window(max_positives)
    depth = window + max_positives + 1  # as sentence-transformers: room for the positives and the query's own text

    t0 = time.perf_counter()
    model_info, candidates = _retrieve(opts, doc_texts, query_texts, positives, depth, timings)
    timings["retrieve_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    text_codes, query_codes = _text_codes(doc_texts, query_texts)
    found = (QueryCandidates(q, *candidates.of(q), positives[q], candidates.positive_scores[q]) for q in range(len(query_ids)))
    negatives, report = mine_negatives(found, text_codes, query_codes, opts.mining, window)
    timings["filter_s"] = time.perf_counter() - t0

    table = _with_negatives(pairs, query_ids, negatives, doc_ids, doc_texts)
    dropped = 0
    if opts.drop_empty:
        kept = table.filter(pc.greater(pc.list_value_length(table.column("negatives")), 0))
        dropped, table = table.num_rows - kept.num_rows, kept
        if not table.num_rows:
            raise DataError(f"{root}: no query of split {opts.split!r} got a negative; nothing to write (loosen the filters)")
    summary = {
        "data": str(root), "split": opts.split, "retriever": opts.retriever, "model": model_info,
        "search": opts.search if opts.retriever == "dense" else None, "mining": asdict(opts.mining),
        "window": window, "depth": depth, "pairs": table.num_rows, "dropped_pairs": dropped, "documents": len(doc_ids),
        "report": report.as_dict(), "timings": timings, "output": str(opts.out),
    }
    timings["total_s"] = time.perf_counter() - start  # before the write: the summary holds it
    _write(opts, table, summary)
    return MineResult(out=opts.out, summary_path=opts.summary_path, summary=summary)


def _retrieve(opts: MineOptions, doc_texts: list[str], query_texts: list[str], positives: list[np.ndarray],
              depth: int, timings: dict[str, float]) -> tuple[dict[str, Any] | None, Candidates]:
    from samtone_ray.mining.retrievers import bm25_candidates, dense_candidates

    if opts.retriever == "bm25":
        return None, bm25_candidates(doc_texts, query_texts, positives, depth, show_progress=opts.show_progress)

    from samtone_ray.mining.embeddings import encode_cached
    from samtone_ray.model.towers import DualEncoder
    from samtone_ray.tracking.model_uri import resolve_model

    resolved = resolve_model(opts.model, opts.tracking_uri)  # ModelURIError names the URI
    model = DualEncoder.from_pretrained(resolved.path)
    cache = EmbeddingCache(opts.cache_dir) if opts.cache_dir else None
    t0 = time.perf_counter()
    doc_emb, doc_hit = encode_cached(model, resolved.fingerprint, doc_texts, "doc", cache,
                                     batch_size=opts.batch_size, show_progress=opts.show_progress)
    query_emb, query_hit = encode_cached(model, resolved.fingerprint, query_texts, "query", cache,
                                         batch_size=opts.batch_size, show_progress=opts.show_progress)
    timings["encode_s"] = time.perf_counter() - t0
    info = resolved.as_dict() | {"cached": {"documents": doc_hit, "queries": query_hit}}
    return info, dense_candidates(query_emb, doc_emb, positives, depth, search=opts.search,
                                  show_progress=opts.show_progress)


def _text_codes(doc_texts: list[str], query_texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Exact text codes (Arrow's dictionary encoding: equal texts, equal codes) of the documents
    and the queries, in one code space."""
    encoded = pa.chunked_array([pa.array(doc_texts, pa.string()), pa.array(query_texts, pa.string())]).dictionary_encode()
    codes = np.concatenate([np.asarray(c.indices, np.int64) for c in encoded.chunks])
    return codes[: len(doc_texts)], codes[len(doc_texts):]


def _with_negatives(pairs: pa.Table, query_ids: list[str], negatives: list[np.ndarray], doc_ids: list[str],
                    doc_texts: list[str]) -> pa.Table:
    by_query = dict(zip(query_ids, negatives))
    rows = [by_query[qid] for qid in pairs.column("query_id").to_pylist()]
    texts = pa.array([[doc_texts[r] for r in row] for row in rows], pa.list_(pa.string()))
    ids = pa.array([[doc_ids[r] for r in row] for row in rows], pa.list_(pa.string()))
    return pairs.append_column("negatives", texts).append_column("negative_ids", ids)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _write(opts: MineOptions, table: pa.Table, summary: dict[str, Any]) -> None:
    if opts.out.suffix == ".parquet":
        # The pairs first: a summary never describes a file that is not there.
        atomic_write_bytes(opts.out, _parquet_bytes(table))
        atomic_write_json(opts.summary_path, summary)
        return

    def write(folder: Path) -> None:
        (folder / PAIRS_FILE).write_bytes(_parquet_bytes(table))
        atomic_write_json(folder / SUMMARY_FILE, summary)

    atomic_write_dir(opts.out, write)


def format_report(report: MiningReport | dict[str, Any]) -> str:
    """What each filter removed, and the queries short of negatives, as lines for the terminal."""
    data = report.as_dict() if isinstance(report, MiningReport) else report
    lines = [f"{data['queries']} queries, {data['candidates']} candidates, {data['negatives']} negatives kept"]
    for name, count in data["removed"].items():
        if count:
            share = count / data["candidates"] if data["candidates"] else 0.0
            lines.append(f"  removed by {name:<16} {count:>9}  ({share:.1%} of candidates)")
    lines.append(f"{data['short_queries']} queries got fewer than {data['num_negatives']} negatives "
                 f"({data['empty_queries']} got none)")
    return "\n".join(lines)


def log_to_mlflow(tracking_uri: str, experiment: str, result: MineResult) -> str:
    """A ``mine`` run: the settings as params, the report's counts as metrics, the summary as an artifact."""
    from samtone_ray.tracking import runs as tracking

    uri = tracking.tracking_uri(tracking_uri)
    s = result.summary
    params = {"data": s["data"], "split": s["split"], "retriever": s["retriever"], "search": s["search"],
              "output": s["output"], "window": s["window"], "depth": s["depth"]}
    params |= {f"mining.{k}": v for k, v in s["mining"].items()}
    if s["model"]:
        params |= {"model": s["model"]["uri"], "model_version": s["model"]["version"],
                   "model_fingerprint": s["model"]["fingerprint"]}
    run_id = tracking.start_run(uri, experiment, "mine", params, tags={"samtone.task": "mine"})
    logger = tracking.RunLogger(uri, run_id)
    report = s["report"]
    metrics = {k: report[k] for k in ("queries", "candidates", "negatives", "short_queries", "empty_queries")}
    metrics |= {f"removed.{k}": v for k, v in report["removed"].items()} | {k: v for k, v in s["timings"].items()}
    logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=0)
    logger.log_artifact(result.summary_path)
    logger.finish()
    return run_id
