"""Retrieval data on disk -> evaluation splits (Python dicts) and training pairs (an Arrow table).

Two inputs are understood:

* a BEIR folder: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``,
  ``text``) and ``qrels/<split>.tsv`` (``query-id<TAB>corpus-id<TAB>score`` with a header line);
* Parquet training pairs: a ``.parquet`` file, or a folder of them, with string columns ``query``
  and ``document``, and optionally ``negatives`` (``list<string>``), ``query_id`` and ``doc_id``.

Files are read as UTF-8 and streamed line by line (JSONL) or batch by batch (Parquet), so memory
holds what the caller asked for, not the whole file. Training pairs become a
:class:`~samtone_ray.data.pairs.PairTable`: Parquet batches go into it as Arrow, unconverted; BEIR texts
are validated line by line in Python (pyarrow's JSON reader accepts two records on one line, a BOM
and ``"title": null``, which must fail here), then joined to the qrels with Arrow. Every malformed
input raises :class:`DataError` whose message starts with ``<file>:<line>`` (text files) or names the file and
the column (Parquet), so the fix can start from the message alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from samtone_ray.data.pairs import TABLE_TYPES, PairTable, TrainingPairs  # noqa: F401 (TrainingPairs re-exported)
from samtone_ray.data.sampling import bound_corpus

PathLike = str | Path

_PARQUET_REQUIRED = ("query", "document")
_PARQUET_OPTIONAL = ("negatives", "query_id", "doc_id")
_PARQUET_BATCH_ROWS = 65536  # rows per Arrow chunk of the pair table

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Malformed or missing input data; the message names the file and the line or column."""


# --------------------------------------------------------------------------------------------
# Low-level readers
# --------------------------------------------------------------------------------------------


def _require_file(path: Path) -> Path:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise DataError(f"{path}: file {what}")
    return path


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "not found"
        raise DataError(f"{path}: folder {what}")
    return path


