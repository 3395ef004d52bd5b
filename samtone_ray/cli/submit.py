"""``samtone submit``: run train, tune or encode on a Ray cluster through its job server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from samtone_ray.cli.args import address_arg, config_args, load, non_negative_float, positive_float


def add_parser(sub) -> None:
    from samtone_ray.cluster.submit import KINDS
    from samtone_ray.cluster.upload import DEFAULT_MAX_FILE_MB

    p = sub.add_parser(
        "submit", help="run train/tune/encode on a Ray cluster through its job server",
        usage="samtone submit {train,tune,encode} [options] [-- ARGS for the command]",
    )
    p.add_argument("kind", choices=KINDS)
    config_args(p)
    address_arg(p)
    p.add_argument("--working-dir", type=Path, default=Path("."),
                   help="uploaded to the cluster, less secrets, local databases and large files (default: .)")
    p.add_argument("--max-file-mb", type=positive_float, default=DEFAULT_MAX_FILE_MB,
                   help=f"files larger than this stay behind (default: {DEFAULT_MAX_FILE_MB:g})")
    p.add_argument("--dry-run", action="store_true",
                   help="check the job and show what would be sent (command, environment, files); submit nothing")
    p.add_argument("--num-cpus", type=non_negative_float, default=0, help="CPUs reserved for the job's driver (workers reserve their own)")
    p.add_argument("--num-gpus", type=non_negative_float, default=0, help="GPUs reserved for the job's driver")
    p.add_argument("--id", help="submission id (default: derived from the command and the config hash)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--follow", action="store_true", help="tail the job's logs; exit non-zero unless it SUCCEEDED")
    mode.add_argument("--no-wait", action="store_true", help="return once submitted")
    p.set_defaults(func=run, job_args=[])  # arguments after `--` go to the command (see cli.main)


def exit_code(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1


def check_config_like_the_command(kind: str, cfg) -> None:
    """The config checks the local command runs before it starts (same errors, same messages)."""
    if kind == "tune":
        from samtone_ray.tune.tuner import check_tune_config

        check_tune_config(cfg)


def run(args: argparse.Namespace) -> int:
    from samtone_ray.cluster.submit import (
        alive_nodes,
        build_submission,
        client,
        cluster_address,
        submit,
        wait,
    )
    from samtone_ray.cli import build_parser
    from samtone_ray.core.redact import redact_uri

    cfg = load(args)  # fails here, before anything is sent
    check_config_like_the_command(args.kind, cfg)
    address = None if args.dry_run else cluster_address(args.address)
    sub = build_submission(
        args.kind, cfg, config_path=args.config, overrides=args.overrides, extra_args=args.job_args,
        working_dir=args.working_dir, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
        nodes=(alive_nodes(address) or 1) if address else 1, submission_id=args.id, max_file_mb=args.max_file_mb,
    )
    build_parser().parse_args(sub.command)  # the job's own usage errors, here rather than on the cluster
    for warning in sub.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(sub.describe())
        print("dry run: nothing submitted")
        return 0
    print(sub.upload.describe(), flush=True)
    jobs = client(address)
    sid, new = submit(sub, jobs)
    if new:
        print(f"submitted {sid} to {redact_uri(address)}: {redact_uri(sub.entrypoint)}", flush=True)
    else:
        status = jobs.get_job_status(sid).value
        print(f"{sid} was submitted before ({status}); not starting it twice. Attaching "
              f"(to run it again, change the config or pass --id).", flush=True)
    if args.no_wait:
        return 0
    status = wait(jobs, sid, follow=args.follow)
    if args.follow:  # without --follow, wait() has printed every state change, the last included
        print(f"{sid}: {status}", flush=True)
    return exit_code(status)
