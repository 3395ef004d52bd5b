"""What `samtone submit` uploads of a working directory (pure decisions, then a real tree and zip)."""

from __future__ import annotations

import os
import zipfile

import pytest

from samtone_ray.cluster.upload import plan_upload, skip_reason, write_zip

MB = 1 << 20
LIMIT = 10 * MB

# The working directory of issue 20: every one of these was uploaded.
LEAKED = {
    ".env": 60, ".aws/credentials": 116, ".ssh/id_rsa": 2600, "server.pem": 1700, ".netrc": 40,
    "gcp-credentials.json": 2300, "mlflow.db": 94_208, "model.bin": 12 * MB,
}


def _decide(rel: str, size: int):
    """The decision for a file, its folders decided first (a skipped folder hides its files)."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        why = skip_reason("/".join(parts[:i]), 0, is_dir=True, max_file_bytes=LIMIT)
        if why:
            return why
    return skip_reason(rel, size, is_dir=False, max_file_bytes=LIMIT)


@pytest.mark.parametrize("rel, size", sorted(LEAKED.items()))
def test_none_of_the_issues_secrets_or_large_files_is_uploaded(rel, size):
    why = _decide(rel, size)
    assert why is not None and why[0] in ("secret", "size"), (rel, why)


@pytest.mark.parametrize(
    "rel, kind",
    [(".env.production", "secret"), ("config/prod.env", "secret"), ("keys/tls.key", "secret"), ("id_ed25519.pub", "secret"),
     ("deploy/id_deploy", "secret"), ("home/.git-credentials", "secret"), ("runs/store.sqlite3", "secret"),
     ("mlflow.db-journal", "secret"), ("client_secret.json", "secret"), ("SERVER.PEM", "secret"),
     (".pgpass", "secret"), (".git/config", "ignored"), (".venv/bin/python", "ignored"), ("a/__pycache__/m.pyc", "ignored")],
)
def test_secrets_credentials_and_databases_are_recognised(rel, kind):
    assert _decide(rel, 10)[0] == kind


@pytest.mark.parametrize(
    "rel",
    ["samtone_ray/cli/submit.py", "id_utils.py", "docs/keys.md", "jobs/train_debian.yaml", "data/corpus.jsonl",
     "tokenizer.json", "samtone_ray/core/env.py", "environment.yml", "README.md"],
)
def test_ordinary_project_files_are_uploaded(rel):
    assert _decide(rel, 1000) is None


def test_the_size_limit_is_a_setting():
    assert skip_reason("w.bin", 12 * MB, is_dir=False, max_file_bytes=LIMIT) == ("size", "12.0 MiB")
    assert skip_reason("w.bin", 12 * MB, is_dir=False, max_file_bytes=16 * MB) is None
    assert skip_reason("w.bin", LIMIT, is_dir=False, max_file_bytes=LIMIT) is None  # at the limit: uploaded


def _tree(root, files: dict[str, int | str]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, int):
            with open(path, "wb") as f:
                f.truncate(content)  # sparse: a 12 MB file costs no disk
        else:
            path.write_text(content)


def test_a_real_tree_uploads_only_the_code_and_the_zip_holds_exactly_that(tmp_path):
    root = tmp_path / "work"
    _tree(root, LEAKED | {
        "train.py": "print('hi')\n", "jobs/a.yaml": "train: {lr: 1.0e-4}\n", "data/ignored.jsonl": "{}\n",
        ".gitignore": "data/\n", "sub/.gitignore": "*.tmp\n", "sub/keep.txt": "k", "sub/x.tmp": "t",
        ".git/HEAD": "ref: refs/heads/main\n",
    })
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("not in the working directory")
    os.symlink(outside, root / "link-out.txt")
    os.symlink(root / "train.py", root / "link-in.py")

    plan = plan_upload(root, max_file_mb=10)
    uploaded = [rel for rel, _ in plan.files]
    assert uploaded == [".gitignore", "jobs/a.yaml", "link-in.py", "sub/.gitignore", "sub/keep.txt", "train.py"]
    skipped = {s.path: s.reason for s in plan.skipped}
    assert skipped == {
        ".env": "secret", ".aws/": "secret", ".ssh/": "secret", "server.pem": "secret", ".netrc": "secret",
        "gcp-credentials.json": "secret", "mlflow.db": "secret", "model.bin": "size", "link-out.txt": "link",
    }
    shown = plan.describe()
    assert "6 files to upload" in shown and "model.bin (12.0 MiB)" in shown and ".aws/" in shown and "largest: " in shown
    assert "not in the working directory" not in shown

    with zipfile.ZipFile(write_zip(plan, tmp_path / "up.zip")) as zf:
        assert sorted(zf.namelist()) == uploaded
        assert zf.read("link-in.py") == b"print('hi')\n"


def test_a_limit_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="max_file_mb must be > 0"):
        plan_upload(tmp_path, max_file_mb=0)
