"""``samtone encode``: re-encode a corpus with a model on Ray Data, resumable and exactly once.

Pipeline, one Ray Data row per input shard (``corpus.plan_shards``)::

    shards -> read + check + tokenise (CPU tasks, length-sorted chunks of --batch-size)
           -> embed + write (actor pool: DualEncoder.embed_documents / embed_queries, the forward
              pass evaluation and serving run; one Parquet file per shard, committed atomically)
           -> the driver collects per-shard summaries

Output folder::

    manifest.json              model, tower, dim, max length, input fingerprint, status, row count
    part-FFFFF-PPPPP.parquet   id (string), embedding (fixed_size_list<float32>[dim], L2-normalised)
    _rejects/<shard>.jsonl     bad records of a shard (--on-bad-record skip), committed before it
    rejects.jsonl              all of them, in input order, at the end

The output is a local folder or object storage (``s3://bucket/prefix``, ``core/storage.py``; the
nodes' AWS_* environment reaches it), so actors on any node of a cluster write to the same place.

Crash safety: a shard's output appears only whole (a local file by a rename of a complete temp file,
an object by one upload that becomes visible when complete), so after a
kill (driver or worker) the same command re-plans the same shards, skips those already committed
and encodes the rest; every id ends up exactly once with the embedding an uninterrupted run gives
(each shard is tokenised and batched the same way every time). Ray Data's own checkpointing is not
used: it cannot report a bad record's file and line, nor keep one file per input slice.

A folder written with another model (fingerprint), tower, input or settings is refused unless
``--overwrite``, so one index never mixes two model versions. ``--overwrite`` clears only encode's
own output (a folder holding its manifest and nothing else), and only once the model has loaded and
the input has been planned; any other non-empty folder is refused untouched.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from samtone_ray.encode.corpus import Plan, Reject, Shard, plan_shards, read_shard
from samtone_ray.data.sources import DataError, join_text
from samtone_ray.core.storage import Store, normalize, open_store
from samtone_ray.core.choices import check_precision
from samtone_ray.core.redact import redact_uri

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
REJECTS_DIR = "_rejects"
FORMAT_VERSION = 1
SCHEMA_KEY = b"samtone"
TOWERS = ("document", "query")
# Estimated bytes per output row besides the embedding (id string, offsets, page overhead).
_ROW_OVERHEAD_BYTES = 32


class EncodeError(DataError):
    """An encode run that cannot proceed; the message says why and what to do."""


@dataclass
class EncodeOptions:
    model: str
    input: str
    output: str | Path  # a local folder or a URI (s3://bucket/prefix); normalised to a str
    tower: str = "document"
    batch_size: int = 64
    actors: tuple[int, int] = (1, 1)  # (min, max) actor pool size
    cpus_per_actor: float = 1.0
    gpu: bool = False
    precision: str = "auto"
    id_field: str = "_id"
    text_fields: tuple[str, ...] = ("title", "text")
    on_bad_record: str = "error"  # "error" | "skip"
    overwrite: bool = False
    rows_per_file: int | None = None  # None: from file_mb, else 10_000
    file_mb: float | None = None
    tracking_uri: str | None = None

    def __post_init__(self) -> None:
        self.output = normalize(self.output)
        if self.tower not in TOWERS:
            raise ValueError(f"tower must be one of {TOWERS}; got {self.tower!r}")
        if self.on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip'; got {self.on_bad_record!r}")
        check_precision(self.precision, gpu=self.gpu)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        lo, hi = self.actors
        if lo < 1 or hi < lo:
            raise ValueError(f"actors must be N or MIN:MAX with 1 <= MIN <= MAX; got {lo}:{hi}")
        if self.rows_per_file is not None and self.rows_per_file < 1:
            raise ValueError(f"rows_per_file must be >= 1; got {self.rows_per_file}")
        if not self.text_fields:
            raise ValueError("text_fields must name at least one field")


@dataclass
class EncodeResult:
    output: str
    rows: int  # rows in the output
    rows_encoded: int  # rows encoded by this run (the rest were committed before)
    rejected: int
    wall_s: float
    timings: dict[str, float] = field(default_factory=dict)  # summed seconds per stage
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows_encoded / self.wall_s if self.wall_s > 0 else 0.0


def part_name(key: str) -> str:
    return f"part-{key}.parquet"


def part_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("part-*.parquet"))


def _part_names(output: Store) -> list[str]:
    return [n for n in output.names() if fnmatch.fnmatchcase(n, "part-*.parquet")]


def read_manifest(directory: str | Path | Store) -> dict[str, Any] | None:
    store = directory if isinstance(directory, Store) else open_store(directory)
    if not store.is_file(MANIFEST):
        return None
    try:
        return json.loads(store.read_text(MANIFEST))
    except json.JSONDecodeError as exc:
        # samtone writes its manifest atomically: a broken one is someone else's file.
        raise EncodeError(f"{store.url(MANIFEST)}: not valid JSON ({exc}), so not a samtone encode manifest") from None


def _is_encode_manifest(manifest: Any) -> bool:
    return isinstance(manifest, dict) and {"format_version", "model", "tower", "input"} <= set(manifest)


def _written_by_encode(name: str) -> bool:
    """Whether ``name`` (an entry of an output folder) is one samtone encode writes there."""
    return (name in (MANIFEST, REJECTS, REJECTS_DIR) or fnmatch.fnmatchcase(name, "part-*.parquet")
            or fnmatch.fnmatchcase(name, ".*.tmp-*"))


# ------------------------------------------------------------------------------ metrics


class _Metrics:
    """``samtone_encode_*`` metrics (dashboards/README.md); Ray exports them with a ``ray_`` prefix."""

    def __init__(self, tags: dict[str, str]) -> None:
        from ray.util.metrics import Gauge

        keys = tuple(tags)
        self.tags = tags
        self.rows_per_second = Gauge("samtone_encode_rows_per_second", "rows encoded per second by this run", keys)
        self.rows_done = Gauge("samtone_encode_rows_done", "rows committed to the output so far", keys)
        self.rows_total = Gauge("samtone_encode_rows_total", "rows in the input (lines or Parquet rows)", keys)
        self.rejected = Gauge("samtone_encode_rejected_records", "bad input records written to rejects by this run", keys)

    def update(self, done: int, total: int, rate: float, rejected: int) -> None:
        self.rows_done.set(done, self.tags)
        self.rows_total.set(total, self.tags)
        self.rows_per_second.set(rate, self.tags)
        self.rejected.set(rejected, self.tags)


class _FailedBlocks:
    """A gauge per embed actor (EmbedWriter runs only in Ray Data's actor pool), exported at 0 from
    its start: a dashboard then shows "0 failed" rather than "no data" (a Ray counter only exists
    once incremented, and never by 0)."""

    def __init__(self, output: str) -> None:
        import ray
        from ray.util.metrics import Gauge

        self.count = 0
        self.tags = {"output": output, "actor": ray.get_runtime_context().get_actor_id()}
        self.gauge = Gauge(
            "samtone_encode_failed_blocks", "shards whose embed/write attempt raised in this actor (Ray retries them)",
            tuple(self.tags),
        )
        self.gauge.set(0, self.tags)

    def inc(self) -> None:
        self.count += 1
        self.gauge.set(self.count, self.tags)


# ------------------------------------------------------------------------------ stages


def tokenize_shards(
    batch: dict[str, np.ndarray],
    *,
    tokenizer,
    max_length: int,
    chunk_size: int,
    id_field: str,
    text_fields: tuple[str, ...],
    on_bad_record: str,
) -> dict[str, np.ndarray]:
    """Read, check and tokenise each shard of ``batch`` (CPU task)."""
    from samtone_ray.model.tokenization import tokenize_chunks

    out: dict[str, list] = {"key": [], "payload": [], "error": [], "rejects": [], "t_read": [], "t_tokenize": []}
    for spec in batch["shard"]:
        shard = Shard(**json.loads(spec))
        t0 = time.perf_counter()
        error, payload, rejects = "", b"", []
        try:
            good, rejects = read_shard(shard, id_field, text_fields)
        except DataError as exc:  # the whole file is unusable (e.g. a missing Parquet column)
            error, good = str(exc), []
        if rejects and on_bad_record == "error":
            error = rejects[0].message + " (pass --on-bad-record skip to write bad records to rejects.jsonl)"
        t1 = time.perf_counter()
        if not error:
            texts = [join_text(fields, text_fields) for _, _, fields in good]
            chunks = tokenize_chunks(tokenizer, texts, max_length, chunk_size)
            # Handed to the embed actors only: pickle keeps TokenChunks' tensors as they are.
            payload = pickle.dumps(([doc_id for _, doc_id, _ in good], chunks), protocol=5)
        out["key"].append(shard.key)
        out["payload"].append(payload)
        out["error"].append(error)
        out["rejects"].append(json.dumps([r.as_dict() for r in rejects]))
        out["t_read"].append(t1 - t0)
        out["t_tokenize"].append(time.perf_counter() - t1)
    return {k: np.array(v, dtype=object) if k in ("payload",) else np.array(v) for k, v in out.items()}


class EmbedWriter:
    """Actor: embed each tokenised shard with the model's tower and commit its Parquet file."""

    def __init__(self, model, tower: str, precision: str, gpu: bool, cpus: float, output: str, schema_meta: str) -> None:
        import torch

        from samtone_ray.core.runtime import prepare_inference

        if not gpu:
            torch.set_num_threads(max(1, int(cpus)))
        self.device = torch.device("cuda" if gpu else "cpu")
        self.model = model.to(self.device).eval()
        self.precision = prepare_inference(self.model, precision)  # int8: quantised here, once per actor
        self.embed = self.model.embed_queries if tower == "query" else self.model.embed_documents
        self.output = open_store(output)
        self.schema_meta = schema_meta
        self.failed = _FailedBlocks(_label(self.output))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self._run(batch)
        except Exception:
            self.failed.inc()
            raise

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from samtone_ray.core.runtime import autocast

        rows, t_embed, t_write, precisions = [], [], [], []
        for key, payload, error, rejects in zip(batch["key"], batch["payload"], batch["error"], batch["rejects"]):
            n, te, tw = 0, 0.0, 0.0
            if not error:
                ids, chunks = pickle.loads(payload)
                t0 = time.perf_counter()
                with torch.no_grad(), autocast(self.device, self.precision):
                    emb = self.embed(chunks).float().cpu().numpy()
                t1 = time.perf_counter()
                self._commit(str(key), ids, emb, json.loads(rejects))
                te, tw, n = t1 - t0, time.perf_counter() - t1, len(ids)
            rows.append(n)
            t_embed.append(te)
            t_write.append(tw)
            precisions.append(self.precision)
        keep = ("key", "error", "rejects", "t_read", "t_tokenize")
        return {k: batch[k] for k in keep} | {
            "rows": np.array(rows),
            "t_embed": np.array(t_embed),
            "t_write": np.array(t_write),
            "precision": np.array(precisions),
        }

    def _commit(self, key: str, ids: list[str], emb: np.ndarray, rejects: list[dict]) -> None:
        if rejects:  # before the part file: a committed shard always has its rejects stored
            self.output.write_text(f"{REJECTS_DIR}/{key}.jsonl", "".join(json.dumps(r) + "\n" for r in rejects))
        self.output.write_bytes(part_name(key), embeddings_parquet(ids, emb, self.schema_meta))


def embedding_array(emb: np.ndarray) -> pa.FixedSizeListArray:
    """An ``[n, dim]`` matrix as the ``embedding`` column (fixed_size_list<float32>[dim])."""
    flat = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])


