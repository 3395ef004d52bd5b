"""samtone encode on a real local Ray cluster and real files: embeddings against
DualEncoder.encode_documents/encode_queries (the oracle), JSONL and Parquet folders, bad input in
both modes, the model-version refusal, and kill-and-resume of the CLI in a subprocess (the driver,
then an embedding actor, killed with SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from procs import cmdline, descendants

from samtone_ray.encode.job import EncodeError, EncodeOptions, part_files, run_encode

REPO = Path(__file__).resolve().parents[2]
WORDS = "debian package kernel mount disk network apt grub sound driver install boot firmware user".split()


def _docs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"_id": f"d{i}", "title": f"T{i}" if i % 3 else "", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40))))}
        for i in range(n)
    ]


def _write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def _read_output(directory: Path) -> tuple[list[str], np.ndarray]:
    ids, blocks = [], []
    for path in part_files(directory):
        table = pq.read_table(path)
        assert table.schema.field("embedding").type == pa.list_(pa.float32(), table.schema.field("embedding").type.list_size)
        ids.extend(table.column("id").to_pylist())
        emb = table.column("embedding").combine_chunks()
        blocks.append(np.asarray(emb.values).reshape(-1, emb.type.list_size))
    return ids, np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)


def _text(d: dict) -> str:
    return f"{d['title']} {d['text']}" if d["title"] else d["text"]


def _opts(model, corpus, out, **kw) -> EncodeOptions:
    return EncodeOptions(model=str(model), input=str(corpus), output=out, precision="fp32", batch_size=4, **kw)


@pytest.fixture(scope="module")
def separate_model_dir(tmp_path_factory, tiny_model_dir):
    """Separate towers with projections: the document tower differs from the query tower."""
    from samtone_ray.model.towers import DualEncoder

    torch.manual_seed(3)
    model = DualEncoder.from_base(tiny_model_dir, tower_mode="separate", projection_dim=16, query_max_length=16, doc_max_length=48)
    with torch.no_grad():
        for p in model.doc_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.save_pretrained(tmp_path_factory.mktemp("separate") / "model")


@pytest.mark.parametrize("layout", ["shared", "separate"])
def test_jsonl_embeddings_equal_encode_documents(ray_cluster, tmp_path, tiny_model_dir, separate_model_dir, layout):
    from samtone_ray.model.towers import DualEncoder

    model_dir = tiny_model_dir if layout == "shared" else separate_model_dir
    docs = _docs(23)
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", docs)
    result = run_encode(_opts(model_dir, corpus, tmp_path / "out", rows_per_file=5))
    assert (result.rows, result.rejected) == (23, 0)
    assert len(part_files(tmp_path / "out")) == 5  # 5 + 5 + 5 + 5 + 3 rows

    ids, emb = _read_output(tmp_path / "out")
    expected = DualEncoder.from_pretrained(model_dir).encode_documents([_text(d) for d in docs]).numpy()
    assert sorted(ids) == sorted(d["_id"] for d in docs) and len(ids) == len(set(ids))
    row = {d["_id"]: i for i, d in enumerate(docs)}
    np.testing.assert_allclose(emb, expected[[row[i] for i in ids]], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    from samtone_ray.tracking.model_uri import fingerprint

    assert manifest["status"] == "complete" and manifest["rows"] == 23 and manifest["tower"] == "document"
    assert manifest["model"]["fingerprint"] == fingerprint(model_dir)
    assert manifest["dim"] == emb.shape[1] and manifest["normalized"] is True
    meta = json.loads(pq.read_schema(part_files(tmp_path / "out")[0]).metadata[b"samtone"])
    assert meta["model"] == manifest["model"] and meta["max_length"] == manifest["max_length"]


def test_int8_pipeline_quantises_in_the_actors(ray_cluster, tmp_path, tiny_model_dir):
    """--precision int8: the actors quantise their copy of the model (the manifest says int8) and
    the embeddings stay near the fp32 oracle without equalling it."""
    from samtone_ray.model.towers import DualEncoder

    # At its init scale (std 0.02) the tiny BERT's layers barely move the residual stream, and int8
    # is then indistinguishable from fp32 (cosine 1 - 1e-7, measured); x20 makes the layers count.
    model = DualEncoder.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(20)
    model_dir = model.save_pretrained(tmp_path / "model")
    docs = _docs(12)
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", docs)
    opts = _opts(model_dir, corpus, tmp_path / "out", rows_per_file=6)
    opts.precision = "int8"
    assert run_encode(opts).rows == 12
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["precision_resolved"] == "int8"
    ids, emb = _read_output(tmp_path / "out")
    fp32 = DualEncoder.from_pretrained(model_dir).encode_documents([_text(d) for d in docs]).numpy()
    cos = (emb * fp32[[int(i[1:]) for i in ids]]).sum(axis=1)
    assert cos.min() > 0.99 and cos.max() < 0.9999, cos  # measured in-process: 0.9989 .. 0.9998


def test_parquet_folder_on_the_query_tower(ray_cluster, tmp_path, separate_model_dir):
    from samtone_ray.model.towers import DualEncoder

    docs = _docs(17, seed=1)
    folder = tmp_path / "parquet"
    folder.mkdir()
    for name, part in (("a.parquet", docs[:9]), ("b.parquet", docs[9:])):
        table = pa.table({"doc_id": [d["_id"] for d in part], "body": [d["text"] for d in part]})
        pq.write_table(table, folder / name, row_group_size=2)
    opts = _opts(separate_model_dir, folder, tmp_path / "out", rows_per_file=4, tower="query", id_field="doc_id", text_fields=("body",))
    assert run_encode(opts).rows == 17
    ids, emb = _read_output(tmp_path / "out")
    expected = DualEncoder.from_pretrained(separate_model_dir).encode_queries([d["text"] for d in docs]).numpy()
    row = {d["_id"]: i for i, d in enumerate(docs)}
    assert sorted(ids) == sorted(row)
    np.testing.assert_allclose(emb, expected[[row[i] for i in ids]], atol=1e-5)


BAD = [
    # (line content, reason fragment); each goes at line 5 of a 6-line file, in the second shard.
    # Every reason a record can be rejected for is checked without Ray in test_corpus.py; through
    # the pipeline, one field-level and one byte-level defect show the error/skip flow.
    ('{"title": "", "text": "no id here"}', "no field '_id'"),
    (b'{"_id": "u", "text": "caf\xe9"}', "not valid UTF-8"),
]


def _bad_corpus(path: Path, bad) -> Path:
    good = [json.dumps(d).encode() for d in _docs(5)]
    lines = good[:4] + [bad if isinstance(bad, bytes) else bad.encode()] + good[4:]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("bad,reason", BAD, ids=["missing-id", "non-utf8"])
def test_bad_record_errors_with_file_and_line_then_skip_keeps_committed(ray_cluster, tmp_path, tiny_model_dir, bad, reason):
    corpus = _bad_corpus(tmp_path / "corpus.jsonl", bad)
    out = tmp_path / "out"
    with pytest.raises(EncodeError) as info:
        run_encode(_opts(tiny_model_dir, corpus, out, rows_per_file=3))  # lines 1-3 (shard 0) are good
    assert f"{corpus}:5: " in str(info.value) and reason in str(info.value)
    first = out / "part-00000-00000.parquet"
    assert not (out / "part-00000-00001.parquet").exists()
    before = (first.stat().st_ino, first.stat().st_mtime_ns) if first.exists() else None

    result = run_encode(_opts(tiny_model_dir, corpus, out, rows_per_file=3, on_bad_record="skip"))
    assert (result.rows, result.rejected) == (5, 1)
    if before is not None:  # committed before the error: neither lost nor rewritten
        assert (first.stat().st_ino, first.stat().st_mtime_ns) == before
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["where"] == f"{corpus}:5" and reason in rejects[0]["reason"]
    ids, _ = _read_output(out)
    assert sorted(ids) == sorted(d["_id"] for d in _docs(5))


def test_duplicate_across_shards(ray_cluster, tmp_path, tiny_model_dir):
    docs = _docs(6)
    docs.append({"_id": "d1", "title": "", "text": "a later d1"})  # line 7, in the third shard
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", docs)
    with pytest.raises(EncodeError, match=rf"{corpus}:7: duplicate id 'd1' \(first at {corpus}:2\)"):
        run_encode(_opts(tiny_model_dir, corpus, tmp_path / "out", rows_per_file=3))
    result = run_encode(_opts(tiny_model_dir, corpus, tmp_path / "out", rows_per_file=3, on_bad_record="skip"))
    assert (result.rows, result.rejected) == (6, 1)
    ids, emb = _read_output(tmp_path / "out")
    assert sorted(ids) == sorted(d["_id"] for d in docs[:6])
    from samtone_ray.model.towers import DualEncoder

    d1 = DualEncoder.from_pretrained(tiny_model_dir).encode_documents([_text(docs[1])]).numpy()
    np.testing.assert_allclose(emb[ids.index("d1")], d1[0], atol=1e-5)  # the first d1 is kept


def test_output_of_another_model_version_is_refused(ray_cluster, tmp_path, tiny_model_dir, separate_model_dir):
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", _docs(4))
    out = tmp_path / "out"
    run_encode(_opts(tiny_model_dir, corpus, out))
    with pytest.raises(EncodeError, match="another model version"):
        run_encode(_opts(separate_model_dir, corpus, out))
    result = run_encode(_opts(separate_model_dir, corpus, out, overwrite=True))
    manifest = json.loads((out / "manifest.json").read_text())
    from samtone_ray.tracking.model_uri import fingerprint

    assert result.rows == 4 and manifest["model"]["fingerprint"] == fingerprint(separate_model_dir)


# ------------------------------------------------------------------------------ kill and resume


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _encode_cmd(model, corpus, out) -> list[str]:
    return [sys.executable, "-m", "samtone_ray.cli", "encode", "--model", str(model), "--input", str(corpus),
            "--output", str(out), "--rows-per-file", "2", "--batch-size", "2", "--precision", "fp32",
            "--set", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def kill_corpus(tmp_path_factory):
    docs = _docs(60, seed=7)  # 30 shards of 2: many still pending when the kill lands
    return docs, _write_jsonl(tmp_path_factory.mktemp("kill") / "corpus.jsonl", docs)


@pytest.mark.system
@pytest.mark.parametrize("victim", ["driver", "worker"])
def test_sigkill_then_rerun_holds_every_id_exactly_once(tmp_path, tiny_model_dir, kill_corpus, victim):
    """SIGKILL the CLI's driver (or its embedding actor) once shards start committing; the same
    command then finishes, and the output holds every id once with the oracle's embeddings."""
    from samtone_ray.model.towers import DualEncoder

    docs, corpus = kill_corpus
    out = tmp_path / "out"
    cmd = _encode_cmd(tiny_model_dir, corpus, out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log_path = tmp_path / "first-run.log"  # a file, not a pipe: a full pipe would stall the driver
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    tree: list[int] = []
    killed_at = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            tree = descendants(proc.pid)
            committed = len(part_files(out)) if out.exists() else 0
            if committed >= 2:
                if victim == "driver":
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_at = committed
                    break
                actors = [p for p in tree if "EmbedWriter" in cmdline(p)]  # Ray titles the actor after its class
                if actors:
                    os.kill(actors[0], signal.SIGKILL)
                    killed_at = committed
                    break
            time.sleep(0.05)
        assert killed_at is not None and killed_at < 30, f"no kill while shards were pending ({proc.poll()=})"
        proc.wait(timeout=240)  # the driver is gone, or the run finishes despite the dead actor
        log = log_path.read_text(errors="replace")
    finally:
        _kill_all([proc.pid, *tree])  # whatever of that Ray cluster outlived its driver
        proc.wait()
    if victim == "driver":
        assert json.loads((out / "manifest.json").read_text())["status"] == "running"

    rerun = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:] + log[-2000:]
    ids, emb = _read_output(out)
    expected_ids = [d["_id"] for d in docs]
    assert len(ids) == len(expected_ids) and set(ids) == set(expected_ids)  # all present, none twice
    assert json.loads((out / "manifest.json").read_text())["rows"] == 60
    expected = DualEncoder.from_pretrained(tiny_model_dir).encode_documents([_text(d) for d in docs]).numpy()
    row = {d: i for i, d in enumerate(expected_ids)}
    np.testing.assert_allclose(emb, expected[[row[i] for i in ids]], atol=1e-5)
    assert not list(out.glob(".*tmp*"))  # interrupted writes were cleaned up


