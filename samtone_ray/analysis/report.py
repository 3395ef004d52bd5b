"""`samtone analyze`: load models, encode a bounded sample of a BEIR split, run the analyses of
``analysis.py``, write JSON and overlaid PNGs, and log them to an MLflow run of their own.

Every model sees the same sampled queries and the same searched corpus, so the overlays compare
models on identical inputs. Output (``--out``)::

    analysis.json     settings, then per model label: identity, alignment, uniformity,
                      similarity distributions, top-1 score and gap distributions
    tsne.png          one t-SNE panel per model, queries and documents coloured by tower
    similarities.png  query-query, positive query-document and document-document cosines
                      (one colour per model) and alignment vs uniformity
    top1_gap.png      each query's top-1 score and its gap to the best relevant document
"""

from __future__ import annotations

import io
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samtone_ray.analysis import embedding_space as analysis
from samtone_ray.core.files import atomic_write_bytes, atomic_write_json
from samtone_ray.data.sampling import bound_corpus, sample_ids

log = logging.getLogger(__name__)

ANALYSIS_JSON = "analysis.json"
TSNE_PNG = "tsne.png"
SIMILARITIES_PNG = "similarities.png"
TOP1_PNG = "top1_gap.png"
SIMILARITY_TITLES = {
    "query_query": "query-query",
    "query_document_positive": "query-document (positive pairs)",
    "document_document": "document-document",
}


