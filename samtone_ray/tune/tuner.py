"""Tuning: Ray Tune over training settings, one Ray Train run per trial, MLflow parent/child runs.

Ray 2.60 (Train V2) supports Tune over Train only through a *function* trainable that builds a
``TorchTrainer`` with ``TuneReportCallback``; each trial does exactly that, so a trial is a full
distributed training run, with its own workers and resources.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samtone_ray.core.config import CombinationError, Config, ConfigError, from_dict
from samtone_ray.evaluation.retrieval import DEFAULT_K_VALUES, METRIC_NAMES
from samtone_ray.core.files import atomic_write_json, atomic_write_text
from samtone_ray.core.storage import is_uri
from samtone_ray.tune.layout import TUNE_NAME, TuneLayout
from samtone_ray.tune.space import Space, overrides_of, parse_space
from samtone_ray.mining.prepare import mining_setting

log = logging.getLogger(__name__)


def run_trial(params: dict[str, Any], *, base: dict, refs: dict, study: dict) -> None:
    """The Tune function trainable: resolve this trial's config, then one Ray Train run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from samtone_ray.tracking import runs as tracking
    from samtone_ray.train.trainer import build_trainer

    trial_id = tune.get_context().get_trial_id()
    try:
        cfg = from_dict(base).with_overrides(overrides_of(params))
        reason = report_gap(cfg)
    except CombinationError as exc:
        reason = str(exc)
    if reason:
        # Only reachable with sampled (choice, ...) keys: grid combinations are checked up front.
        # Tune refuses a report without the tuned metric, so the skip reports the worst value.
        log.warning("trial %s skipped: %s", trial_id, reason)
        tune.report({study["metric"]: -math.inf if study["mode"] == "max" else math.inf, "skipped": reason})
        return
    # The pairs of this trial's mining setting, mined before the trials (mining.prepare_search).
    setting = mining_setting(cfg)
    pairs_ref = refs["pairs"].get(setting, refs["pairs"].get(""))
    cfg = cfg.with_overrides(refs["mined"].get(setting, {}))
    trial = TuneLayout(Path(study["dir"])).trial(trial_id)
    # Resolved here once; the leaderboard reads this file rather than resolving the trial again.
    atomic_write_json(trial.config, cfg.to_dict())
    uri = study.get("tracking_uri")
    run_id = trial.run_id()
    if uri and run_id:
        # A trial restarted by `tune --resume` continues its run, as Ray Train continues its
        # checkpoint, so a trial is one MLflow run however often it was interrupted.
        tracking.client(uri).update_run(run_id, status="RUNNING")
    elif uri:
        run_id = tracking.start_run(
            uri,
            cfg.tracking.experiment,
            trial_id,
            cfg.flat() | study["eval_params"],  # eval_docs / eval_docs_total: what its metrics searched
            parent_run_id=study["parent_run_id"],
            tags={"samtone.kind": "trial", "samtone.trial_id": trial_id},
        )
        atomic_write_text(trial.run_id_file, run_id)
    trainer = build_trainer(
        cfg,
        pairs_ref=pairs_ref,
        eval_ref=refs["eval"],
        output_dir=trial.dir,
        storage_path=trial.ray_storage,
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


def report_gap(cfg: Config) -> str | None:
    """Why some Tune report of a trial run with ``cfg`` would lack ``tune.metric``, or None.

    Tune rejects such a report before any scheduler sees it, failing the trial. Training reports
    at every evaluation and every checkpoint, so each checkpoint must coincide with an evaluation.
    """
    t, metric = cfg.train, cfg.tune.metric
    produced = [f"{name}@{k}" for name in METRIC_NAMES for k in DEFAULT_K_VALUES]
    if metric not in produced:
        return f"tune.metric={metric!r} is not an evaluation metric; choose one of {', '.join(produced)}"
    if not cfg.data.eval:
        return "data.eval is empty: a tuning run ranks trials by evaluating them, so it needs eval data"
    if t.checkpoint_every > 0 and (not t.eval_every or t.checkpoint_every % t.eval_every):
        return (
            f"train.checkpoint_every={t.checkpoint_every} is not a multiple of train.eval_every={t.eval_every}: "
            f"a checkpoint between evaluations would report no {metric} to Tune"
        )
    return None


def _check_reports(cfg: Config, space: Space) -> None:
    """Drop grid combinations whose reports would lack the metric; fail if nothing is left."""
    if not space.grid:  # sampled draws are checked again by each trial
        reason = report_gap(cfg.with_overrides(space.fixed))
        if reason:
            raise ConfigError(reason)
    valid = []
    for combo in space.grid:
        reason = report_gap(cfg.with_overrides(space.fixed | combo))
        if reason:
            log.warning("skipping %s: %s", combo, reason)
            space.skipped.append((combo, reason))
        else:
            valid.append(combo)
    if space.grid and not valid:
        raise ConfigError("tune.space: no grid combination can report tune.metric: " + space.skipped[-1][1])
    space.grid = valid


def check_tune_config(cfg: Config) -> Space:
    """The checks ``samtone tune`` runs before anything starts (``samtone submit tune`` runs them
    too, on the submitting machine): the search space, and that every trial can report the metric."""
    space = parse_space(cfg.tune.space, cfg)  # logs skipped combinations
    _check_reports(cfg, space)
    return space


def asha_pairs(cfg: Config, space: Space) -> int:
    """ASHA's first milestone, in training pairs: ``tune.grace_period`` times the least common
    multiple of every trial's evaluation interval (``eval_every * batch_size`` pairs).

    ASHA's milestones are this value times powers of 2, so every trial evaluates exactly at every
    milestone it reaches: a batch-256 and a batch-64 trial are compared after the same data.
    """
    values = {}
    for key in ("train.batch_size", "train.eval_every"):
        if key in space.sampled:
            dist, args = space.sampled[key]
            if dist != "choice":
                log.warning("%s is drawn from a range: ASHA compares trials at their first evaluation past "
                            "each milestone, not at exactly equal pairs", key)
                args = [cfg.with_overrides(space.fixed).flat()[key]]
            values[key] = args
        else:
            combos = [cfg.with_overrides(space.fixed | c) for c in space.grid or [{}]]
            values[key] = [c.flat()[key] for c in combos]
    intervals = [b * e for b in values["train.batch_size"] for e in values["train.eval_every"] if e]
    return cfg.tune.grace_period * (math.lcm(*intervals) if intervals else 1)


def max_concurrent(cfg: Config, resources: dict[str, float]) -> int:
    """How many trials fit the cluster at once, each needing its full worker group."""
    if cfg.tune.max_concurrent_trials != "auto":
        return int(cfg.tune.max_concurrent_trials)
    s = cfg.scaling
    # Less one CPU: each trial's driver holds a sliver (0.01) of a CPU beside its workers.
    fits = [(resources.get("CPU", 0) - 1) // (s.num_workers * s.cpus_per_worker)]
    if s.use_gpu:
        fits.append(resources.get("GPU", 0) // s.num_workers)
    return max(1, int(min(fits)))


@dataclass
class TuneOutcome:
    leaderboard: list[dict[str, Any]]
    best: dict[str, Any] | None
    champion: dict[str, Any] | None
    parent_run_id: str | None
    output_dir: Path
    zero_shot: dict[str, float] | None = None
    eval_corpus: str = ""
    """What every evaluation searched (``BeirSplit.corpus_summary``)."""
    configurations: list[dict[str, Any]] | None = None
    """The leaderboard by configuration, over seeds (``tune.seeds`` > 1; ``group_seeds``)."""


def tune(cfg: Config, *, resume: bool = False, data=None, zero_shot: bool = False, verbose: bool = False) -> TuneOutcome:
    """Run (or resume) a tuning run; returns the leaderboard, the best trial and the champion decision.

    ``zero_shot`` also scores the untrained base model on the eval data, as a reference row.
    The terminal shows a plan and the progress; Ray's own output (Tune's tables, Ray's logs, the
    workers' output) goes to ``<output_dir>/ray.log``, or stays on the terminal if ``verbose``.
    """
    from samtone_ray.tune.progress import RayOutput

    cfg = cfg.with_output_dir()
    if is_uri(cfg.output_dir):  # before anything is written: not as a local folder named "s3:"
        raise ConfigError(
            f"output_dir={cfg.output_dir}: a tuning run keeps its state, leaderboard, trial folders and Ray's log "
            "in a folder, and tuning on object storage is not supported yet: use a folder on a file system every "
            "node mounts (train and encode accept s3://)"
        )
    with RayOutput(None if verbose else TuneLayout(Path(cfg.output_dir).resolve()).ray_log) as output:
        return _start(cfg, resume=resume, data=data, zero_shot=zero_shot, output=output)


def _start(cfg: Config, *, resume: bool, data, zero_shot: bool, output) -> TuneOutcome:
    import ray

    from samtone_ray.tracking import runs as tracking
    from samtone_ray.tune.progress import format_plan, planned_trials
    from samtone_ray.data.sources import load_eval, load_pairs
    from samtone_ray.core.runtime import check_ray_cluster, connect_ray
    from samtone_ray.mining.prepare import check_not_sampled, prepare_search

    cfg = cfg.with_output_dir()
    space = check_tune_config(cfg)  # fail before anything starts
    check_not_sampled(set(space.sampled))
    out = Path(cfg.output_dir).resolve()
    layout = TuneLayout(out)
    state_path = layout.saved_state  # tune.json, or an older study's search.json
    if resume:
        if not state_path.exists():
            raise FileNotFoundError(f"nothing to resume: {state_path} does not exist")
        state = layout.read_state()
    else:
        if state_path.exists():
            raise FileExistsError(
                f"{out} already holds a tuning run; resume it with `samtone tune --resume {out}` "
                "or choose another output_dir"
            )
        state = {"config": cfg.to_dict(), "parent_run_id": None, "started": time.time()}

    connect_ray()
    output.connected()  # the workers' output Ray forwards to this driver: to the log too
    if data is None:
        # data.negatives: bm25|dense: each mining setting of the search mined once, for all its trials.
        prepared = prepare_search(cfg, [space.fixed | c for c in space.grid] or [space.fixed], show_progress=True)
        pair_sets = {key: load_pairs(c) for key, c in prepared.items()}
        mined = {key: {"data.train": c.data.train, "data.negatives": c.data.negatives}
                 for key, c in prepared.items() if key}
        eval_split = load_eval(cfg)
    else:
        pair_sets, mined, eval_split = {"": data[0]}, {}, data[1]
    pairs = next(iter(pair_sets.values()))
    if eval_split is None:
        raise ConfigError("a tuning run ranks trials by evaluating them: it needs eval data (data.eval)")
    uri = tracking.tracking_uri(cfg.tracking.uri) if cfg.tracking.enabled else None
    check_ray_cluster(uri, str(out))  # a multi-node cluster cannot share SQLite or a node-local output_dir
    if uri and not state["parent_run_id"]:
        state["parent_run_id"] = tracking.start_run(
            uri, cfg.tracking.experiment, f"{cfg.name}-tune", _tune_params(cfg, space) | eval_split.corpus_params(),
            tags={"samtone.kind": "tune"},
        )
    elif uri:
        tracking.client(uri).update_run(state["parent_run_id"], status="RUNNING")  # resumed
    try:
        print(format_plan(cfg, space, trials=planned_trials(cfg.tune.algorithm, cfg.tune.num_samples, len(space.grid)),
                          concurrent=max_concurrent(cfg, ray.cluster_resources()), pairs=len(pairs),
                          queries=len(eval_split.qrels), corpus=eval_split.corpus_summary(), output_dir=out,
                          log=output.path, tracking_uri=uri, parent_run_id=state["parent_run_id"], zero_shot=zero_shot,
                          resumed=resume), flush=True)
        return _tune(cfg, space, state, out, uri, (pair_sets, mined, eval_split), resume=resume, zero_shot=zero_shot,
                     output=output)
    except BaseException:
        # No parent run left RUNNING forever: the tuning run's parent says it failed.
        if uri:
            tracking.RunLogger(uri, state["parent_run_id"]).finish("FAILED")
        raise


def _tune(cfg: Config, space: Space, state: dict, out: Path, uri: str | None, data, *, resume: bool,
          zero_shot: bool, output) -> TuneOutcome:
    import ray
    from ray import tune as rtune

    from samtone_ray.tracking import runs as tracking
    from samtone_ray.evaluation.retrieval import bm25_run, retrieval_metrics
    from samtone_ray.evaluation.retrieval import evaluate_model as evaluate
    from samtone_ray.tune.leaderboard import build_leaderboard, group_seeds, write_configurations, write_leaderboard
    from samtone_ray.core.telemetry import tune_callback
    from samtone_ray.data.pairs import PairTable
    from samtone_ray.tracking.registry import PromotionError, promote_best
    from samtone_ray.model.towers import DualEncoder

    pair_sets, mined, eval_split = data
    layout = TuneLayout(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.state, state)
    baseline = bm25 = None
    if zero_shot:
        print("evaluating the base model zero-shot ...", flush=True)
        baseline = evaluate(DualEncoder.from_config(cfg.model), eval_split, cfg.train.eval_batch_size, cfg.train.precision)
        if uri:
            tracking.RunLogger(uri, state["parent_run_id"]).log_metrics(
                {f"zero_shot/{k}": v for k, v in baseline.items()}, step=0
            )
        bm25 = retrieval_metrics(bm25_run(eval_split.corpus, eval_split.queries), eval_split.qrels)

    trainable = rtune.with_resources(
        rtune.with_parameters(
            run_trial,
            base=cfg.to_dict(),
            refs={"pairs": {key: ray.put(PairTable.of(p)) for key, p in pair_sets.items()}, "mined": mined,
                  "eval": ray.put(eval_split)},
            study={"dir": str(out), "tracking_uri": uri, "parent_run_id": state["parent_run_id"],
                   "metric": cfg.tune.metric, "mode": cfg.tune.mode, "eval_params": eval_split.corpus_params()},
        ),
        # The trial function only drives a TorchTrainer, whose workers hold the real resources.
        {"CPU": 0.01},
    )
    tune_dir = layout.tune_dir
    started = time.time()
    # The progress view (none with --verbose: Tune's tables are the progress). A restored tuning
    # run uses the callbacks Tune saved with it: their progress callback feeds this view.
    progress = output.track(layout, cfg.tune.metric, cfg.tune.mode, hide=tuple(space.fixed))
    if resume and rtune.Tuner.can_restore(str(tune_dir)):
        tuner = rtune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=True, resume_unfinished=True)
    else:
        tuner = rtune.Tuner(
            trainable,
            param_space=space.tune_space(cfg.tune.algorithm),
            tune_config=_tune_config(cfg, space),
            run_config=rtune.RunConfig(
                name=TUNE_NAME, storage_path=str(out), verbose=1,
                # verbose=1: Tune's tables, which go to ray.log unless --verbose.
                callbacks=[tune_callback(cfg.name, cfg.tune.metric, cfg.tune.mode, layout), *progress],
            ),
        )
    with output.quiet():
        results = tuner.fit()
    board = build_leaderboard(results, cfg, space)
    parent = tracking.RunLogger(uri, state["parent_run_id"]) if uri else None
    if parent:
        _close_trial_runs(uri, board)
    references = {"zero-shot": baseline, "BM25": bm25} if baseline else {}
    write_leaderboard(board, out, cfg.tune.metric, {k: v[cfg.tune.metric] for k, v in references.items()})
    groups = group_seeds(board, cfg.tune.metric, cfg.tune.mode) if cfg.tune.seeds > 1 else None
    if groups is not None:
        write_configurations(groups, out, cfg.tune.metric)
    if cfg.tune.results_dir:
        from samtone_ray.tune.study import export_trials

        export_trials(board, Path(cfg.tune.results_dir), cfg.tune.metric, [*space.grid_values, *space.sampled],
                      cfg.tune.mode, cfg.tune.reference)
    best = _best(board, cfg, groups)
    champion = None
    if best is not None and uri:
        try:
            champion = promote_best(cfg, uri, best, eval_split)
        except PromotionError as exc:
            # The tuning run's results stand (leaderboard written, trials logged); only the decision
            # is refused, and the run says so.
            log.error("%s", exc)
            print(f"error: {exc}", file=sys.stderr)
            champion = {"promoted": False, "version": None, "error": str(exc)}
    if cfg.tune.analyze:
        from samtone_ray.analysis.report import analyze_tuning

        analyze_tuning(cfg, board, best, eval_split, out / "analysis", uri, state["parent_run_id"])
    if parent:
        parent.log_artifact(layout.leaderboard_csv)
        parent.log_artifact(layout.leaderboard_png)
        summary = {"tune_seconds": time.time() - started, "trials": len(board)}
        if best is not None:
            summary[f"best_{cfg.tune.metric}"] = best["metrics"][cfg.tune.metric]
        if champion:
            summary |= {k: v for k, v in champion.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            parent.set_tags({"champion.promoted": champion["promoted"], "champion.version": champion["version"]})
        parent.log_metrics(summary, step=0)
        if champion and "error" in champion:
            parent.set_tags({"champion.error": champion["error"]})
        parent.finish("FAILED" if champion and "error" in champion else "FINISHED")
    return TuneOutcome(board, best, champion, state["parent_run_id"], out, baseline, eval_split.corpus_summary(), groups)


def _tune_config(cfg: Config, space: Space):
    import ray
    from ray import tune as rtune
    from ray.tune.schedulers import ASHAScheduler

    s = cfg.tune
    scheduler = None
    if s.scheduler == "asha":
        # ASHA's clock is the training pairs seen, not the report count: trials with different
        # batch sizes are compared after the same amount of data (see asha_pairs).
        grace = asha_pairs(cfg, space)
        scheduler = ASHAScheduler(time_attr="pairs", max_t=grace << 20, grace_period=grace, reduction_factor=2)
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


def _best(board: list[dict[str, Any]], cfg: Config, groups: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The best trial that trained to the end (early-stopped trials have no final model); with
    seeds (``groups``), the best such trial of the configuration with the best mean that has one."""
    metric = cfg.tune.metric
    finished = [r for r in board if r["status"] == "finished" and not math.isnan(r["metrics"].get(metric, math.nan))]
    if groups:
        best_group = next((g for g in groups if any(r["trial"] in g["trials"] for r in finished)), None)
        finished = [r for r in finished if best_group and r["trial"] in best_group["trials"]]
    if not finished:
        return None
    sign = 1 if cfg.tune.mode == "max" else -1
    return max(finished, key=lambda r: sign * r["metrics"][metric])


RUN_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "error": "FAILED"}


def _close_trial_runs(uri: str, board: list[dict[str, Any]]) -> None:
    """Final MLflow status per trial as the leaderboard sees it (an ASHA stop interrupts the
    trial's ``fit()`` mid-way, which looks like a failure from inside the trial), and the trial's
    per-query metrics of its latest evaluation as an artifact."""
    from samtone_ray.tracking import runs as tracking

    c = tracking.client(uri)
    for row in board:
        if row.get("run_id") and row.get("per_query_file"):
            c.log_artifact(row["run_id"], str(row["per_query_file"]))  # every evaluation's, per query, by budget
        if row.get("run_id") and row["status"] in RUN_STATUS:
            c.set_tag(row["run_id"], "samtone.status", row["status"])
            c.set_terminated(row["run_id"], status=RUN_STATUS[row["status"]])


def _tune_params(cfg: Config, space: Space) -> dict[str, Any]:
    params = {f"tune.{k}": v for k, v in cfg.to_dict()["tune"].items() if k != "space"}
    params["tune.space"] = json.dumps(cfg.tune.space)
    params["tune.skipped"] = json.dumps([c for c, _ in space.skipped])
    return params | cfg.flat()