# ------------------------------------------------------------------------------ index + serve


@pytest.fixture(scope="module")
def encoded(ray_cluster, tmp_path_factory, tiny_model_dir):
    """A tiny BEIR-style corpus encoded once for the index tests, and the oracle's embeddings."""
    from samtone_ray.model.towers import DualEncoder

    root = tmp_path_factory.mktemp("indexed")
    docs = _docs(60, seed=5)
    corpus = _write_jsonl(root / "beir" / "corpus.jsonl", docs)
    _write_jsonl(root / "beir" / "queries.jsonl", [{"_id": f"q{i}", "text": d["text"][:30]} for i, d in enumerate(docs[:12])])
    run_encode(_opts(tiny_model_dir, corpus, root / "emb", rows_per_file=16))
    model = DualEncoder.from_pretrained(tiny_model_dir)
    return {"root": root, "docs": docs, "model": model, "model_dir": tiny_model_dir,
            "doc_emb": model.encode_documents([_text(d) for d in docs])}


@pytest.mark.parametrize("kind", ["exact", "faiss-hnsw"])
def test_samtone_index_searches_like_the_oracle(encoded, kind, capsys):
    from samtone_ray.cli import main
    from samtone_ray.evaluation.retrieval import exact_search
    from samtone_ray.encode.index import SearchIndex
    from samtone_ray.tracking.model_uri import fingerprint

    root, docs = encoded["root"], encoded["docs"]
    assert main(["index", "--embeddings", str(root / "emb"), "--output", str(root / kind), "--kind", kind]) == 0
    printed = capsys.readouterr().out
    if kind != "exact":
        assert "recall@10 vs exact search on 12 queries from" in printed
    index = SearchIndex.load(root / kind)
    index.check_model(fingerprint(encoded["model_dir"]))
    assert index.kind == kind and sorted(index.ids) == sorted(d["_id"] for d in docs)
    by_id = {d["_id"]: d for d in docs}
    assert all(index.titles[i] == by_id[doc_id]["title"] and index.texts[i] == by_id[doc_id]["text"] for i, doc_id in enumerate(index.ids))
    queries = encoded["model"].encode_queries(["kernel boot firmware", "apt install", "sound driver user"])
    _, want = exact_search(queries, encoded["doc_emb"], 5)
    _, got = index.search(queries, 5)
    assert [[index.ids[r] for r in row] for row in got.tolist()] == [[docs[r]["_id"] for r in row] for row in want.tolist()]


