"""Mining fixtures: the tiny random BERT as a sentence-transformers model directory (so that
``DualEncoder`` and ``mine_hard_negatives`` embed the same way), and small BEIR folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from samtone_ray.data.sources import bundled_sample_path

MAX_SEQ_LENGTH = 64  # one length for both towers: sentence-transformers has a single one


@pytest.fixture(scope="session")
def st_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    model.max_seq_length = MAX_SEQ_LENGTH
    path = tmp_path_factory.mktemp("tiny-st")
    model.save(str(path))
    return path


def write_beir(root: Path, corpus: list[dict], queries: list[dict], qrels: list[tuple[str, str, int]],
               split: str = "train") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def sample_copy(tmp_path) -> Path:
    """A copy of the bundled sample that a test may break."""
    return Path(shutil.copytree(bundled_sample_path(), tmp_path / "debian"))


def sample_slice(root: Path, judgements: int, documents: int) -> Path:
    """The first ``judgements`` train judgements of the bundled sample, their queries, and
    ``documents`` documents (theirs first, then the corpus in order), as a BEIR folder."""
    source = bundled_sample_path()
    rows = [line.split("\t") for line in (source / "qrels" / "train.tsv").read_text().splitlines()[1 : judgements + 1]]
    wanted_docs = {d for _, d, _ in rows}
    corpus = [json.loads(line) for line in (source / "corpus.jsonl").read_text().splitlines()]
    corpus = [d for d in corpus if d["_id"] in wanted_docs] + [d for d in corpus if d["_id"] not in wanted_docs]
    wanted_queries = {q for q, _, _ in rows}
    queries = [q for q in map(json.loads, (source / "queries.jsonl").read_text().splitlines()) if q["_id"] in wanted_queries]
    return write_beir(root, corpus[:documents], queries, [(q, d, int(s)) for q, d, s in rows])


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory) -> Path:
    """The sample's texts at a size tests mine in seconds: 300 judgements, 1000 documents."""
    return sample_slice(tmp_path_factory.mktemp("small") / "debian", 300, 1000)


@pytest.fixture(scope="session")
def tiny_sample(tmp_path_factory) -> Path:
    """40 judgements, 150 documents: for tests that mine several times."""
    return sample_slice(tmp_path_factory.mktemp("tiny") / "debian", 40, 150)


@pytest.fixture(scope="session")
def embedding_cache(tmp_path_factory) -> Path:
    """One embedding cache for the dense tests: the sample is encoded once per model."""
    return tmp_path_factory.mktemp("embedding-cache")