def embedding_matrix(column: pa.ChunkedArray | pa.FixedSizeListArray) -> np.ndarray:
    """The ``embedding`` column back as a float32 ``[n, dim]`` matrix."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(len(column), column.type.list_size)


def embeddings_parquet(ids: list[str], emb: np.ndarray, schema_meta: str) -> bytes:
    """A Parquet file of ``id`` and ``embedding`` (fixed_size_list<float32>[dim]) as bytes."""
    table = pa.table({"id": pa.array(ids, pa.string()), "embedding": embedding_array(emb)})
    table = table.replace_schema_metadata({SCHEMA_KEY: schema_meta.encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


# ------------------------------------------------------------------------------ driver


def _identity(opts: EncodeOptions, resolved, plan: Plan, dim: int, max_length: int, rows_per_file: int) -> dict[str, Any]:
    """What must match for a run to continue an existing output folder."""
    return {
        "format_version": FORMAT_VERSION,
        "model": resolved.as_dict(),
        "tower": opts.tower,
        "dim": dim,
        "max_length": max_length,
        "normalized": True,
        "precision": opts.precision,
        "input": {
            # Stored in the manifest and MLflow: without a key or password the URI may carry.
            "uri": redact_uri(opts.input) if "://" in opts.input else os.path.abspath(opts.input),
            "fingerprint": plan.fingerprint,
            "id_field": opts.id_field,
            "text_fields": list(opts.text_fields),
        },
        "rows_per_file": rows_per_file,
        "shards": len(plan.shards),
    }


def _label(output: Store) -> str:
    """The output's last path component: the metrics' ``output`` tag."""
    return output.location.rstrip("/").rsplit("/", 1)[-1]


def _check_existing(output: Store, identity: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The existing manifest when this run continues it; None when the folder is new, empty, or
    encode output that ``overwrite`` may clear. Anything else is refused and left as it is."""
    if not output.exists():
        return None
    if not output.is_dir():
        raise EncodeError(f"{output.location} exists and is not a folder")
    entries = output.names()
    if not entries:
        return None
    refused = f"refusing to write into {output.location} (nothing was deleted): choose a new or empty folder"
    old = read_manifest(output)
    if not _is_encode_manifest(old):
        raise EncodeError(f"{output.location} is not empty and holds no samtone encode {MANIFEST}; {refused}")
    if overwrite:
        foreign = [name for name in entries if not _written_by_encode(name)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise EncodeError(f"{output.location} holds files samtone encode did not write ({shown}); --overwrite {refused}")
        return None
    old_model, new_model = old.get("model") or {}, identity["model"]
    if old_model.get("fingerprint") != new_model["fingerprint"]:
        raise EncodeError(
            f"{output.location} was written by another model version: {_model_label(old_model)}, "
            f"not {_model_label(new_model)}; pass --overwrite to re-encode it with this model"
        )
    diffs = [
        f"{key}: {old.get(key)!r} -> {value!r}"
        for key, value in identity.items()
        if key != "model" and old.get(key) != value
    ]
    if diffs:
        raise EncodeError(
            f"{output.location} was written with other settings ({'; '.join(diffs)}); "
            "rerun with the same settings to resume, or pass --overwrite to start over"
        )
    return old


def _model_label(model: dict[str, Any]) -> str:
    label = model.get("uri") or "?"
    if model.get("version"):
        label += f" (version {model['version']})"
    return f"{label} [fingerprint {model.get('fingerprint')}]"


def _clear(output: Store) -> None:
    """Remove a previous run's output for --overwrite: only what encode writes (the folder itself
    stays, so a mount point works)."""
    for name in output.names():
        if _written_by_encode(name):
            output.delete(name)


def _remove_stale_temps(output: Store) -> None:
    """Temp files of local writes a kill interrupted: never committed, safe to drop (an object
    store has none: an interrupted upload never becomes an object)."""
    stale = [n for n in output.names() if fnmatch.fnmatchcase(n, ".part-*.tmp-*") or fnmatch.fnmatchcase(n, f".{MANIFEST}.tmp-*")]
    stale += [f"{REJECTS_DIR}/{n}" for n in output.names(REJECTS_DIR) if fnmatch.fnmatchcase(n, ".*.tmp-*")]
    for name in stale:
        output.delete(name)


def _committed_rows(output: Store, name: str) -> int:
    return pq.ParquetFile(output.open_input(name)).metadata.num_rows


def run_encode(opts: EncodeOptions) -> EncodeResult:
    """Encode ``opts.input`` into ``opts.output`` (see the module docstring)."""
    import ray

    from samtone_ray.tracking.model_uri import resolve_model
    from samtone_ray.core.runtime import connect_ray
    from samtone_ray.model.towers import DualEncoder

    start = time.perf_counter()
    resolved = resolve_model(opts.model, opts.tracking_uri)
    model = DualEncoder.from_pretrained(resolved.path)
    max_length = model.query_max_length if opts.tower == "query" else model.doc_max_length
    dim = model.embedding_dim
    rows_per_file = opts.rows_per_file or (
        max(1, int(opts.file_mb * (1 << 20) / (dim * 4 + _ROW_OVERHEAD_BYTES))) if opts.file_mb else 10_000
    )
    plan = plan_shards(opts.input, rows_per_file)
    if not plan.shards:
        raise EncodeError(f"{redact_uri(opts.input)}: no records to encode")
    identity = _identity(opts, resolved, plan, dim, max_length, rows_per_file)
    output = open_store(opts.output)
    old = _check_existing(output, identity, opts.overwrite)
    if old is None and output.exists():
        _clear(output)
    output.makedirs()
    _remove_stale_temps(output)
    if old is not None and old.get("status") == "complete":
        print(f"{output.location}: already complete ({old['rows']} rows by {_model_label(old['model'])})")
        return EncodeResult(output.location, old["rows"], 0, old.get("rejected", 0), 0.0, manifest=old)
    output.write_json(MANIFEST, identity | {"status": "running"})

    committed = set(_part_names(output))  # one listing, not a request per shard
    pending = [s for s in plan.shards if part_name(s.key) not in committed]
    done = sum(_committed_rows(output, part_name(s.key)) for s in plan.shards if s not in pending)
    if done:
        print(f"resuming: {len(plan.shards) - len(pending)} of {len(plan.shards)} shards ({done} rows) already committed")

    schema_meta = json.dumps({k: identity[k] for k in ("model", "tower", "dim", "max_length", "normalized")})
    # Wall seconds of the driver's own phases, and worker seconds (summed) per pipeline stage.
    timings = {"setup": time.perf_counter() - start, "read": 0.0, "tokenize": 0.0, "embed": 0.0, "write": 0.0}
    encoded, rejected, precision = 0, 0, None
    if pending:
        connect_ray()
        metrics = _Metrics({"output": _label(output)})
        metrics.update(done, plan.rows, 0.0, 0)
        lo, hi = opts.actors
        ds = ray.data.from_items(
            [{"shard": json.dumps(s.as_dict())} for s in pending], override_num_blocks=len(pending)
        )
        ds = ds.map_batches(
            tokenize_shards,
            batch_size=1,
            fn_kwargs={
                "tokenizer": model.tokenizer,
                "max_length": max_length,
                "chunk_size": opts.batch_size,
                "id_field": opts.id_field,
                "text_fields": tuple(opts.text_fields),
                "on_bad_record": opts.on_bad_record,
            },
            # Not the actors' CPU share, so Ray Data does not fuse this stage into the actors:
            # tokenising runs on CPU tasks beside the forward pass instead of before it.
            num_cpus=0.5,
        )
        ds = ds.map_batches(
            EmbedWriter,
            batch_size=1,
            fn_constructor_kwargs={
                "model": model,
                "tower": opts.tower,
                "precision": opts.precision,
                "gpu": opts.gpu,
                "cpus": opts.cpus_per_actor,
                "output": output.location,
                "schema_meta": schema_meta,
            },
            # Two shards in flight per actor: the next one is fetched while one runs.
            compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi, max_tasks_in_flight_per_actor=2),
            num_gpus=1 if opts.gpu else 0,
            num_cpus=opts.cpus_per_actor,
        )
        t_run = time.perf_counter()
        for row in ds.iter_rows():
            if row["error"]:
                raise EncodeError(str(row["error"]))  # leaving the loop stops the dataset
            n = int(row["rows"])
            encoded += n
            done += n
            bad = len(json.loads(row["rejects"]))
            rejected += bad
            precision = str(row["precision"])
            for stage in ("read", "tokenize", "embed", "write"):
                timings[stage] += float(row[f"t_{stage}"])
            metrics.update(done, plan.rows, encoded / max(time.perf_counter() - t_run, 1e-9), rejected)

    timings["pipeline"] = time.perf_counter() - start - timings["setup"]
    _remove_stale_temps(output)  # a worker killed mid-write leaves one even when Ray retried it
    rejected += _dedupe_across_shards(output, plan, opts)
    rejects = _merge_rejects(output, plan)
    parts = _part_names(output)
    rows = sum(_committed_rows(output, name) for name in parts)
    wall = time.perf_counter() - start
    manifest = identity | {
        "status": "complete",
        "rows": rows,
        "rejected": len(rejects),
        "input_rows": plan.rows,
        "files": [part_name(s.key) for s in plan.shards if part_name(s.key) in parts],
        "precision_resolved": precision or (old or {}).get("precision_resolved"),
    }
    output.write_json(MANIFEST, manifest)
    return EncodeResult(output.location, rows, encoded, len(rejects), wall, timings, manifest)