def test_samtone_serve_searches_the_encoded_index(encoded, tiny_model_dir, tmp_path):
    """`samtone serve --index` (helper feature) on an index built by `samtone index`."""
    pytest.importorskip("samtone_ray.serve.app")
    import socket
    import urllib.request

    from samtone_ray.cli import main
    from samtone_ray.evaluation.retrieval import exact_search

    root, docs = encoded["root"], encoded["docs"]
    assert main(["index", "--embeddings", str(root / "emb"), "--output", str(root / "served"), "--kind", "faiss-ivf"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "samtone_ray.cli", "serve", "--model", str(tiny_model_dir), "--index", str(root / "served"),
           "--port", str(port), "--set", "tracking.enabled=false"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
                            stdout=(tmp_path / "serve.log").open("wb"), stderr=subprocess.STDOUT)
    tree: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            tree = descendants(proc.pid)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        query = "kernel boot firmware"
        req = urllib.request.Request(f"http://127.0.0.1:{port}/search", data=json.dumps({"query": query, "top_k": 3}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            body = json.loads(r.read())
        _, want = exact_search(encoded["model"].encode_queries([query]), encoded["doc_emb"], 3)
        assert [h["id"] for h in body["data"][0]["hits"]] == [docs[r]["_id"] for r in want[0].tolist()]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        _kill_all([proc.pid, *tree])
        proc.wait()


def test_cli_prints_figures_and_logs_an_mlflow_run(ray_cluster, tmp_path, tiny_model_dir, capsys):
    from samtone_ray.tracking import runs as tracking
    from samtone_ray.cli import main

    corpus = _write_jsonl(tmp_path / "corpus.jsonl", _docs(6))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["encode", "--model", str(tiny_model_dir), "--input", str(corpus), "--output", str(tmp_path / "out"),
            "--precision", "fp32", "--set", f"tracking.uri={uri}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "encoded 6 rows in" in out and "rows/s" in out and "embed" in out
    c = tracking.client(uri)
    (run,) = c.search_runs([tracking.experiment_id(uri, "samtone")])
    assert run.data.metrics["rows"] == 6 and run.data.params["model"] == str(tiny_model_dir)
    with pytest.raises(SystemExit) as usage:  # a usage error naming the flag, no traceback
        main(argv[:-2] + ["--set", "tracking.enabled=false", "--batch-size", "0"])
    assert usage.value.code == 2
    assert "--batch-size: must be >= 1, got 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------ --overwrite


def _encode_output_by_hand(out: Path) -> dict[str, bytes]:
    """A folder laid out as encode leaves it (its manifest, a part, rejects); returns its files."""
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"format_version": 1, "model": {"fingerprint": "x"}, "tower": "document",
                                                   "input": {"uri": "c.jsonl"}, "status": "complete", "rows": 1}))
    (out / "part-00000-00000.parquet").write_bytes(b"PAR1")
    (out / "rejects.jsonl").write_text("")
    return _files(out)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_refuses_a_folder_that_never_held_encode_output(tmp_path, tiny_model_dir):
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", _docs(4))
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    (home / "thesis.tex").write_text("two years of work")
    (home / "notes" / "todo.txt").write_text("back up")
    (home / "manifest.json").write_text('{"name": "some other tool"}')  # a manifest, not encode's
    before = _files(home)
    with pytest.raises(EncodeError, match=rf"{home} is not empty and holds no samtone encode manifest.json; "
                                          r"refusing to write into .* \(nothing was deleted\)"):
        run_encode(_opts(tiny_model_dir, corpus, home, overwrite=True))
    assert _files(home) == before


def test_overwrite_refuses_encode_output_mixed_with_other_files(tmp_path, tiny_model_dir):
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", _docs(4))
    out = tmp_path / "out"
    _encode_output_by_hand(out)
    (out / "README.md").write_text("my notes about this index")
    before = _files(out)
    with pytest.raises(EncodeError, match=r"holds files samtone encode did not write \(README.md\); --overwrite refusing"):
        run_encode(_opts(tiny_model_dir, corpus, out, overwrite=True))
    assert _files(out) == before


@pytest.mark.parametrize("broken", ["model", "input"])
def test_overwrite_deletes_nothing_when_the_runs_own_checks_fail(tmp_path, tiny_model_dir, broken):
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", _docs(4))
    out = tmp_path / "out"
    before = _encode_output_by_hand(out)
    model = tmp_path / "no-such-model" if broken == "model" else tiny_model_dir
    source = tmp_path / "no-such-corpus.jsonl" if broken == "input" else corpus
    with pytest.raises(ValueError, match="no-such-"):  # ModelURIError, DataError: both ValueErrors
        run_encode(_opts(model, source, out, overwrite=True))
    assert _files(out) == before
