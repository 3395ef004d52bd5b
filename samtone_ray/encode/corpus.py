"""A corpus to re-encode -> deterministic shards -> validated ``(id, fields)`` records.

Input is a BEIR ``corpus.jsonl``, any JSON Lines file, a Parquet file, or a folder of them, on
any filesystem pyarrow understands (local paths, ``file://``, ``s3://``, ``gs://``, ...).

A shard is a fixed slice of one file: ``rows_per_shard`` consecutive lines of a JSONL file (a
byte range found by one streaming newline count) or consecutive row groups of a Parquet file
(from its footer alone). The same input and shard size always give the same shards with the same
keys, which is what lets ``samtone encode`` commit one output file per shard and skip committed
shards after a crash.

Records are checked one by one. A bad record (malformed JSON, non-UTF-8 bytes, a missing or
non-string id, duplicate ids inside the shard, no text) becomes a :class:`Reject` whose reason
starts with ``<file>:<line>`` (JSONL) or ``<file>: row <n>`` (Parquet, 0-based), the style of
``data.iter_jsonl``. Duplicates across shards are found afterwards from the written ids.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from samtone_ray.core.redact import redact_uri
from samtone_ray.data.sources import DataError, join_text

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
_SCAN_BLOCK = 8 << 20


@dataclass(frozen=True)
class Shard:
    key: str  # "FFFFF-PPPPP": file index and part; names the output file
    path: str  # the file, as pyarrow's filesystem sees it
    uri: str  # the file, as the user named it (credentials included: it opens the file)
    fmt: str  # "jsonl" | "parquet"
    start: int  # jsonl: first byte; parquet: first row group
    stop: int  # jsonl: end byte; parquet: row group stop
    first_row: int  # jsonl: 1-based line of the first byte; parquet: 0-based row of the first group
    rows: int  # lines (jsonl, blank ones included) or rows (parquet)

    @property
    def label(self) -> str:
        """The file for messages and rejects: ``uri`` without a password or key it may carry."""
        return redact_uri(self.uri)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Reject:
    where: str  # "file:line" or "file: row n"
    reason: str
    id: str | None = None

    @property
    def message(self) -> str:
        return f"{self.where}: {self.reason}"

    def as_dict(self) -> dict:
        return {"where": self.where, "reason": self.reason, "id": self.id}


@dataclass(frozen=True)
class Plan:
    uri: str
    shards: list[Shard]
    fingerprint: str  # sha256 (16 hex) of the files' names and contents (JSONL) or footers (Parquet)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        # A plain relative path: pyarrow wants absolute paths for its local filesystem.
        import os

        return pafs.LocalFileSystem(), os.path.abspath(uri)


def _fmt(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def list_files(uri: str) -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
    """(filesystem, [(path, format)]) of the corpus files at ``uri``, sorted by path."""
    fs, root = _filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{redact_uri(uri)}: input not found")
    if info.type == pafs.FileType.File:
        fmt = _fmt(root)
        if fmt is None:
            raise DataError(f"{redact_uri(uri)}: not a corpus file (expected {JSONL_SUFFIXES + PARQUET_SUFFIXES})")
        return fs, [(root, fmt)]
    found = []
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        name = entry.base_name
        if entry.type != pafs.FileType.File or name.startswith((".", "_")):
            continue
        fmt = _fmt(entry.path)
        if fmt is not None:
            found.append((entry.path, fmt))
    if not found:
        raise DataError(f"{redact_uri(uri)}: folder holds no {JSONL_SUFFIXES + PARQUET_SUFFIXES} files")
    formats = {fmt for _, fmt in found}
    if len(formats) > 1:
        raise DataError(f"{redact_uri(uri)}: folder mixes JSONL and Parquet files; give one kind")
    return fs, sorted(found)


def _display(uri: str, root_fs_path: str, path: str) -> str:
    """The file as the user would write it: the input URI with the file's sub-path."""
    if path == root_fs_path:
        return uri
    return uri.rstrip("/") + path[len(root_fs_path.rstrip("/")) :]