def _dedupe_across_shards(output: Store, plan: Plan, opts: EncodeOptions) -> int:
    """Find ids written by two shards; the later one is an error, or (skip) a reject removed
    from its part file by an atomic rewrite. Returns the number of rows removed."""
    first: dict[str, str] = {}
    dupes: dict[str, list[str]] = {}
    parts = set(_part_names(output))
    for shard in plan.shards:
        name = part_name(shard.key)
        if name not in parts:
            continue
        for doc_id in pq.read_table(output.open_input(name), columns=["id"]).column("id").to_pylist():
            if doc_id in first:
                dupes.setdefault(shard.key, []).append(doc_id)
            else:
                first[doc_id] = shard.key
    if not dupes:
        return 0
    shards = {s.key: s for s in plan.shards}

    def where(key: str, doc_id: str) -> str:
        good, _ = read_shard(shards[key], opts.id_field, tuple(opts.text_fields))
        return next(w for w, i, _ in good if i == doc_id)

    if opts.on_bad_record == "error":
        key, ids = next(iter(dupes.items()))
        raise EncodeError(
            f"{where(key, ids[0])}: duplicate id {ids[0]!r} (first at {where(first[ids[0]], ids[0])}) "
            "(pass --on-bad-record skip to keep the first and write the others to rejects.jsonl)"
        )
    removed = 0
    for key, ids in dupes.items():
        name = part_name(key)
        reject_name = f"{REJECTS_DIR}/{key}.jsonl"
        entries = [json.loads(line) for line in output.read_text(reject_name).splitlines()] if output.exists(reject_name) else []
        known = {e["where"] for e in entries}
        for doc_id in ids:
            r = Reject(where(key, doc_id), f"duplicate id {doc_id!r} (first at {where(first[doc_id], doc_id)})", doc_id)
            if r.where not in known:
                entries.append(r.as_dict())
        output.write_text(reject_name, "".join(json.dumps(e) + "\n" for e in entries))
        table = pq.read_table(output.open_input(name))
        drop = set(ids)
        keep = pa.array([i not in drop for i in table.column("id").to_pylist()])
        meta = table.schema.metadata[SCHEMA_KEY].decode()
        kept = table.filter(keep)
        emb = embedding_matrix(kept.column("embedding"))
        output.write_bytes(name, embeddings_parquet(kept.column("id").to_pylist(), emb, meta))
        removed += len(ids)
    return removed


