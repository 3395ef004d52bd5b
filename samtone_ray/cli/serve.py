"""``samtone serve``: a model on Ray Serve, OpenAI-compatible ``/v1/embeddings`` and ``/search``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from samtone_ray.cli.args import config_args, count_range, load, port, positive_float, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model on Ray Serve: OpenAI-compatible /v1/embeddings and /search")
    config_args(p)
    p.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a model dir "
                   "(default: models:/<registry.model_name>@<registry.alias>)")
    p.add_argument("--index", type=Path, help="a BEIR folder (its corpus is encoded at start) or a samtone index folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8000)
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=positive_int, default=1)
    scale.add_argument("--autoscale", metavar="MIN:MAX", type=count_range("--autoscale", single=False),
                       help="autoscale between MIN and MAX replicas")
    p.add_argument("--gpu", action="store_true", help="one GPU per replica")
    p.add_argument("--num-cpus", type=positive_float, help="CPUs per replica, torch threads follow (default: every core for one "
                   "replica on a local cluster started here, else 1)")
    p.add_argument("--print-config", action="store_true", help="print the `serve deploy` YAML and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from samtone_ray.core.choices import check_precision
    from samtone_ray.core.redact import redact_uri
    from samtone_ray.core.runtime import starts_local_cluster
    from samtone_ray.serve.app import (
        default_num_cpus,
        deployment_options,
        run_blocking,
        serve_config,
    )
    from samtone_ray.serve.replica import IndexSource
    from samtone_ray.tracking import runs as tracking
    from samtone_ray.tracking.model_uri import alias_uri, resolve_model

    cfg = load(args)
    try:  # before any Ray start: int8 kernels are CPU-only
        check_precision(cfg.serve.precision, prefix="serve.", gpu=args.gpu)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tracking_uri = tracking.tracking_uri(cfg.tracking.uri)
    model = args.model or alias_uri(cfg.registry.model_name, cfg.registry.alias)
    local = starts_local_cluster()
    # --print-config writes a cluster's deployment, whatever this machine would start.
    num_cpus = args.num_cpus or default_num_cpus(args.replicas if not args.autoscale else None, local and not args.print_config)
    options = deployment_options(args.replicas, args.autoscale, args.gpu, num_cpus, cfg.serve)
    app_args = {"model": model, "tracking_uri": tracking_uri, "index": str(args.index) if args.index else None,
                "device": "cuda" if args.gpu else "cpu"}
    if args.print_config:
        # Masked: a password in the tracking URI is not for a file that gets committed and shared.
        print(redact_uri(yaml.safe_dump(serve_config(app_args, options, args.host, args.port), sort_keys=False)), end="")
        return 0
    # A wrong URI or index fails here, with its reason, not inside a replica.
    resolve_model(model, tracking_uri)
    if args.index:
        IndexSource(args.index)
    return run_blocking(app_args, options, args.host, args.port, local)
