"""samtone encode writing to S3 (the real S3 API of moto's server, tests/servers.py): the objects
hold the oracle's embeddings (DualEncoder.encode_documents), and a run that stopped part-way resumes
against the bucket, encoding only the shards that are missing there, every id exactly once."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from samtone_ray.encode.job import EncodeError, EncodeOptions, run_encode

pytestmark = pytest.mark.ray

WORDS = "debian package kernel mount disk network apt grub sound driver".split()


def _read_s3(s3, prefix: str) -> tuple[list[str], np.ndarray, dict]:
    """Ids and embeddings of every part object, read with boto3 (not through samtone's Store)."""
    client = s3.client()
    ids, blocks = [], []
    for key in sorted(k for k in s3.keys(prefix + "/") if k.rsplit("/", 1)[-1].startswith("part-")):
        table = pq.read_table(io.BytesIO(client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()))
        ids.extend(table.column("id").to_pylist())
        emb = table.column("embedding").combine_chunks()
        blocks.append(np.asarray(emb.values).reshape(-1, emb.type.list_size))
    manifest = json.loads(client.get_object(Bucket=s3.bucket, Key=f"{prefix}/manifest.json")["Body"].read())
    return ids, np.concatenate(blocks), manifest


def test_encode_to_s3_then_resume_holds_every_id_once(ray_cluster, s3_server, tmp_path, tiny_model_dir, monkeypatch):
    from samtone_ray.model.towers import DualEncoder

    monkeypatch.chdir(tmp_path)  # a URI taken for a relative path would show up here as ./s3:
    rng = np.random.default_rng(5)
    docs = [{"_id": f"d{i}", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 20))))} for i in range(14)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    prefix = "encode-s3/docs"
    opts = EncodeOptions(model=str(tiny_model_dir), input=str(corpus), output=f"s3://{s3_server.bucket}/{prefix}/",
                         precision="fp32", batch_size=4, rows_per_file=3, actors=(1, 2))
    assert opts.output == f"s3://{s3_server.bucket}/{prefix}"
    first = run_encode(opts)
    assert (first.rows, first.rows_encoded) == (14, 14) and not Path("s3:").exists()

    ids, emb, manifest = _read_s3(s3_server, prefix)
    expected = DualEncoder.from_pretrained(tiny_model_dir).encode_documents([d["text"] for d in docs]).numpy()
    row = {d["_id"]: i for i, d in enumerate(docs)}
    assert sorted(ids) == sorted(row) and len(ids) == 14
    np.testing.assert_allclose(emb, expected[[row[i] for i in ids]], atol=1e-5)
    assert manifest["status"] == "complete" and len(manifest["files"]) == 5

    # A run killed after committing three of five shards leaves this behind: the manifest still
    # "running", two part objects missing. The same command encodes just those two.
    client = s3_server.client()
    lost = manifest["files"][1:3]
    for name in lost:
        client.delete_object(Bucket=s3_server.bucket, Key=f"{prefix}/{name}")
    client.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/manifest.json",
                      Body=json.dumps(manifest | {"status": "running"}).encode())
    again = run_encode(opts)
    ids, emb, manifest = _read_s3(s3_server, prefix)
    assert again.rows_encoded == 6 and again.rows == 14 and manifest["status"] == "complete"
    assert sorted(ids) == sorted(row) and len(ids) == 14  # every id exactly once
    np.testing.assert_allclose(emb, expected[[row[i] for i in ids]], atol=1e-5)

    # A folder of someone else's objects is refused by its URI, and left as it is.
    client.put_object(Bucket=s3_server.bucket, Key="encode-s3/foreign/notes.txt", Body=b"mine")
    foreign = EncodeOptions(model=str(tiny_model_dir), input=str(corpus), output=f"s3://{s3_server.bucket}/encode-s3/foreign",
                            precision="fp32", overwrite=True)
    with pytest.raises(EncodeError, match=rf"s3://{s3_server.bucket}/encode-s3/foreign is not empty"):
        run_encode(foreign)
    assert s3_server.keys("encode-s3/foreign/") == ["encode-s3/foreign/notes.txt"]
