"""Ray Tune search over training settings, one Ray Train run per trial, MLflow parent/child runs.

Ray 2.60 (Train V2) supports Tune over Train only through a *function* trainable that builds a
``TorchTrainer`` with ``TuneReportCallback``; each trial does exactly that, so a trial is a full
distributed training run, with its own workers and resources.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samtone_ray.config import CombinationError, Config, from_dict
from samtone_ray.files import atomic_write_json, atomic_write_text
from samtone_ray.search_space import Space, overrides_of, parse_space

log = logging.getLogger(__name__)

STATE_FILE = "search.json"
LEADERBOARD_CSV = "leaderboard.csv"
LEADERBOARD_PNG = "leaderboard.png"
RUN_ID_FILE = "mlflow_run_id"


def run_trial(params: dict[str, Any], *, base: dict, refs: dict, search: dict) -> None:
    """The Tune function trainable: resolve this trial's config, then one Ray Train run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from samtone_ray import tracking
    from samtone_ray.training import build_trainer

    trial_id = tune.get_context().get_trial_id()
    try:
        cfg = from_dict(base).with_overrides(overrides_of(params))
    except CombinationError as exc:
        # Only reachable with random/optuna sampling: grid combinations are filtered up front.
        log.warning("trial %s skipped: %s", trial_id, exc)
        tune.report({"skipped": str(exc)})
        return
    trial_dir = Path(search["dir"]) / "trials" / trial_id
    run_id = None
    uri = search.get("tracking_uri")
    run_file = trial_dir / RUN_ID_FILE
    if uri and run_file.exists():
        # A trial restarted by `tune --resume` continues its run, as Ray Train continues its
        # checkpoint, so a trial is one MLflow run however often it was interrupted.
        run_id = run_file.read_text().strip()
        tracking.client(uri).update_run(run_id, status="RUNNING")
    elif uri:
        run_id = tracking.start_run(
            uri,
            cfg.tracking.experiment,
            trial_id,
            cfg.flat(),
            parent_run_id=search["parent_run_id"],
            tags={"samtone.kind": "trial", "samtone.trial_id": trial_id},
        )
        atomic_write_text(run_file, run_id)
    trainer = build_trainer(
        cfg,
        pairs_ref=refs["pairs"],
        eval_ref=refs["eval"],
        output_dir=trial_dir,
        storage_path=trial_dir / "ray",
        name="train",
        run_id=run_id,
        tracking_uri=uri,
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()
    # Only success is marked here. A failed or ASHA-stopped trial's run is closed by tune() from
    # the leaderboard: an ASHA stop interrupts fit() as if it failed, and a status written from
    # this actor as it is torn down could land after tune()'s and overwrite KILLED with FAILED.
    if run_id:
        tracking.RunLogger(uri, run_id).finish("FINISHED")


def max_concurrent(cfg: Config, resources: dict[str, float]) -> int:
    """How many trials fit the cluster at once, each needing its full worker group."""
    if cfg.search.max_concurrent_trials != "auto":
        return int(cfg.search.max_concurrent_trials)
    s = cfg.scaling
    # Less one CPU: each trial's driver holds a sliver (0.01) of a CPU beside its workers.
    fits = [(resources.get("CPU", 0) - 1) // (s.num_workers * s.cpus_per_worker)]
    if s.use_gpu:
        fits.append(resources.get("GPU", 0) // s.num_workers)
    return max(1, int(min(fits)))


@dataclass
class SearchOutcome:
    leaderboard: list[dict[str, Any]]
    best: dict[str, Any] | None
    champion: dict[str, Any] | None
    parent_run_id: str | None
    output_dir: Path
    zero_shot: dict[str, float] | None = None


def tune(cfg: Config, *, resume: bool = False, data=None, zero_shot: bool = False) -> SearchOutcome:
    """Run (or resume) a search; returns the leaderboard, the best trial and the champion decision.

    ``zero_shot`` also scores the untrained base model on the eval data, as a reference row.
    """
    import ray
    from ray import tune as rtune

    from samtone_ray import tracking
    from samtone_ray.leaderboard import build_leaderboard, write_leaderboard
    from samtone_ray.metrics import search_callback
    from samtone_ray.registry import promote_best
    from samtone_ray.data import load_data
    from samtone_ray.evaluation import evaluate_model as evaluate
    from samtone_ray.runtime import connect_ray
    from samtone_ray.training import build_model

    cfg = cfg.with_output_dir()
    space = parse_space(cfg.search.space, cfg)  # fail before anything starts; logs skipped combinations
    out = Path(cfg.output_dir).resolve()
    state_path = out / STATE_FILE
    if resume:
        if not state_path.exists():
            raise FileNotFoundError(f"nothing to resume: {state_path} does not exist")
        state = json.loads(state_path.read_text())
    else:
        if state_path.exists():
            raise FileExistsError(
                f"{out} already holds a search; resume it with `samtone tune --resume {out}` "
                "or choose another output_dir"
            )
        state = {"config": cfg.to_dict(), "parent_run_id": None, "started": time.time()}

    connect_ray()
    pairs, eval_split = data or load_data(cfg)
    uri = tracking.tracking_uri(cfg.tracking.uri) if cfg.tracking.enabled else None
    if uri and not state["parent_run_id"]:
        state["parent_run_id"] = tracking.start_run(
            uri, cfg.tracking.experiment, f"{cfg.name}-search", _search_params(cfg, space), tags={"samtone.kind": "search"}
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state_path, state)
    baseline = None
    if zero_shot:
        print("evaluating the base model zero-shot ...", flush=True)
        baseline = evaluate(build_model(cfg), eval_split, cfg.train.eval_batch_size, cfg.train.precision)
        if uri:
            tracking.RunLogger(uri, state["parent_run_id"]).log_metrics(
                {f"zero_shot/{k}": v for k, v in baseline.items()}, step=0
            )

    trainable = rtune.with_resources(
        rtune.with_parameters(
            run_trial,
            base=cfg.to_dict(),
            refs={"pairs": ray.put(pairs), "eval": ray.put(eval_split)},
            search={"dir": str(out), "tracking_uri": uri, "parent_run_id": state["parent_run_id"]},
        ),
        # The trial function only drives a TorchTrainer, whose workers hold the real resources.
        {"CPU": 0.01},
    )
    tune_dir = out / "tune"
    started = time.time()
    if resume and rtune.Tuner.can_restore(str(tune_dir)):
        tuner = rtune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=True, resume_unfinished=True)
    else:
        tuner = rtune.Tuner(
            trainable,
            param_space=space.tune_space(cfg.search.algorithm),
            tune_config=_tune_config(cfg),
            run_config=rtune.RunConfig(
                name="tune", storage_path=str(out), verbose=1,
                callbacks=[search_callback(cfg.name, cfg.search.metric, cfg.search.mode, out / "trials")],
            ),
        )
    results = tuner.fit()
    board = build_leaderboard(results, cfg, space)
    parent = tracking.RunLogger(uri, state["parent_run_id"]) if uri else None
    if parent:
        _close_trial_runs(uri, board)
    write_leaderboard(board, out, cfg.search.metric)
    best = _best(board, cfg)
    champion = None
    if best is not None and uri:
        champion = promote_best(cfg, uri, best, eval_split)
    if parent:
        parent.log_artifact(out / LEADERBOARD_CSV)
        parent.log_artifact(out / LEADERBOARD_PNG)
        summary = {"search_seconds": time.time() - started, "trials": len(board)}
        if best is not None:
            summary[f"best_{cfg.search.metric}"] = best["metrics"][cfg.search.metric]
        if champion:
            summary |= {k: v for k, v in champion.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            parent.set_tags({"champion.promoted": champion["promoted"], "champion.version": champion["version"]})
        parent.log_metrics(summary, step=0)
        parent.finish("FINISHED")
    return SearchOutcome(board, best, champion, state["parent_run_id"], out, baseline)


def _tune_config(cfg: Config):
    import ray
    from ray import tune as rtune
    from ray.tune.schedulers import ASHAScheduler

    s = cfg.search
    scheduler = None
    if s.scheduler == "asha":
        # time_attr counts reports; only evaluations carry the metric, and ASHA ignores the rest.
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=10_000, grace_period=s.grace_period, reduction_factor=2)
    search_alg = None
    if s.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=cfg.train.seed)
    return rtune.TuneConfig(
        metric=s.metric,
        mode=s.mode,
        num_samples=s.num_samples,
        search_alg=search_alg,
        scheduler=scheduler,
        max_concurrent_trials=max_concurrent(cfg, ray.cluster_resources()),
        trial_dirname_creator=_trial_dirname,
    )


def _trial_dirname(trial) -> str:
    # Tune's own names embed the parameters; the bare id names the trial's results even for a
    # trial that failed before its first report (whose metrics carry no trial_id).
    return trial.trial_id


def _best(board: list[dict[str, Any]], cfg: Config) -> dict[str, Any] | None:
    """The best trial that trained to the end (early-stopped trials have no final model)."""
    metric = cfg.search.metric
    finished = [r for r in board if r["status"] == "finished" and not math.isnan(r["metrics"].get(metric, math.nan))]
    if not finished:
        return None
    sign = 1 if cfg.search.mode == "max" else -1
    return max(finished, key=lambda r: sign * r["metrics"][metric])


RUN_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "error": "FAILED"}


def _close_trial_runs(uri: str, board: list[dict[str, Any]]) -> None:
    """Final MLflow status per trial as the leaderboard sees it: an ASHA stop interrupts the
    trial's ``fit()`` mid-way, which looks like a failure from inside the trial."""
    from samtone_ray import tracking

    c = tracking.client(uri)
    for row in board:
        if row.get("run_id") and row["status"] in RUN_STATUS:
            c.set_tag(row["run_id"], "samtone.status", row["status"])
            c.set_terminated(row["run_id"], status=RUN_STATUS[row["status"]])


def _search_params(cfg: Config, space: Space) -> dict[str, Any]:
    params = {f"search.{k}": v for k, v in cfg.to_dict()["search"].items() if k != "space"}
    params["search.space"] = json.dumps(cfg.search.space)
    params["search.skipped"] = json.dumps([c for c, _ in space.skipped])
    return params | cfg.flat()
