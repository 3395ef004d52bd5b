"""Shard planning and record checks of samtone encode's input (pure: no Ray)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from samtone_ray.encode.corpus import plan_shards, read_shard
from samtone_ray.data.sources import DataError


def _lines(n: int) -> list[str]:
    return [json.dumps({"_id": f"d{i}", "title": "", "text": f"text {i}" * (i % 4 + 1)}) for i in range(n)]


@pytest.mark.parametrize("n,per,trailing_newline", [(10, 3, True), (9, 3, True), (10, 3, False), (1, 5, True), (7, 1, False)])
def test_jsonl_shards_cover_every_line_once_with_its_line_number(tmp_path, n, per, trailing_newline):
    path = tmp_path / "corpus.jsonl"
    text = "\n".join(_lines(n)) + ("\n" if trailing_newline else "")
    path.write_text(text)
    plan = plan_shards(str(path), per)
    assert [s.rows for s in plan.shards] == [per] * (n // per) + ([n % per] if n % per else [])
    seen = []
    for shard in plan.shards:
        good, rejects = read_shard(shard, "_id", ("title", "text"))
        assert not rejects
        seen += [(where, doc_id) for where, doc_id, _ in good]
    # The oracle: line i (1-based) of the file holds d{i-1}.
    assert seen == [(f"{path}:{i + 1}", f"d{i}") for i in range(n)]
    assert plan.rows == n and len({s.key for s in plan.shards}) == len(plan.shards)


def test_plan_is_deterministic_and_fingerprints_content(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(_lines(8)) + "\n")
    a, b = plan_shards(str(path), 3), plan_shards(str(path), 3)
    assert a.shards == b.shards and a.fingerprint == b.fingerprint
    path.write_text("\n".join(_lines(7) + [json.dumps({"_id": "d7", "text": "changed"})]) + "\n")
    assert plan_shards(str(path), 3).fingerprint != a.fingerprint


def test_parquet_folder_shards_by_row_groups_and_names_rows(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    for name, start in (("a.parquet", 0), ("b.parquet", 5)):
        ids = [f"d{i}" for i in range(start, start + 5)]
        pq.write_table(pa.table({"id": ids, "body": ["x"] * 4 + [""]}), folder / name, row_group_size=2)
    (folder / "_SUCCESS").write_text("")  # ignored, like Spark's markers
    plan = plan_shards(str(folder), 3)  # groups of 2,2,1 rows -> shards of 4 and 1 rows per file
    assert [(s.key, s.rows) for s in plan.shards] == [("00000-00000", 4), ("00000-00001", 1), ("00001-00000", 4), ("00001-00001", 1)]
    good, rejects = read_shard(plan.shards[1], "id", ("body",))
    assert good == [] and [(r.where, r.id) for r in rejects] == [(f"{folder}/a.parquet: row 4", "d4")]
    assert "empty text" in rejects[0].reason
    with pytest.raises(DataError, match="no column 'text'"):
        read_shard(plan.shards[0], "id", ("text",))


def test_bad_records_are_named_by_line_and_reason(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [
        b'{"_id": "a", "text": "ok"}',
        b'{"text": "no id"}',
        b'{"_id": "a", "text": "again"}',
        b'{"_id": "b", "title": "", "text": ""}',
        b'{"_id": "c", "text": "broken',
        b'{"_id": "d", "text": "\xff"}',
        b'["not", "an", "object"]',
        b'{"_id": 7, "text": "integer ids are BEIR-valid"}',
        b'{"_id": "e", "text": 3}',
        b"",
    ]
    path.write_bytes(b"\n".join(rows) + b"\n")
    (shard,) = plan_shards(str(path), 100).shards
    good, rejects = read_shard(shard, "_id", ("title", "text"))
    assert [(w, i) for w, i, _ in good] == [(f"{path}:1", "a"), (f"{path}:8", "7")]
    reasons = {r.where.rsplit(":", 1)[1]: r.reason for r in rejects}
    assert sorted(reasons, key=int) == ["2", "3", "4", "5", "6", "7", "9"]
    assert "no field '_id'" in reasons["2"] and f"duplicate id 'a' (first at {path}:1)" == reasons["3"]
    assert "empty text" in reasons["4"] and "invalid JSON" in reasons["5"]
    assert "UTF-8" in reasons["6"] and "JSON object" in reasons["7"] and "'text' must be a string" in reasons["9"]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="input not found"):
        plan_shards(str(tmp_path / "nope.jsonl"), 10)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="holds no"):
        plan_shards(str(tmp_path), 10)


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(_lines(4)).encode() + b"\n")  # as Windows tools save UTF-8
    good, rejects = read_shard(plan_shards(str(path), 10).shards[0], "_id", ("title", "text"))
    assert not rejects and [doc_id for _, doc_id, _ in good] == ["d0", "d1", "d2", "d3"]
    # Only at the start of the file: further in, the same bytes are a bad record.
    path.write_bytes("\n".join(_lines(2)).encode() + b"\n\xef\xbb\xbf" + _lines(3)[2].encode() + b"\n")
    good, rejects = read_shard(plan_shards(str(path), 10).shards[0], "_id", ("title", "text"))
    assert [r.where for r in rejects] == [f"{path}:3"] and len(good) == 2


def test_credentials_in_an_s3_uri_open_the_file_but_never_show(tmp_path):
    """s3://KEY:SECRET@bucket/... is how pyarrow takes keys inline: they must reach the filesystem
    and nothing else (a reject's place, an error message). A real S3 API (moto) on loopback."""
    import pyarrow.fs as pafs

    from samtone_ray.core.runtime import free_loopback_port

    ThreadedMotoServer = pytest.importorskip("moto.server", reason="needs moto[server] (S3 API)").ThreadedMotoServer

    port = free_loopback_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        uri = f"s3://AKIDEXAMPLE:s3cret-key@corpora/c.jsonl?{query}"
        fs, _ = pafs.FileSystem.from_uri(f"{uri}&allow_bucket_creation=true")
        fs.create_dir("corpora")
        with fs.open_output_stream("corpora/c.jsonl") as f:
            f.write(("\n".join(_lines(2)) + "\nnot json\n").encode())
        good, rejects = read_shard(plan_shards(uri, 10).shards[0], "_id", ("title", "text"))
        assert [doc_id for _, doc_id, _ in good] == ["d0", "d1"]
        assert rejects[0].where.startswith("s3://AKIDEXAMPLE:***@corpora/c.jsonl") and rejects[0].where.endswith(":3")
        with pytest.raises(DataError) as missing:
            plan_shards(uri.replace("c.jsonl", "absent.jsonl"), 10)
        assert "input not found" in str(missing.value) and "s3cret-key" not in str(missing.value)
    finally:
        server.stop()
