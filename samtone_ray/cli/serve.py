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
    p.add_argument("--print-config", action="store_true", help="print the `serve deploy` YAML and exit (its replicas "
                   "read their keys from $SAMTONE_API_KEY, set from a secret; no key is ever written into it)")
    auth = p.add_argument_group("who may call it (docs/serving.md#api-keys)")
    auth.add_argument("--api-key", action="append", default=[], metavar="KEY",
                      help="a key clients send as 'Authorization: Bearer KEY'; repeatable. Also: $SAMTONE_API_KEY, "
                      "--api-key-file (a key on the command line shows in `ps`)")
    auth.add_argument("--api-key-file", type=Path, metavar="PATH", help="a file of keys, one a line")
    auth.add_argument("--allow-unauthenticated", action="store_true",
                      help="serve a non-loopback --host without a key (and --print-config without a key reference)")
    auth.add_argument("--trusted-host", action="append", default=[], metavar="HOST",
                      help="a Host header value to accept (repeatable; *.example.com for subdomains, * for any); "
                      "localhost, 127.0.0.1, ::1 and --host are always accepted (any Host for 0.0.0.0 without --trusted-host)")
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
    from samtone_ray.serve.auth import KEY_ENV, KeyError_, collect_keys, digest, is_loopback, trusted_hosts
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
    access: dict = {"trusted_hosts": trusted_hosts(args.host, args.trusted_host)}
    if args.print_config:
        if args.api_key or args.api_key_file:
            print(f"error: --print-config writes no key: its replicas read ${KEY_ENV}, which the cluster sets from a "
                  "secret (docs/serving.md#api-keys); drop --api-key/--api-key-file", file=sys.stderr)
            return 2
        if not args.allow_unauthenticated:
            access["api_key_env"] = KEY_ENV
        app_args |= access
        # Masked: a password in the tracking URI is not for a file that gets committed and shared.
        print(redact_uri(yaml.safe_dump(serve_config(app_args, options, args.host, args.port), sort_keys=False)), end="")
        return 0
    # A wrong URI or index fails here, with its reason, not inside a replica.
    try:
        keys = collect_keys(args.api_key, args.api_key_file)
    except KeyError_ as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not keys and not is_loopback(args.host) and not args.allow_unauthenticated:
        print(f"error: --host {args.host} lets other machines call this server, and no API key is set: give one "
              f"(${KEY_ENV}, --api-key-file or --api-key) or pass --allow-unauthenticated", file=sys.stderr)
        return 2
    if keys:  # the replica gets their digests only
        access["api_key_sha256"] = sorted({digest(k) for k in keys})
    resolve_model(model, tracking_uri)
    if args.index:
        IndexSource(args.index)
    return run_blocking(app_args | access, options, args.host, args.port, local, cfg.serve)
