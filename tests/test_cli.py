"""The `samtone eval` command end to end, in a subprocess, against an in-test computation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from samtone_ray.data import bundled_sample_path, load_beir
from samtone_ray.evaluation import bm25_run, retrieval_metrics, search_run
from samtone_ray.towers import DualEncoder


def test_eval_json_reports_the_model_and_bm25(tiny_model_dir):
    data = bundled_sample_path()
    proc = subprocess.run(
        [sys.executable, "-m", "samtone_ray.cli", "eval", "--model", str(tiny_model_dir), "--data", str(data),
         "--split", "dev", "--baseline", "bm25", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    split = load_beir(data, "dev")
    assert result["queries"] == len(split.qrels) and result["documents"] == len(split.corpus)
    for key in ("mrr@10", "ndcg@10", "recall@10", "recall@100", "p@1"):
        assert 0.0 <= result[key] <= 1.0

    # Oracle: embed with the model directly, search, score.
    model = DualEncoder.from_pretrained(tiny_model_dir)
    qids, dids = list(split.queries), list(split.corpus)
    run = search_run(qids, model.encode_queries([split.queries[q] for q in qids]), dids,
                     model.encode_documents([split.corpus[d] for d in dids]), k=100)
    expected = retrieval_metrics(run, split.qrels)
    assert result["mrr@10"] == pytest.approx(expected["mrr@10"], abs=1e-6)
    assert result["results"]["bm25"]["mrr@10"] == pytest.approx(
        retrieval_metrics(bm25_run(split.corpus, split.queries, k=100), split.qrels)["mrr@10"], abs=1e-9
    )
    # BM25 is a real baseline on this data, far above a random tiny model.
    assert result["results"]["bm25"]["mrr@10"] > 0.5 > result["mrr@10"]


def test_eval_names_a_missing_data_folder(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "samtone_ray.cli", "eval", "--model", "all-MiniLM-L6-v2", "--data", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "nope" in proc.stderr