def _merge_rejects(output: Store, plan: Plan) -> list[dict]:
    entries = []
    stored = set(output.names(REJECTS_DIR))
    for shard in plan.shards:
        if f"{shard.key}.jsonl" in stored:
            text = output.read_text(f"{REJECTS_DIR}/{shard.key}.jsonl")
            entries.extend(json.loads(line) for line in text.splitlines() if line)
    if entries or output.exists(REJECTS):
        output.write_text(REJECTS, "".join(json.dumps(e) + "\n" for e in entries))
    return entries


def log_to_mlflow(cfg, result: EncodeResult) -> str:
    from samtone_ray.tracking import runs as tracking

    uri = tracking.tracking_uri(cfg.tracking.uri)
    m = result.manifest
    params = {
        "model": m["model"]["uri"],
        "model_version": m["model"].get("version"),
        "model_fingerprint": m["model"]["fingerprint"],
        "input": m["input"]["uri"],
        "tower": m["tower"],
        "dim": m["dim"],
        "max_length": m["max_length"],
        "output": str(result.output),
    }
    run_id = tracking.start_run(uri, cfg.tracking.experiment, "encode", params, tags={"samtone.task": "encode"})
    logger = tracking.RunLogger(uri, run_id)
    logger.log_metrics(
        {"rows": result.rows, "rows_encoded": result.rows_encoded, "rejected": result.rejected,
         "rows_per_s": result.rows_per_s, "wall_s": result.wall_s},
        step=0,
    )
    logger.finish()
    return run_id