@dataclass(frozen=True)
class AnalysisSettings:
    """Sample sizes and seeds; the defaults keep the full Debian dev split to a few minutes on 2 CPUs."""

    max_queries: int = 2000
    """Judged queries analysed (a fixed random sample; 0 = all)."""
    max_docs: int = 20000
    """Documents searched for the top-1 statistics: every relevant document of the sampled queries
    plus a fixed random sample of the rest, up to this many in all (0 = the whole corpus)."""
    pair_sample: int = 2000
    """Queries and documents whose distinct pairs give the similarity distributions and uniformity."""
    tsne_per_tower: int = 500
    """Queries and documents in the t-SNE picture (each)."""
    seed: int = 0
    batch_size: int = 128
    precision: str = "auto"
    alpha: float = 2.0
    """Alignment exponent (Wang & Isola)."""
    t: float = 2.0
    """Uniformity temperature (Wang & Isola)."""

    def __post_init__(self) -> None:
        for key in ("max_queries", "max_docs"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0 (0 = all), got {getattr(self, key)}")
        for key in ("pair_sample", "tsne_per_tower", "batch_size"):
            if getattr(self, key) < 2:
                raise ValueError(f"{key} must be >= 2, got {getattr(self, key)}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


@dataclass
class Sample:
    """What every model is asked to encode: sampled queries, the searched corpus, index lists."""

    query_ids: list[str]
    doc_ids: list[str]
    relevant: list[list[int]]  # per query, rows of doc_ids
    pair_docs: list[int]
    tsne_docs: list[int]
    corpus_documents: int


def draw_sample(split, settings: AnalysisSettings) -> Sample:
    """The fixed-seed sample of ``split`` (a BeirSplit) that ``settings`` asks for."""
    from samtone_ray.data.sources import DataError

    rng = np.random.default_rng(settings.seed)
    judged = analysis.positives(split.qrels)
    if not judged:
        raise DataError("the split has no query with a relevant document (qrels relevance > 0)")
    query_ids = sample_ids(list(judged), settings.max_queries, rng)
    required = {did for qid in query_ids for did in judged[qid]}
    doc_ids = bound_corpus(list(split.corpus), required, settings.max_docs, rng)
    row = {did: i for i, did in enumerate(doc_ids)}
    relevant = [[row[did] for did in judged[qid]] for qid in query_ids]
    # The t-SNE shows the pictured queries' own positives (so aligned towers show as pairs side by
    # side), then random documents up to the same count.
    tsne_docs = list(dict.fromkeys(docs[0] for docs in relevant[: settings.tsne_per_tower]))
    chosen = set(tsne_docs)
    tsne_docs += [int(i) for i in rng.permutation(len(doc_ids)) if int(i) not in chosen][: settings.tsne_per_tower - len(tsne_docs)]
    return Sample(
        query_ids=query_ids,
        doc_ids=doc_ids,
        relevant=relevant,
        pair_docs=[int(i) for i in rng.permutation(len(doc_ids))[: settings.pair_sample]],
        tsne_docs=tsne_docs,
        corpus_documents=len(split.corpus),
    )


def encode(model, split, sample: Sample, settings: AnalysisSettings) -> tuple[np.ndarray, np.ndarray]:
    """Query and document embeddings of the sample, encoded like evaluation does."""
    from samtone_ray.core.runtime import autocast, resolve_precision

    precision = resolve_precision(settings.precision, model.device)
    with autocast(model.device, precision):
        q = model.encode_queries([split.queries[qid] for qid in sample.query_ids], batch_size=settings.batch_size)
        d = model.encode_documents([split.corpus[did] for did in sample.doc_ids], batch_size=settings.batch_size)
    return q.numpy(), d.numpy()


def analyze_models(
    models: list[tuple[str, Any, dict[str, Any]]],
    split,
    out_dir: str | Path,
    settings: AnalysisSettings = AnalysisSettings(),
    *,
    data_label: str = "",
    tracking_uri: str | None = None,
    experiment: str = "samtone",
    tune_run_id: str | None = None,
) -> dict[str, Any]:
    """Analyse each ``(label, model directory or DualEncoder, identity)`` on ``split``; write the
    JSON and PNGs into ``out_dir``; with ``tracking_uri``, log them to a new MLflow run tagged
    ``samtone.kind=analyze`` (and ``samtone.tune_run_id`` when a tuning run asked for it; a run of its
    own, not a child, so a tuning run's children stay one per trial). Returns the JSON payload."""
    from samtone_ray.model.towers import DualEncoder

    labels = [label for label, _, _ in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be distinct, got {labels}")
    out = Path(out_dir)
    sample = draw_sample(split, settings)
    print(
        f"analyze: {len(sample.query_ids)} queries, {len(sample.doc_ids)} of {sample.corpus_documents} documents searched",
        flush=True,
    )
    payload: dict[str, Any] = {
        "data": data_label,
        "settings": asdict(settings),
        "corpus_documents": sample.corpus_documents,
        "documents_searched": len(sample.doc_ids),
        "corpus_bounded": len(sample.doc_ids) < sample.corpus_documents,
        "models": {},
    }
    raws: dict[str, dict[str, np.ndarray]] = {}
    for label, model, identity in models:
        started = time.time()
        if not isinstance(model, DualEncoder):
            model = DualEncoder.from_pretrained(model)
            if _cuda_available():
                model = model.cuda()
        q, d = encode(model, split, sample, settings)
        print(f"analyze: {label}: t-SNE and statistics ...", flush=True)
        summary, raws[label] = analysis.analyze_embeddings(
            q,
            d,
            sample.relevant,
            pair_queries=settings.pair_sample,
            pair_docs=sample.pair_docs,
            tsne_queries=settings.tsne_per_tower,
            tsne_docs=sample.tsne_docs,
            seed=settings.seed,
            alpha=settings.alpha,
            t=settings.t,
        )
        payload["models"][label] = {"model": identity} | summary | {"seconds": time.time() - started}
        print(f"analyze: {label}: {format_summary(summary)}", flush=True)

    atomic_write_json(out / ANALYSIS_JSON, payload)
    _write_png(out / TSNE_PNG, plot_tsne(raws))
    _write_png(out / SIMILARITIES_PNG, plot_similarities(raws, payload["models"]))
    _write_png(out / TOP1_PNG, plot_top1(raws, payload["models"]))
    if tracking_uri:
        payload["mlflow_run_id"] = _log_to_mlflow(payload, out, tracking_uri, experiment, tune_run_id)
    return payload


def format_summary(summary: dict[str, Any]) -> str:
    u = summary["uniformity"]
    return (
        f"alignment={summary['alignment']:.4f} uniformity query={u['query']:.4f} document={u['document']:.4f} "
        f"both={u['both']:.4f} top1_mean={summary['top1']['score']['mean']:.4f} "
        f"gap_mean={summary['top1']['gap']['mean']:.4f} top1_relevant={summary['top1']['top1_relevant_fraction']:.4f}"
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# Plots (one colour per model)
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write_png(path: Path, fig) -> None:
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    _pyplot().close(fig)
    atomic_write_bytes(path, png.getvalue())


def _overlay(ax, values_by_label: dict[str, np.ndarray], legend: dict[str, str] | None = None, bins: int = 60) -> None:
    """Step histograms (density) sharing one set of bins, so the shapes compare directly."""
    nonempty = [v for v in values_by_label.values() if v.size]
    if not nonempty:
        return
    lo, hi = min(float(v.min()) for v in nonempty), max(float(v.max()) for v in nonempty)
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-3, bins + 1)
    for i, (label, values) in enumerate(values_by_label.items()):
        ax.hist(values, bins=edges, density=True, histtype="step", linewidth=1.5, color=f"C{i}",
                label=(legend or {}).get(label, label))
    ax.set_ylabel("density")
    ax.legend(fontsize="x-small")


def plot_tsne(raws: dict[str, dict[str, np.ndarray]]):
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(raws), figsize=(5 * len(raws), 5), squeeze=False)
    for ax, (label, raw) in zip(axes[0], raws.items()):
        points, is_query = raw["tsne"], raw["tsne_is_query"]
        ax.scatter(*points[~is_query].T, s=5, alpha=0.5, color="tab:orange", label="document tower")
        ax.scatter(*points[is_query].T, s=5, alpha=0.5, color="tab:blue", label="query tower")
        ax.set_title(label, fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize="x-small", markerscale=3)
    fig.suptitle("t-SNE of query and document embeddings")
    fig.tight_layout()
    return fig


def plot_similarities(raws: dict[str, dict[str, np.ndarray]], summaries: dict[str, dict[str, Any]]):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for ax, (key, title) in zip(axes, SIMILARITY_TITLES.items()):
        means = {label: f"{label} (mean {summaries[label]['similarity'][key]['mean']:.3f})" for label in raws}
        _overlay(ax, {label: raw[key] for label, raw in raws.items()}, means)
        ax.set_title(title)
        ax.set_xlabel("cosine similarity")
    ax = axes[3]
    for i, (label, s) in enumerate(summaries.items()):
        for tower, marker in (("query", "o"), ("document", "s"), ("both", "*")):
            ax.scatter(s["uniformity"][tower], s["alignment"], color=f"C{i}", marker=marker, s=60,
                       label=f"{label}: {tower}")
    ax.set_xlabel("uniformity (log E exp(-2 d²); lower = more uniform)")
    ax.set_ylabel("alignment (E d² of positives; lower = closer)")
    ax.set_title("alignment vs uniformity")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def plot_top1(raws: dict[str, dict[str, np.ndarray]], summaries: dict[str, dict[str, Any]]):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    _overlay(axes[0], {label: raw["top1_score"] for label, raw in raws.items()},
             {label: f"{label} (mean {s['top1']['score']['mean']:.3f})" for label, s in summaries.items()})
    axes[0].set_title("each query's top-1 score")
    axes[0].set_xlabel("cosine similarity")
    _overlay(axes[1], {label: raw["top1_gap"] for label, raw in raws.items()},
             {label: f"{label} (top-1 relevant {s['top1']['top1_relevant_fraction']:.1%})" for label, s in summaries.items()})
    axes[1].set_title("top-1 score minus best relevant score (0 = top-1 relevant)")
    axes[1].set_xlabel("score gap")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------


def slug(label: str) -> str:
    """A label as an MLflow metric-name prefix (letters, digits, ``-``, ``_``, ``.``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "model"


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of one model, for MLflow."""
    out = {"alignment": summary["alignment"]}
    out |= {f"uniformity.{k}": v for k, v in summary["uniformity"].items()}
    out |= {f"similarity.{k}.mean": v["mean"] for k, v in summary["similarity"].items() if v["count"]}
    out |= {"top1.mean": summary["top1"]["score"]["mean"], "gap.mean": summary["top1"]["gap"]["mean"],
            "gap.median": summary["top1"]["gap"]["median"], "top1_relevant_fraction": summary["top1"]["top1_relevant_fraction"]}
    return out


def _log_to_mlflow(payload: dict[str, Any], out: Path, uri: str, experiment: str, tune_run_id: str | None) -> str:
    from samtone_ray.tracking import runs as tracking

    params = {f"analyze.{k}": v for k, v in payload["settings"].items()} | {"analyze.data": payload["data"]}
    params |= {f"analyze.model.{slug(label)}": m["model"].get("uri", "") for label, m in payload["models"].items()}
    tags = {"samtone.kind": "analyze"} | ({"samtone.tune_run_id": tune_run_id} if tune_run_id else {})
    run_id = tracking.start_run(uri, experiment, "analyze", params, tags=tags)
    logger = tracking.RunLogger(uri, run_id)
    try:
        metrics = {f"{slug(label)}.{k}": v for label, m in payload["models"].items() for k, v in summary_metrics(m).items()}
        logger.log_metrics(metrics, step=0)
        for name in (ANALYSIS_JSON, TSNE_PNG, SIMILARITIES_PNG, TOP1_PNG):
            logger.log_artifact(out / name, "analysis")
    except BaseException:
        logger.finish("FAILED")
        raise
    logger.finish("FINISHED")
    return run_id


# --------------------------------------------------------------------------------------------
# Entry points: the CLI command and the end-of-tuning hook
# --------------------------------------------------------------------------------------------


def default_label(resolved) -> str:
    """Registry/run models by their identity; the bundled alias by its name; a trial's ``.../ID/model``
    directory by ``ID/model``, any other directory by its name."""
    if resolved.name or resolved.run_id:
        return resolved.label
    if not Path(resolved.uri).exists():
        return resolved.uri
    path = resolved.path
    return f"{path.parent.name}/{path.name}" if path.name == "model" else path.name


def _strategy(row: dict[str, Any]) -> str:
    return str(row["settings"].get("same_tower"))


def default_reference(board: list[dict[str, Any]], best: dict[str, Any]) -> dict[str, Any] | None:
    """The trial that shows the best one against the other side of the SamToNe question: the best
    finished in-batch (``same_tower: none``) trial, or, when the best is in-batch, the best finished
    same-tower trial. Boards are sorted best first."""
    finished = [r for r in board if r["status"] == "finished" and r.get("model_dir") and r is not best]
    wanted = (lambda r: _strategy(r) != "none") if _strategy(best) == "none" else (lambda r: _strategy(r) == "none")
    return next((r for r in finished if wanted(r)), None)


def analyze_tuning(
    cfg,
    board: list[dict[str, Any]],
    best: dict[str, Any] | None,
    eval_split,
    out_dir: str | Path,
    tracking_uri: str | None = None,
    tune_run_id: str | None = None,
    reference: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """End of ``samtone tune`` (``tune.analyze: true``): analyse the best trial's model beside a
    reference (``reference``, else ``default_reference``, else the zero-shot base model) on the
    tuning run's eval split, into ``out_dir`` and an MLflow run tagged with the tuning run's parent run id."""
    if best is None or not best.get("model_dir"):
        log.warning("tune.analyze: no finished trial to analyse")
        return None
    reference = reference or default_reference(board, best)
    models = []
    for role, row in (("best", best), ("reference", reference)):
        if row is not None:
            label = f"{role} {row['trial']} (same_tower={_strategy(row)})"
            models.append((label, row["model_dir"], {"uri": row["model_dir"], "trial": row["trial"], "run_id": row.get("run_id")}))
    if reference is None:
        from samtone_ray.model.towers import DualEncoder

        # The base model as the tuning run's zero-shot reference row saw it (same lengths and layout).
        models.append((f"zero-shot {cfg.model.name_or_path}", DualEncoder.from_config(cfg.model), {"uri": cfg.model.name_or_path}))
    settings = AnalysisSettings(batch_size=cfg.train.eval_batch_size, precision=cfg.train.precision, seed=cfg.train.seed)
    return analyze_models(models, eval_split, out_dir, settings, data_label=f"{cfg.data.eval}:{cfg.data.eval_split}",
                          tracking_uri=tracking_uri, experiment=cfg.tracking.experiment, tune_run_id=tune_run_id)
