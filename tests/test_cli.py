"""The `samtone eval` command end to end, in a subprocess, against an in-test computation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from samtone_ray.data.sources import bundled_sample_path, load_beir
from samtone_ray.evaluation.retrieval import bm25_run, retrieval_metrics, search_run
from samtone_ray.model.towers import DualEncoder

pytestmark = pytest.mark.system


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
    assert result["documents_total"] == len(split.corpus)  # `samtone eval` searches the whole corpus unless asked
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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--autoscale", "3:1"], "argument --autoscale: needs 0 < MIN <= MAX; got '3:1'"),
        (["serve", "--autoscale", "2"], "argument --autoscale: must be MIN:MAX; got '2'"),
        (["encode", "--model", "m", "--input", "i", "--output", "o", "--actors", "0"], "argument --actors: needs 0 < MIN"),
        (["encode", "--model", "m", "--input", "i", "--output", "o", "--actors", "1:x"], "argument --actors: must be N or MIN:MAX"),
    ],
)
def test_replica_and_actor_counts_are_usage_errors(argv, message, capsys):
    from samtone_ray.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_replica_and_actor_counts_parse():
    from samtone_ray.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "--autoscale", "1:4"]).autoscale == (1, 4)
    base = ["encode", "--model", "m", "--input", "i", "--output", "o"]
    assert parser.parse_args([*base, "--actors", "3"]).actors == (3, 3)
    assert parser.parse_args([*base, "--actors", "2:5"]).actors == (2, 5)
    assert parser.parse_args(base).actors == (1, 1)