def iter_jsonl(path: PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line of a UTF-8 JSONL file.

    Line numbers are 1-based. Each line must hold one JSON object; otherwise :class:`DataError`
    names ``file:line``. Blank lines (e.g. a trailing newline) are skipped.
    """
    path = _require_file(Path(path))
    # Binary mode + per-line decode so that a bad byte is reported with its line number.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading byte-order mark is no data
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _field(record: dict, name: str, path: Path, lineno: int, required: bool = True) -> str:
    """A string field of a JSONL record; ids may be JSON integers (BEIR files use both)."""
    if name not in record:
        if required:
            raise DataError(f"{path}:{lineno}: record has no field {name!r}")
        return ""
    value = record[name]
    if name == "_id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{path}:{lineno}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def join_text(fields: dict[str, str], text_fields: tuple[str, ...] = ("title", "text")) -> str:
    """The encoded text of a record: its non-empty text fields in order, joined by one space. For
    BEIR's ``title``, ``text`` this is ``title + " " + text`` (just ``text`` without a title), the
    convention training, evaluation, serving and re-encoding all share."""
    return " ".join(fields[name] for name in text_fields if fields.get(name))


def _iter_records(path: Path, kind: str, keep: set[str] | None) -> Iterator[tuple[str, str, str]]:
    """Stream ``(id, title, text)`` from a BEIR corpus or queries file, checking every line.

    ``kind`` is ``"corpus"`` or ``"queries"`` (whose title is always empty). Every record is
    validated, including those not kept, so a broken file fails the same way whatever the caller
    asks for. Duplicate ids are an error because a second text for one id would silently change
    the relevance judgements.
    """
    first_line: dict[str, int] = {}
    for lineno, record in iter_jsonl(path):
        doc_id = _field(record, "_id", path, lineno)
        text = _field(record, "text", path, lineno)
        if doc_id in first_line:
            raise DataError(f"{path}:{lineno}: duplicate _id {doc_id!r} (first at line {first_line[doc_id]})")
        first_line[doc_id] = lineno
        title = _field(record, "title", path, lineno, required=False) if kind == "corpus" else ""
        if keep is None or doc_id in keep:
            yield doc_id, title, text


def _read_texts(path: Path, kind: str, keep: set[str] | None) -> dict[str, str]:
    return {doc_id: join_text({"title": title, "text": text}) for doc_id, title, text in _iter_records(path, kind, keep)}


def read_corpus(path: str | Path) -> tuple[list[str], list[str], list[str]]:
    """ids, titles and texts of a BEIR ``corpus.jsonl`` (titles may be empty), checked line by line."""
    path = _require_file(Path(path))
    rows = list(_iter_records(path, "corpus", keep=None))
    if not rows:
        raise DataError(f"{path}: no documents")
    ids, titles, texts = (list(col) for col in zip(*rows))
    return ids, titles, texts


@dataclass(frozen=True)
class _QrelsRow:
    line: int
    query_id: str
    doc_id: str
    score: int


def _iter_qrels_rows(path: Path) -> Iterator[_QrelsRow]:
    """Stream the rows of a BEIR qrels TSV file.

    Line 1 is the header when its score field is not an integer (BEIR files always carry
    ``query-id<TAB>corpus-id<TAB>score``); otherwise it is data. Blank lines are skipped.
    """
    path = _require_file(path)
    seen: set[tuple[str, str]] = set()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 3:
                raise DataError(
                    f"{path}:{lineno}: expected 3 tab-separated fields "
                    f"(query-id, corpus-id, score), got {len(fields)}: {line!r}"
                )
            query_id, doc_id, score_text = fields
            try:
                score = int(score_text)
            except ValueError:
                if lineno == 1:
                    continue  # header line
                raise DataError(f"{path}:{lineno}: score must be an integer, got {score_text!r}") from None
            if not query_id or not doc_id:
                raise DataError(f"{path}:{lineno}: empty query-id or corpus-id")
            if (query_id, doc_id) in seen:
                # Two scores for one pair would make the judgement depend on reading order.
                raise DataError(f"{path}:{lineno}: duplicate qrels row for query {query_id!r}, doc {doc_id!r}")
            seen.add((query_id, doc_id))
            yield _QrelsRow(lineno, query_id, doc_id, score)


def read_qrels(path: PathLike) -> dict[str, dict[str, int]]:
    """Read a BEIR qrels TSV file into ``{query_id: {doc_id: relevance}}`` (file order kept)."""
    qrels: dict[str, dict[str, int]] = {}
    for row in _iter_qrels_rows(Path(path)):
        qrels.setdefault(row.query_id, {})[row.doc_id] = row.score
    return qrels


def _qrels_file(root: Path, split: str) -> Path:
    path = root / "qrels" / f"{split}.tsv"
    if not path.is_file():
        available = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
        raise DataError(f"{path}: qrels file for split {split!r} not found (available splits: {available})")
    return path


def _check_known(
    rows: Iterable[_QrelsRow], qrels_path: Path, queries: dict, corpus: dict, sources: tuple[Path, Path]
) -> None:
    """Raise on the first qrels row (in file order) naming an id absent from queries or corpus."""
    for row in rows:
        if row.query_id not in queries:
            raise DataError(f"{qrels_path}:{row.line}: unknown query id {row.query_id!r} (not in {sources[0]})")
        if row.doc_id not in corpus:
            raise DataError(f"{qrels_path}:{row.line}: unknown doc id {row.doc_id!r} (not in {sources[1]})")


# --------------------------------------------------------------------------------------------
# BEIR evaluation split
# --------------------------------------------------------------------------------------------


@dataclass
class BeirSplit:
    """One split of a BEIR dataset, ready for retrieval evaluation.

    ``corpus`` is the whole corpus (``doc_id -> "title text"``, or just ``text`` when the title is
    empty); ``queries`` holds only the queries judged in this split's qrels; ``qrels`` maps
    ``query_id -> {doc_id: relevance}``.
    """

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    corpus_total: int | None = None
    """Documents in the whole corpus when ``corpus`` is a bounded sample of it (``bound_eval_corpus``);
    None when ``corpus`` is the whole corpus."""

    def corpus_summary(self) -> str:
        """What is searched, for logs and leaderboard headers."""
        if self.corpus_total is None:
            return f"all {len(self.corpus)} documents"
        return f"{len(self.corpus)} of {self.corpus_total} documents (relevant + fixed sample)"

    def corpus_params(self) -> dict[str, int]:
        """``eval_docs`` (searched) and ``eval_docs_total`` (in the corpus), as run params."""
        return {"eval_docs": len(self.corpus), "eval_docs_total": self.corpus_total or len(self.corpus)}


def load_beir(path: PathLike, split: str) -> BeirSplit:
    """Load ``split`` of the BEIR folder ``path``; every qrels id must exist in the files."""
    root = _require_dir(Path(path))
    qrels_path = _qrels_file(root, split)
    rows = list(_iter_qrels_rows(qrels_path))
    if not rows:
        raise DataError(f"{qrels_path}: split {split!r} is empty (no qrels rows)")
    qrels: dict[str, dict[str, int]] = {}
    for row in rows:
        qrels.setdefault(row.query_id, {})[row.doc_id] = row.score

    queries_path, corpus_path = root / "queries.jsonl", root / "corpus.jsonl"
    queries = _read_texts(queries_path, "queries", keep=set(qrels))
    corpus = _read_texts(corpus_path, "corpus", keep=None)
    _check_known(rows, qrels_path, queries, corpus, (queries_path, corpus_path))
    return BeirSplit(corpus=corpus, queries=queries, qrels=qrels)


EVAL_SAMPLE_SEED = 0
"""Seed of the fixed document sample of a bounded eval corpus. Deliberately not ``train.seed``:
trials that differ in their seed must still be scored on the same documents."""


def bound_eval_corpus(split: BeirSplit, max_docs: int) -> BeirSplit:
    """``split`` searching at most ``max_docs`` documents (``train.eval_max_docs``; 0 = all).

    Kept: every document the qrels judge (so no relevant document is ever missing from the
    search), plus a fixed random sample of the others up to ``max_docs`` in all. The sample
    depends only on the set of document ids and ``EVAL_SAMPLE_SEED`` (``sampling.bound_corpus``),
    not on the run's seed or the corpus order, so every evaluation that loads the same data with
    the same cap (each trial, the zero-shot reference, the champion re-evaluation) searches the
    same documents. When the judged documents alone number more than ``max_docs``, all of them
    are kept (and a warning says so). Documents stay in corpus order.
    """
    import numpy as np

    if max_docs < 0:
        raise ValueError(f"max_docs must be >= 0 (0 = the whole corpus), got {max_docs}")
    total = split.corpus_total or len(split.corpus)
    judged = {doc_id for judgements in split.qrels.values() for doc_id in judgements}
    if not max_docs or len(split.corpus) <= max_docs:
        return split
    if len(judged) > max_docs:
        log.warning("train.eval_max_docs=%d is below the %d documents the eval qrels judge: searching all of "
                    "those and no other", max_docs, len(judged))
    keep = set(bound_corpus(list(split.corpus), judged, max_docs, np.random.default_rng(EVAL_SAMPLE_SEED)))
    corpus = {doc_id: text for doc_id, text in split.corpus.items() if doc_id in keep}
    return BeirSplit(corpus=corpus, queries=split.queries, qrels=split.qrels, corpus_total=total)


# --------------------------------------------------------------------------------------------
# Training pairs
# --------------------------------------------------------------------------------------------


def load_training_pairs(path: PathLike, split: str = "train", *, num_negatives: int = 0) -> PairTable:
    """Load training pairs from a BEIR folder or from Parquet into a :class:`PairTable`.

    * BEIR folder (has ``qrels/``): one pair per row of ``qrels/<split>.tsv`` with relevance > 0,
      in file order; texts are looked up while streaming the queries and corpus once, keeping
      only the needed ones. ``split`` is ignored for Parquet.
    * ``.parquet`` file or folder of ``.parquet`` files (read in name order): see module docstring.

    ``num_negatives`` > 0 (``data.num_hard_negatives``) needs Parquet with a ``negatives`` column
    and at least one negative in every row: an empty or null list fails here, naming the file and
    the row, instead of deep inside a training worker.
    """
    path = Path(path)
    if path.is_file():
        return _pairs_from_parquet([path], label=path, num_negatives=num_negatives)
    root = _require_dir(path)
    if (root / "qrels").is_dir():
        if num_negatives:
            raise DataError(f"{root}: data.num_hard_negatives={num_negatives} needs Parquet training pairs with "
                            "a 'negatives' column; a BEIR folder has no hard negatives")
        return _pairs_from_beir(root, split)
    files = sorted(root.glob("*.parquet"))
    if not files:
        raise DataError(f"{root}: neither a BEIR folder (no qrels/) nor a folder of .parquet files")
    return _pairs_from_parquet(files, label=root, num_negatives=num_negatives)


def _pairs_from_beir(root: Path, split: str) -> PairTable:
    qrels_path = _qrels_file(root, split)
    rows = [row for row in _iter_qrels_rows(qrels_path) if row.score > 0]
    if not rows:
        raise DataError(f"{qrels_path}: split {split!r} has no positive pairs (no row with score > 0)")
    queries_path, corpus_path = root / "queries.jsonl", root / "corpus.jsonl"
    queries = _read_texts(queries_path, "queries", keep={r.query_id for r in rows})
    corpus = _read_texts(corpus_path, "corpus", keep={r.doc_id for r in rows})
    _check_known(rows, qrels_path, queries, corpus, (queries_path, corpus_path))
    query_ids = pa.array([r.query_id for r in rows], pa.string())
    doc_ids = pa.array([r.doc_id for r in rows], pa.string())
    table = pa.table({"query": _look_up(queries, query_ids), "document": _look_up(corpus, doc_ids),
                      "query_id": query_ids, "doc_id": doc_ids})
    return PairTable.from_table(table)


def _look_up(texts: dict[str, str], ids: pa.Array) -> pa.Array:
    """``texts[id]`` for every id, as an Arrow take: each distinct text becomes one Arrow string,
    never one Python string per pair (a document judged for many queries is not repeated in Python)."""
    keys = pa.array(list(texts), pa.string())
    values = pa.array(list(texts.values()), pa.string())
    rows = pc.index_in(ids, value_set=keys)
    # In chunks: one string array holds at most 2 GiB of text.
    step = _PARQUET_BATCH_ROWS
    return pa.chunked_array([values.take(rows.slice(i, step)) for i in range(0, len(rows), step)], pa.string())


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _check_parquet_schema(path: Path, schema: pa.Schema) -> tuple[str, ...]:
    """Validate column presence and types; return the optional columns present."""
    present = schema.names
    for name in _PARQUET_REQUIRED:
        if name not in present:
            raise DataError(f"{path}: missing required column {name!r} (columns present: {present})")
    optional = tuple(name for name in _PARQUET_OPTIONAL if name in present)
    for name in (*_PARQUET_REQUIRED, "query_id", "doc_id"):
        if name in present and not _is_string(schema.field(name).type):
            raise DataError(f"{path}: column {name!r} must be string, got {schema.field(name).type}")
    if "negatives" in present:
        kind = schema.field("negatives").type
        is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
        if not (is_list and _is_string(kind.value_type)):
            raise DataError(f"{path}: column 'negatives' must be list<string>, got {kind}")
    return optional


def _pairs_from_parquet(files: Sequence[Path], label: Path, num_negatives: int) -> PairTable:
    batches: list[pa.RecordBatch] = []
    optional: tuple[str, ...] | None = None
    for path in files:
        reader = _open_parquet(path)
        schema = reader.schema_arrow
        file_optional = _check_parquet_schema(path, schema)
        if num_negatives and "negatives" not in file_optional:
            raise DataError(f"{path}: data.num_hard_negatives={num_negatives} needs a 'negatives' column "
                            f"(columns present: {', '.join(schema.names)})")
        if optional is None:
            optional = file_optional
        elif file_optional != optional:
            # Mixing files with and without negatives/ids would leave holes in those columns.
            raise DataError(
                f"{path}: optional columns {list(file_optional)} differ from those of {files[0]}: {list(optional)}"
            )
        names = [*_PARQUET_REQUIRED, *optional]
        target = pa.schema([(name, TABLE_TYPES[name]) for name in names])
        row0 = 0
        for batch in reader.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=names):
            _check_batch(path, batch, row0, num_negatives)
            batches.append(batch.cast(target))  # one schema for every file (large_string, list item names)
            row0 += batch.num_rows
    table = pa.Table.from_batches(batches, schema=target)
    if table.num_rows == 0:
        raise DataError(f"{label}: no training pairs (zero rows)")
    return PairTable.from_table(table)


def _first(mask: pa.Array) -> int:
    """Index of the first true value of a boolean array (callers know there is one)."""
    return int(pc.index(mask, True).as_py())


def _check_batch(path: Path, batch: pa.RecordBatch, row0: int, num_negatives: int) -> None:
    """Nulls and hard-negative lists of one Parquet batch, checked with Arrow kernels; the error
    names the file, the column and the row index within the file."""
    for name in batch.schema.names:
        column = batch.column(name)
        if name != "negatives":
            if column.null_count:
                raise DataError(f"{path}: null in column {name!r} at row index {row0 + _first(pc.is_null(column))}")
            continue
        # A null list means "no mined negatives for this pair": fine unless negatives are trained on.
        # A null text inside a list is always a bug.
        lengths = pc.list_value_length(column).fill_null(0)
        flat = column.flatten()  # the texts of the non-null lists, in row order
        if flat.null_count:
            ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
            row = int(np.searchsorted(ends, _first(pc.is_null(flat)), side="right"))
            raise DataError(f"{path}: null text inside column 'negatives' at row index {row0 + row}")
        if num_negatives and pc.any(pc.equal(lengths, 0)).as_py():
            raise DataError(
                f"{path}: empty hard-negative list in column 'negatives' at row index "
                f"{row0 + _first(pc.equal(lengths, 0))}, but data.num_hard_negatives={num_negatives} needs at "
                "least one per row"
            )


# --------------------------------------------------------------------------------------------
# Text keys and the bundled sample
# --------------------------------------------------------------------------------------------


def text_key(text: str) -> int:
    """Stable signed 64-bit key of ``text``: blake2b (8-byte digest) of its UTF-8, little endian.

    Equal texts give equal keys in every process and run (unlike ``hash``), so keys can mark
    in-batch candidates whose text equals the positive (false negatives) across workers.
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def text_keys(texts: Sequence[str]) -> torch.Tensor:
    """``torch.LongTensor`` of shape ``(len(texts),)`` holding :func:`text_key` of each text."""
    return torch.tensor([text_key(t) for t in texts], dtype=torch.int64)


def bundled_sample_path() -> Path:
    """Folder of the small real BEIR sample shipped with the package (see its README.md)."""
    return Path(__file__).resolve().parents[1] / "sample" / "debian"


def resolve_data_path(path: str) -> str:
    from samtone_ray.core.config import BUNDLED_SAMPLE

    return str(bundled_sample_path()) if path == BUNDLED_SAMPLE else str(Path(path).resolve())


def load_pairs(cfg):
    """The training pairs of ``cfg`` (``data.train``)."""
    return load_training_pairs(resolve_data_path(cfg.data.train), cfg.data.train_split,
                               num_negatives=cfg.data.num_hard_negatives)


def load_data(cfg):
    """(training pairs, eval split) as the workers will see them. The eval split's corpus is
    bounded here, once, by ``train.eval_max_docs`` (``bound_eval_corpus``), so everything that
    evaluates on it searches the same documents."""
    return load_pairs(cfg), load_eval(cfg)


def load_eval(cfg):
    """The eval split of ``cfg`` (``data.eval``; None without one), its corpus bounded by
    ``train.eval_max_docs``."""
    if not cfg.data.eval:
        return None
    eval_split = bound_eval_corpus(load_beir(resolve_data_path(cfg.data.eval), cfg.data.eval_split),
                                   cfg.train.eval_max_docs)
    log.info("eval corpus: %s", eval_split.corpus_summary())
    return eval_split
