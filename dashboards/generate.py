"""Writes the Grafana dashboards in this folder from the panel lists below (the one source).

    python dashboards/generate.py        # rewrites dashboards/*.json

tests/test_dashboards.py checks the JSON files are current and that every metric they use is listed
in dashboards/README.md; tests/cluster/test_jobs.py runs every expression against a real Prometheus.
Expressions may use Grafana's ``$__rate_interval`` and nothing else from Grafana.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATE = "$__rate_interval"


def panel(title: str, unit: str, *targets: tuple[str, str], gpu: bool = False, description: str = "") -> dict:
    """``targets``: (PromQL, legend). ``gpu``: needs a real GPU to have data (NVML)."""
    return {"title": title, "unit": unit, "targets": list(targets), "gpu": gpu, "description": description}


TRAINING = [
    panel("Loss", "none", ("max by (run) (ray_samtone_train_loss)", "{{run}}"),
          description="Contrastive loss of the last step, mean over workers (rank 0 reports it)."),
    panel("Pairs per second", "none", (f"sum by (run) (rate(ray_samtone_train_pairs_total[{RATE}]))", "{{run}}")),
    panel("Tokens per second", "none", (f"sum by (run) (rate(ray_samtone_train_tokens_total[{RATE}]))", "{{run}}"),
          description="Tokens encoded by all workers (queries, documents and hard negatives; padding excluded)."),
    panel("Data-wait share", "percentunit", (
        f"sum by (run, rank) (rate(ray_samtone_train_data_wait_seconds_total[{RATE}]))"
        f" / sum by (run, rank) (rate(ray_samtone_train_step_seconds_sum[{RATE}]))", "{{run}} rank {{rank}}"),
        description="Share of step time a worker waited for its next tokenised batch (high = input-bound)."),
    panel("Eval MRR@10", "none", ('max by (run) (ray_samtone_train_eval{metric="mrr@10"})', "{{run}}"),
          description="The latest evaluation on data.eval; evaluations happen every train.eval_every steps."),
    panel("Optimizer step", "none", ("max by (run) (ray_samtone_train_step)", "{{run}}")),
    panel("Step time per worker (median)", "s", (
        f"histogram_quantile(0.5, sum by (run, rank, le) (rate(ray_samtone_train_step_seconds_bucket[{RATE}])))",
        "{{run}} rank {{rank}}")),
    panel("GPU utilisation", "percent", ("avg by (instance, GpuIndex) (ray_node_gpus_utilization)", "{{instance}} GPU {{GpuIndex}}"),
          gpu=True),
    panel("GPU memory used", "decmbytes", ("sum by (instance, GpuIndex) (ray_node_gram_used)", "{{instance}} GPU {{GpuIndex}}"),
          gpu=True),
]

TUNING = [
    panel("Trials by state", "none", ("max by (tune, state) (ray_samtone_tune_trials)", "{{tune}} {{state}}"),
          description="running / finished / stopped (early, by ASHA) / error / skipped (invalid combination)."),
    panel("Best metric so far", "none", ("max by (tune, metric) (ray_samtone_tune_best)", "{{tune}} {{metric}}")),
    panel("Eval MRR@10 per trial", "none", ('max by (run) (ray_samtone_train_eval{metric="mrr@10"})', "{{run}}"),
          description="One line per trial (its MLflow run id)."),
    panel("Pairs per second per trial", "none", (f"sum by (run) (rate(ray_samtone_train_pairs_total[{RATE}]))", "{{run}}")),
    panel("Cluster resources in use", "none", ('sum by (Name) (ray_resources{State="USED", Name=~"CPU|GPU"})', "{{Name}}")),
]

SERVING = [
    panel("Requests per second", "reqps", (
        f'sum by (application, route) (rate(ray_serve_num_http_requests_total{{route!~"/-/.*"}}[{RATE}]))',
        "{{application}} {{route}}")),
    panel("Latency p50 / p99", "ms",
          (f'histogram_quantile(0.5, sum by (application, le) (rate(ray_serve_http_request_latency_ms_bucket{{route!~"/-/.*"}}[{RATE}])))', "p50 {{application}}"),
          (f'histogram_quantile(0.99, sum by (application, le) (rate(ray_serve_http_request_latency_ms_bucket{{route!~"/-/.*"}}[{RATE}])))', "p99 {{application}}")),
    panel("Errors by status", "reqps",
          (f"sum by (route, status, code) (rate(ray_samtone_serve_errors_total[{RATE}]))", "{{route}} {{status}} {{code}}"),
          description="Requests refused with a 4xx/5xx by samtone (validation 4xx, overload 429)."),
    panel("Error rate", "percentunit", (
        f'sum(rate(ray_samtone_serve_errors_total[{RATE}])) / sum(rate(ray_serve_num_http_requests_total{{route!~"/-/.*"}}[{RATE}]))',
        "errors / requests")),
    panel("Batch size (texts)", "none",
          (f"sum(rate(ray_samtone_serve_batch_texts_sum[{RATE}])) / sum(rate(ray_samtone_serve_batch_texts_count[{RATE}]))", "mean"),
          (f"histogram_quantile(0.99, sum by (le) (rate(ray_samtone_serve_batch_texts_bucket[{RATE}])))", "p99")),
    panel("Tokens embedded per second", "none", (f"sum by (input_type) (rate(ray_samtone_serve_tokens_total[{RATE}]))", "{{input_type}}")),
    panel("Model version served", "none", ("max by (model_name, role) (ray_samtone_serve_model_version)", "{{model_name}} {{role}}"),
          description="The registry version each role (embeddings, search) serves; it moves when the champion alias moves."),
    panel("Texts waiting", "none", ("sum(ray_samtone_serve_pending_texts)", "pending")),
]

ENCODING = [
    panel("Rows per second", "none",
          ("sum(ray_samtone_encode_rows_per_second)", "samtone"),
          (f"sum by (dataset) (rate(ray_data_output_rows[{RATE}]))", "Ray Data {{dataset}}")),
    panel("Rows done vs total", "none",
          ("sum(ray_samtone_encode_rows_done)", "done"), ("sum(ray_samtone_encode_rows_total)", "total")),
    panel("Failed blocks", "none", ("sum by (output) (ray_samtone_encode_failed_blocks)", "failed (Ray retries them) {{output}}"),
          description="Shards whose embed/write attempt raised, summed over the embed actors (each exports 0 from its start)."),
    panel("Rejected input records", "none", ("sum by (output) (ray_samtone_encode_rejected_records)", "rejected {{output}}"),
          description="Bad input records this run wrote to the rejects file (--on-bad-record skip)."),
]

DASHBOARDS = {
    "samtone-training": ("samtone: training", TRAINING),
    "samtone-tuning": ("samtone: tuning", TUNING),
    "samtone-serving": ("samtone: serving", SERVING),
    "samtone-encoding": ("samtone: re-encoding", ENCODING),
}


def grafana(uid: str, title: str, panels: list[dict]) -> dict:
    out = []
    for i, p in enumerate(panels):
        out.append({
            "id": i + 1,
            "type": "timeseries",
            "title": p["title"],
            "description": p["description"] or None,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": p["unit"]}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [
                {"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
                 "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                for j, (expr, legend) in enumerate(p["targets"])
            ],
            **({"samtoneNeedsGpu": True} if p["gpu"] else {}),
        })
        if out[-1]["description"] is None:
            del out[-1]["description"]
    return {
        "uid": uid,
        "title": title,
        "tags": ["samtone", "ray"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{
            "name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
            "current": {"text": "Prometheus", "value": "prometheus"}, "hide": 0,
        }]},
        "panels": out,
    }


def render() -> dict[str, str]:
    return {f"{uid}.json": json.dumps(grafana(uid, title, panels), indent=2) + "\n" for uid, (title, panels) in DASHBOARDS.items()}


if __name__ == "__main__":
    for name, text in render().items():
        (HERE / name).write_text(text)
        print(f"wrote dashboards/{name}")
