"""Secrets inside URIs are masked wherever a URI is shown (pure)."""

from __future__ import annotations

import pytest

from samtone_ray.core.redact import has_credentials, redact_uri, strip_credentials


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("http://user:s3cret@host:5000", "http://user:***@host:5000"),
        ("postgresql://mlflow:s3cret@db.internal/mlflow", "postgresql://mlflow:***@db.internal/mlflow"),
        ("http://user:s3c@ret@host/path", "http://user:***@host/path"),  # an unencoded "@" in the password
        ("https://s3cret@github.com/org/repo", "https://***@github.com/org/repo"),  # a token as the user name
        ("http://host/api?x=1&password=s3cret&y=2", "http://host/api?x=1&password=***&y=2"),
        ("http://host/api?token=s3cret", "http://host/api?token=***"),
        ("s3://b/k?X-Amz-Credential=s3cret&X-Amz-Signature=s3cret", "s3://b/k?X-Amz-Credential=***&X-Amz-Signature=***"),
        ("https://acct.blob.core.windows.net/c?sv=2020&sig=s3cret", "https://acct.blob.core.windows.net/c?sv=2020&sig=***"),
    ],
)
def test_the_secret_is_masked_and_the_rest_kept(uri, shown):
    assert redact_uri(uri) == shown
    assert "s3cret" not in redact_uri(uri) and has_credentials(uri)


@pytest.mark.parametrize(
    "text",
    ["http://10.0.0.5:5000", "sqlite:////tmp/x/mlflow.db", "s3://bucket/key@v2", "models:/m@champion",
     "http://host/search?design=1&q=a", "mail me at a@b.com", "file:///data/corpus.jsonl", ""],
)
def test_text_without_secrets_is_unchanged(text):
    assert redact_uri(text) == text and not has_credentials(text)


def test_every_uri_in_a_longer_text_is_masked():
    line = "python -m samtone_ray.cli train --set tracking.uri=http://u:s3cret@h:5000 --set data.train=https://x:s3cret@d/b"
    assert redact_uri(line) == (
        "python -m samtone_ray.cli train --set tracking.uri=http://u:***@h:5000 --set data.train=https://x:***@d/b"
    )


@pytest.mark.parametrize(
    "uri, sent",
    [
        ("http://user:s3cret@host:5000", "http://host:5000"),
        ("http://host:5000/a?x=1&password=s3cret&y=2", "http://host:5000/a?x=1&y=2"),
        ("http://host/a?token=s3cret", "http://host/a"),
        ("http://host/a?y=1&token=s3cret", "http://host/a?y=1"),
        ("http://10.0.0.5:5000", "http://10.0.0.5:5000"),
    ],
)
def test_stripping_leaves_a_uri_without_any_credential(uri, sent):
    assert strip_credentials(uri) == sent and not has_credentials(sent)
