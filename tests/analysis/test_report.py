"""`samtone analyze` end to end (subprocess, real MLflow SQLite store) against an in-test naive
computation, the sample it draws, and the end-of-tuning hook."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from samtone_ray.analysis.report import AnalysisSettings, analyze_tuning, default_reference, draw_sample
from samtone_ray.data.sources import load_beir
from samtone_ray.model.towers import DualEncoder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOPICS = ["apt package manager", "kernel module loading", "grub bootloader", "network interfaces",
          "systemd services", "disk partitions", "printer drivers", "sound cards"]


@pytest.fixture(scope="module")
def tiny_beir(tmp_path_factory):
    """8 judged queries (one with two relevant documents, one judged only non-relevant) over 14 documents."""
    root = tmp_path_factory.mktemp("beir")
    docs = {f"d{i}": f"How to configure {t} on Debian, step {i}." for i, t in enumerate(TOPICS)}
    docs |= {f"x{i}": f"Unrelated note {i} about {TOPICS[(i + 3) % 8]} history." for i in range(6)}
    queries = {f"q{i}": f"{t} problem?" for i, t in enumerate(TOPICS)} | {"q8": "never judged"}
    with open(root / "corpus.jsonl", "w") as f:
        for did, text in docs.items():
            f.write(json.dumps({"_id": did, "title": "", "text": text}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (root / "qrels").mkdir()
    rows = [f"q{i}\td{i}\t1" for i in range(7)] + ["q0\tx3\t2", "q7\td7\t0"]
    (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return root


def naive_analysis(model_dir, split) -> dict[str, float]:
    """Every headline number from plain loops over fp32 embeddings of all judged queries and documents."""
    model = DualEncoder.from_pretrained(model_dir)
    judged = {q: [d for d, r in docs.items() if r > 0] for q, docs in split.qrels.items()}
    judged = {q: docs for q, docs in judged.items() if docs}
    qids, dids = list(judged), list(split.corpus)
    q = dict(zip(qids, model.encode_queries([split.queries[i] for i in qids]).double().tolist()))
    d = dict(zip(dids, model.encode_documents([split.corpus[i] for i in dids]).double().tolist()))

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    def d2(a, b):
        return sum((x - y) ** 2 for x, y in zip(a, b))

    def unif(vectors):
        terms = [math.exp(-2 * d2(vectors[i], vectors[j])) for i in range(len(vectors)) for j in range(i + 1, len(vectors))]
        return math.log(sum(terms) / len(terms))

    def mean_pair_cos(vectors):
        sims = [dot(vectors[i], vectors[j]) for i in range(len(vectors)) for j in range(i + 1, len(vectors))]
        return sum(sims) / len(sims)

    pairs = [(qid, did) for qid in qids for did in judged[qid]]
    top1 = {qid: max(dot(q[qid], d[did]) for did in dids) for qid in qids}
    best_rel = {qid: max(dot(q[qid], d[did]) for did in judged[qid]) for qid in qids}
    argmax = {qid: max(dids, key=lambda did: dot(q[qid], d[did])) for qid in qids}
    return {
        "alignment": sum(d2(q[a], d[b]) for a, b in pairs) / len(pairs),
        "uniformity.query": unif(list(q.values())),
        "uniformity.document": unif(list(d.values())),
        "uniformity.both": unif(list(q.values()) + list(d.values())),
        "qq.mean": mean_pair_cos(list(q.values())),
        "dd.mean": mean_pair_cos(list(d.values())),
        "qd.mean": sum(dot(q[a], d[b]) for a, b in pairs) / len(pairs),
        "top1.mean": sum(top1.values()) / len(qids),
        "gap.mean": sum(top1[i] - best_rel[i] for i in qids) / len(qids),
        "top1_relevant_fraction": sum(argmax[i] in judged[i] for i in qids) / len(qids),
        "queries": len(qids),
        "positive_pairs": len(pairs),
    }


@pytest.mark.system
def test_analyze_cli_two_models_matches_naive_loops_and_logs_to_mlflow(tiny_model_dir, tiny_beir, tmp_path):
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    proc = subprocess.run(
        [sys.executable, "-m", "samtone_ray.cli", "analyze", "--model", str(tiny_model_dir), "--model", "all-MiniLM-L6-v2",
         "--label", "tiny", "--label", "minilm", "--data", str(tiny_beir), "--split", "dev", "--out", str(out),
         "--precision", "fp32", "--max-queries", "0", "--max-docs", "0", "--tsne-per-tower", "10",
         "--tracking-uri", f"sqlite:///{db}"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("tsne.png", "similarities.png", "top1_gap.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    result = json.loads((out / "analysis.json").read_text())
    assert list(result["models"]) == ["tiny", "minilm"]
    assert result["documents_searched"] == result["corpus_documents"] == 14 and not result["corpus_bounded"]
    assert result["settings"]["max_docs"] == 0 and result["settings"]["alpha"] == 2.0 and result["settings"]["t"] == 2.0

    split = load_beir(tiny_beir, "dev")
    for label, model_dir in (("tiny", tiny_model_dir), ("minilm", "all-MiniLM-L6-v2")):
        got, want = result["models"][label], naive_analysis(model_dir, split)
        assert got["counts"]["queries"] == want["queries"] == 7  # q7 has no relevant document
        assert got["counts"]["positive_pairs"] == want["positive_pairs"] == 8
        assert got["counts"]["tsne_queries"] == 7 and got["counts"]["tsne_documents"] == 10
        close = dict(abs=2e-5)
        assert got["alignment"] == pytest.approx(want["alignment"], **close)
        for tower in ("query", "document", "both"):
            assert got["uniformity"][tower] == pytest.approx(want[f"uniformity.{tower}"], **close)
        sim = got["similarity"]
        assert sim["query_query"]["count"] == 21 and sim["document_document"]["count"] == 91
        assert sim["query_query"]["mean"] == pytest.approx(want["qq.mean"], **close)
        assert sim["document_document"]["mean"] == pytest.approx(want["dd.mean"], **close)
        assert sim["query_document_positive"]["mean"] == pytest.approx(want["qd.mean"], **close)
        assert sum(sim["document_document"]["histogram"]["counts"]) == 91
        assert got["top1"]["score"]["mean"] == pytest.approx(want["top1.mean"], **close)
        assert got["top1"]["gap"]["mean"] == pytest.approx(want["gap.mean"], **close)
        assert got["top1"]["top1_relevant_fraction"] == pytest.approx(want["top1_relevant_fraction"])
    # The trained-for-retrieval model is better aligned than a random tiny BERT on these pairs.
    assert result["models"]["minilm"]["top1"]["top1_relevant_fraction"] > 0.5

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`samtone.kind` = 'analyze'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["tiny.alignment"] == pytest.approx(result["models"]["tiny"]["alignment"])
    assert runs[0].data.metrics["minilm.uniformity.both"] == pytest.approx(result["models"]["minilm"]["uniformity"]["both"])
    logged = {f.path for f in client.list_artifacts(runs[0].info.run_id, "analysis")}
    assert logged == {f"analysis/{n}" for n in ("analysis.json", "tsne.png", "similarities.png", "top1_gap.png")}


@pytest.mark.system
def test_analyze_cli_rejects_mismatched_labels_and_unknown_models(tiny_beir, tmp_path, capsys):
    from samtone_ray.cli import main

    base = ["analyze", "--data", str(tiny_beir), "--no-tracking", "--out", str(tmp_path)]
    assert main(base + ["--model", "all-MiniLM-L6-v2", "--label", "a", "--label", "b"]) == 2
    assert "2 --label for 1 --model" in capsys.readouterr().err
    assert main(base + ["--model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(base + ["--model", "all-MiniLM-L6-v2", "--pair-sample", "1"]) == 2
    assert "pair_sample must be >= 2" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written on bad input


def test_draw_sample_bounds_the_corpus_but_keeps_every_relevant_document(tiny_beir):
    split = load_beir(tiny_beir, "dev")
    settings = AnalysisSettings(max_queries=3, max_docs=6, pair_sample=4, tsne_per_tower=5, seed=3)
    sample = draw_sample(split, settings)
    assert len(sample.query_ids) == 3 and len(sample.doc_ids) == 6 and sample.corpus_documents == 14
    for qid, rows in zip(sample.query_ids, sample.relevant):
        assert {sample.doc_ids[r] for r in rows} == {d for d, rel in split.qrels[qid].items() if rel > 0}
    assert len(sample.pair_docs) == 4 and len(set(sample.pair_docs)) == 4
    # The pictured queries' first positives lead the t-SNE documents, then random others.
    firsts = list(dict.fromkeys(rows[0] for rows in sample.relevant))
    assert sample.tsne_docs[: len(firsts)] == firsts and len(set(sample.tsne_docs)) == 5
    assert draw_sample(split, settings) == sample
    assert draw_sample(split, AnalysisSettings(max_docs=0)).doc_ids == list(split.corpus)


def row(trial, same_tower, status="finished", model_dir="m"):
    return {"trial": trial, "settings": {"same_tower": same_tower}, "status": status,
            "model_dir": model_dir if status == "finished" else None, "run_id": None}


def test_default_reference_sets_in_batch_against_same_tower():
    board = [row("t1", "query"), row("t2", "both", "stopped"), row("t3", "none"), row("t4", "none")]
    assert default_reference(board, board[0])["trial"] == "t3"  # best in-batch trial
    board = [row("t3", "none"), row("t2", "both", "stopped"), row("t1", "query")]
    assert default_reference(board, board[0])["trial"] == "t1"  # best finished same-tower trial
    assert default_reference([row("t1", "query")], row("t1", "query")) is None


@pytest.mark.model
def test_analyze_tuning_hook_compares_best_with_reference_or_zero_shot(tiny_model_dir, tiny_beir, tmp_path):
    from samtone_ray.core.config import load_config

    cfg = load_config(None, {"model.name_or_path": str(tiny_model_dir), "tune.analyze": True})
    split = load_beir(tiny_beir, "dev")
    board = [row("t1", "query", model_dir=str(tiny_model_dir)), row("t2", "none", model_dir=str(tiny_model_dir))]
    payload = analyze_tuning(cfg, board, board[0], split, tmp_path / "a")
    assert list(payload["models"]) == ["best t1 (same_tower=query)", "reference t2 (same_tower=none)"]
    # Same weights under both labels: the analyses agree number for number.
    a, b = payload["models"].values()
    assert a["alignment"] == pytest.approx(b["alignment"], abs=1e-6)
    payload = analyze_tuning(cfg, board[:1], board[0], split, tmp_path / "b")
    assert list(payload["models"])[1] == f"zero-shot {tiny_model_dir}"
    assert (tmp_path / "b" / "tsne.png").read_bytes()[:8] == PNG_MAGIC
    assert analyze_tuning(cfg, [], None, split, tmp_path / "c") is None
    assert not np.isnan(a["uniformity"]["both"])


def test_tune_with_tune_analyze_writes_the_analysis_and_its_run(ray_cluster, tiny_model_dir, tiny_beir, tmp_path):
    from mlflow import MlflowClient

    from samtone_ray.core.config import from_dict
    from samtone_ray.tune.tuner import tune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = from_dict({
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(tiny_model_dir), "query_max_length": 16, "doc_max_length": 32},
        "data": {"train": str(tiny_beir), "train_split": "dev", "eval": str(tiny_beir)},
        "train": {"batch_size": 4, "max_steps": 2, "eval_every": 0},
        "scaling": {"num_workers": 1},
        "tracking": {"uri": uri, "experiment": "tests"},
        "tune": {"scheduler": "none", "analyze": True, "space": {"loss.same_tower": {"grid": ["query"]}}},
    })
    outcome = tune(cfg)
    payload = json.loads((outcome.output_dir / "analysis" / "analysis.json").read_text())
    # One finished trial and no in-batch one: it is compared with the zero-shot base model.
    assert list(payload["models"]) == [f"best {outcome.best['trial']} (same_tower=query)", f"zero-shot {tiny_model_dir}"]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id], "tags.`samtone.kind` = 'analyze'")
    assert run.data.tags["samtone.tune_run_id"] == outcome.parent_run_id and run.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in run.data.tags  # the tuning run's children stay one per trial
