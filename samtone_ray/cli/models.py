"""``samtone models``: registered model versions, their metrics and aliases."""

from __future__ import annotations

import argparse

from samtone_ray.cli.args import tracking_uri_arg


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list registered model versions, metrics and aliases")
    p.add_argument("name", nargs="?")
    tracking_uri_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from samtone_ray.tracking import runs as tracking

    uri = tracking.tracking_uri(args.tracking_uri)
    names = [args.name] if args.name else tracking.registered_model_names(uri)
    if not names:
        print(f"no registered models in {uri}")
        return 0
    for name in names:
        print(f"{name}")
        print(f"  {'version':>7}  {'aliases':<12} {'metric':<8} {'value':>7}  {'eval data':<28} trial / run")
        for v in tracking.model_versions(uri, name):
            tags = v["tags"]
            metric = tags.get("metric", "-")
            value = tags.get(tracking.metric_key(metric), "-")
            value = f"{float(value):.4f}" if value != "-" else value
            print(f"  {v['version']:>7}  {','.join(v['aliases']) or '-':<12} {metric:<8} {value:>7}  "
                  f"{tags.get('eval_data', '-'):<28} {tags.get('trial', '-')} / {v['run_id']}")
    return 0