def plan_shards(uri: str, rows_per_shard: int) -> Plan:
    """Cut the corpus at ``uri`` into shards of about ``rows_per_shard`` records (one streaming
    read of each JSONL file, the footer of each Parquet file)."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1; got {rows_per_shard}")
    fs, files = list_files(uri)
    _, root = _filesystem(uri)
    digest = hashlib.sha256()
    shards: list[Shard] = []
    for index, (path, fmt) in enumerate(files):
        display = _display(uri, root, path)
        digest.update(path[len(root) :].encode() + b"\0")
        cut = _plan_jsonl if fmt == "jsonl" else _plan_parquet
        for part, (start, stop, first, rows) in enumerate(cut(fs, path, display, rows_per_shard, digest)):
            shards.append(Shard(f"{index:05d}-{part:05d}", path, display, fmt, start, stop, first, rows))
    return Plan(uri, shards, digest.hexdigest()[:16])


def _plan_jsonl(fs, path: str, display: str, rows_per_shard: int, digest) -> Iterator[tuple[int, int, int, int]]:
    start, first_line, lines, offset = 0, 1, 0, 0
    last_byte = b"\n"
    with fs.open_input_stream(path) as f:
        while block := f.read(_SCAN_BLOCK):
            digest.update(block)
            pos = 0
            while True:
                need = rows_per_shard - lines
                count = block.count(b"\n", pos)
                if count < need:
                    lines += count
                    break
                for _ in range(need):  # only at a shard boundary: find the exact newline
                    pos = block.index(b"\n", pos) + 1
                stop = offset + pos
                yield start, stop, first_line, rows_per_shard
                start, first_line, lines = stop, first_line + rows_per_shard, 0
            offset += len(block)
            last_byte = block[-1:]
    if last_byte != b"\n":
        lines += 1  # a last line without its newline
    if offset > start:
        yield start, offset, first_line, lines


def _plan_parquet(fs, path: str, display: str, rows_per_shard: int, digest) -> Iterator[tuple[int, int, int, int]]:
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{redact_uri(display)}: not a readable Parquet file ({exc})") from None
    digest.update(f"{meta.num_rows}:{meta.num_row_groups}:{meta.schema}".encode())
    start, first_row, rows = 0, 0, 0
    for group in range(meta.num_row_groups):
        n = meta.row_group(group).num_rows
        digest.update(f"{n},".encode())
        rows += n
        if rows >= rows_per_shard:
            yield start, group + 1, first_row, rows
            start, first_row, rows = group + 1, first_row + rows, 0
    if start < meta.num_row_groups and rows:
        yield start, meta.num_row_groups, first_row, rows


# ----------------------------------------------------------------------------- records


def read_shard(
    shard: Shard, id_field: str, text_fields: tuple[str, ...]
) -> tuple[list[tuple[str, str, dict[str, str]]], list[Reject]]:
    """The shard's good records ``[(where, id, {field: text})]`` in input order, and its bad ones."""
    fs, _ = _filesystem(shard.uri) if "://" in shard.uri else (pafs.LocalFileSystem(), None)
    rows = _jsonl_rows(fs, shard, id_field, text_fields) if shard.fmt == "jsonl" else _parquet_rows(fs, shard, id_field, text_fields)
    good: list[tuple[str, str, dict[str, str]]] = []
    rejects: list[Reject] = []
    first_seen: dict[str, str] = {}
    for where, doc_id, fields, problem in rows:
        if problem is None:
            if doc_id in first_seen:
                problem = f"duplicate id {doc_id!r} (first at {first_seen[doc_id]})"
            elif not join_text(fields, text_fields).strip():
                problem = f"empty text (fields {', '.join(text_fields)})"
        if problem is not None:
            rejects.append(Reject(where, problem, doc_id))
            continue
        first_seen[doc_id] = where
        good.append((where, doc_id, fields))
    return good, rejects


Row = tuple[str, "str | None", dict[str, str], "str | None"]  # where, id, fields, problem


def _jsonl_rows(fs, shard: Shard, id_field: str, text_fields: tuple[str, ...]) -> Iterator[Row]:
    with fs.open_input_file(shard.path) as f:
        f.seek(shard.start)
        data = f.read(shard.stop - shard.start)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the shard's final newline
    for offset, raw in enumerate(lines):
        where = f"{shard.label}:{shard.first_row + offset}"
        try:
            # Windows tools start a UTF-8 file with a byte-order mark: not part of the first record.
            line = raw.decode("utf-8-sig" if shard.start == 0 and offset == 0 else "utf-8")
        except UnicodeDecodeError as e:
            yield where, None, {}, f"not valid UTF-8 ({e.reason})"
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield where, None, {}, f"invalid JSON: {e.msg} (column {e.colno})"
            continue
        if not isinstance(record, dict):
            yield where, None, {}, f"expected a JSON object, got {type(record).__name__}"
            continue
        yield _check_record(where, record, id_field, text_fields)


def _check_record(where: str, record: dict, id_field: str, text_fields: tuple[str, ...]) -> Row:
    doc_id = record.get(id_field)
    if doc_id is None:
        return where, None, {}, f"record has no field {id_field!r}" if id_field not in record else f"field {id_field!r} is null"
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)  # BEIR files use both string and integer ids
    if not isinstance(doc_id, str) or not doc_id:
        return where, None, {}, f"field {id_field!r} must be a non-empty string, got {doc_id!r}"
    fields = {}
    for name in text_fields:
        value = record.get(name)
        if value is None:
            value = ""
        if not isinstance(value, str):
            return where, doc_id, {}, f"field {name!r} must be a string, got {type(value).__name__}"
        fields[name] = value
    return where, doc_id, fields, None


def _parquet_rows(fs, shard: Shard, id_field: str, text_fields: tuple[str, ...]) -> Iterator[Row]:
    with fs.open_input_file(shard.path) as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        for column in (id_field, *text_fields):
            if column not in names:
                raise DataError(f"{shard.label}: no column {column!r} (columns: {sorted(names)})")
        kind = pf.schema_arrow.field(id_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)):
            raise DataError(f"{shard.label}: column {id_field!r} must be string or integer, not {kind}")
        for name in text_fields:
            kind = pf.schema_arrow.field(name).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise DataError(f"{shard.label}: column {name!r} must be string, not {kind}")
        table = pf.read_row_groups(range(shard.start, shard.stop), columns=[id_field, *text_fields])
    columns = {name: table.column(name).to_pylist() for name in (id_field, *text_fields)}
    for i in range(table.num_rows):
        record = {name: values[i] for name, values in columns.items()}
        yield _check_record(f"{shard.label}: row {shard.first_row + i}", record, id_field, text_fields)
