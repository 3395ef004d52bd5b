"""Output locations (samtone_ray/core/storage.py): local paths and URIs told apart, credentials in a
URI refused, and a Store on the real S3 API (moto's server, tests/servers.py) read and written as a
local folder is."""

from __future__ import annotations

from pathlib import Path

import pytest

from samtone_ray.core.runtime import ClusterConfigError, check_cluster
from samtone_ray.core.storage import StorageError, is_uri, join, normalize, open_store


def test_uris_and_local_paths_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_uri("s3://bucket/run") and is_uri("gs://b/x") and is_uri("hdfs://nn:8020/x")
    assert not is_uri("runs/x") and not is_uri("/abs/x") and not is_uri("file:///abs/x") and not is_uri("s3:")
    # The bug this replaces: `s3://bucket/run` resolved as ./s3:/bucket/run.
    assert normalize("s3://bucket/run/") == "s3://bucket/run"
    assert normalize("S3://bucket/run") == "s3://bucket/run"
    assert normalize("runs/x") == str(tmp_path / "runs" / "x")
    assert normalize("file:///abs/x") == "/abs/x"
    assert join("s3://bucket/run", "model", "config.json") == "s3://bucket/run/model/config.json"
    assert join("/abs/run", "model") == "/abs/run/model"


@pytest.mark.parametrize("uri", ["s3://KEY:hunter2x@bucket/run", "s3://bucket/run?access_key=KEY&secret_key=hunter2x"])
def test_a_uri_carrying_credentials_is_refused_without_showing_them(uri):
    with pytest.raises(StorageError, match="carries a credential.*AWS_ACCESS_KEY_ID") as err:
        normalize(uri)
    assert "hunter2x" not in str(err.value)


def test_errors_name_the_uri():
    with pytest.raises(StorageError, match=r"s3://: no bucket"):
        normalize("s3://")
    with pytest.raises(StorageError, match=r"nosuchscheme://x/y: cannot open this storage"):
        open_store("nosuchscheme://x/y")


def test_object_storage_counts_as_shared_on_a_multi_node_cluster():
    check_cluster(3, "http://mlflow:5000", "s3://bucket/run", "")
    with pytest.raises(ClusterConfigError, match="s3://bucket/run"):  # the refusal names object storage as a fix
        check_cluster(3, "http://mlflow:5000", "/tmp/out", "ext4")


@pytest.mark.system
def test_a_store_on_s3_reads_lists_and_deletes_what_it_wrote(s3_server):
    store = open_store(f"s3://{s3_server.bucket}/storage-test/run")
    assert store.remote and not store.exists() and store.names() == []
    store.write_json("manifest.json", {"a": 1})
    store.write_bytes("parts/p-1.bin", b"\x00\x01")
    # Independent oracle: the objects as boto3 lists them.
    assert sorted(s3_server.keys("storage-test/run/")) == ["storage-test/run/manifest.json", "storage-test/run/parts/p-1.bin"]
    assert store.names() == ["manifest.json", "parts"] and store.is_dir("parts") and store.is_file("manifest.json")
    assert store.read_bytes("parts/p-1.bin") == b"\x00\x01" and store.size("parts/p-1.bin") == 2
    with pytest.raises(FileNotFoundError, match="s3://samtone/storage-test/run/nothing"):
        store.read_bytes("nothing")
    store.delete("parts")
    # (pyarrow leaves an empty "storage-test/run/" marker object so that the parent stays listed)
    assert [k for k in s3_server.keys("storage-test/run/") if not k.endswith("/")] == ["storage-test/run/manifest.json"]


@pytest.mark.system
def test_a_missing_bucket_is_an_error_naming_the_uri(s3_server):
    store = open_store("s3://no-such-bucket-here/run")
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-here/run/x: writing failed \(.*bucket"):
        store.write_text("x", "y")


@pytest.mark.system
def test_upload_and_download_keep_a_folder_whole(s3_server, tmp_path):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "a.txt").write_text("a")
    (tmp_path / "src" / "sub" / "b.txt").write_text("b")
    store = open_store(f"s3://{s3_server.bucket}/storage-test/upload")
    store.upload(tmp_path / "src", "model")
    store.download("model", tmp_path / "back")
    assert (tmp_path / "back" / "a.txt").read_text() == "a" and (tmp_path / "back" / "sub" / "b.txt").read_text() == "b"
    assert Path(open_store(tmp_path).url("x")) == tmp_path / "x"
