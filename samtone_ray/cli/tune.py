"""``samtone tune``: search negative strategies and hyperparameters on Ray Tune; register the champion."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from samtone_ray.cli.args import config_args, echo, load


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="tune negative strategies etc. with Ray Tune; register the champion")
    config_args(p)
    p.add_argument("--resume", metavar="OUTPUT_DIR", help="resume an interrupted tuning run from its output_dir")
    p.add_argument("--no-baseline", action="store_true", help="skip the zero-shot reference evaluation")
    p.add_argument("--verbose", dest="ray_output", action="store_true",
                   help="show Ray's own output here (Tune's status tables, Ray's logs, the workers' output) instead "
                        "of the progress view; without it that output goes to <output_dir>/ray.log")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from samtone_ray.core.config import from_dict
    from samtone_ray.evaluation.retrieval import DEFAULT_TABLE_KEYS
    from samtone_ray.tracking.model_uri import alias_uri
    from samtone_ray.tune.layout import TuneLayout
    from samtone_ray.tune.leaderboard import format_configurations, format_leaderboard
    from samtone_ray.tune.progress import next_steps
    from samtone_ray.tune.tuner import tune

    if args.resume:
        layout = TuneLayout(Path(args.resume))
        if not layout.saved_state.exists():
            print(f"error: nothing to resume: {layout.state} does not exist", file=sys.stderr)
            return 2
        cfg = from_dict(layout.read_state()["config"])
    else:
        cfg = load(args).with_output_dir()
    verbose = args.ray_output or args.verbose  # Ray's own output here, as it was, rather than in ray.log
    if verbose:
        echo(cfg)  # else the plan says what runs; tune.json keeps the whole config
    outcome = tune(cfg, resume=bool(args.resume), zero_shot=not args.no_baseline, verbose=verbose)
    print(f"\n# leaderboard ({cfg.tune.metric}, {cfg.data.eval} [{cfg.data.eval_split}])")
    print(f"eval corpus: {outcome.eval_corpus}")
    print(format_leaderboard(outcome.leaderboard, cfg.tune.metric))
    if outcome.configurations:
        print(f"\n# by configuration ({cfg.tune.seeds} seeds each; the champion comes from the best mean)")
        print(format_configurations(outcome.configurations, cfg.tune.metric))
    if outcome.zero_shot is not None:
        print(f"zero-shot {cfg.model.name_or_path}: " + ", ".join(f"{k}={outcome.zero_shot[k]:.4f}" for k in DEFAULT_TABLE_KEYS))
    print(f"\nleaderboard: {outcome.output_dir / 'leaderboard.csv'}")
    if outcome.best is not None:
        s = outcome.best["settings"]
        print(f"best: trial {outcome.best['trial']} (same_tower={s['same_tower']}, bidirectional={s['bidirectional']}, "
              f"batch_size={s['batch_size']}) {cfg.tune.metric}={outcome.best['metrics'][cfg.tune.metric]:.4f}")
    if outcome.champion and "error" in outcome.champion:
        print(f"champion: not decided: {outcome.champion['error']}", file=sys.stderr)
        return 1
    if outcome.champion:
        version = outcome.champion["version"] if outcome.champion["promoted"] else outcome.champion["incumbent_version"]
        print(f"champion: {alias_uri(cfg.registry.model_name, cfg.registry.alias)} (version {version})")
    print("\n" + next_steps(cfg, outcome, None if verbose else TuneLayout(outcome.output_dir).ray_log))
    return 0
