"""``samtone jobs``: submitted jobs; show, tail or stop one."""

from __future__ import annotations

import argparse
import time

from samtone_ray.cli.args import address_arg, positive_float


def add_parser(sub) -> None:
    p = sub.add_parser("jobs", help="list submitted jobs; show, tail or stop one")
    p.add_argument("id", nargs="?", help="a submission id (default: list them all)")
    address_arg(p)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--logs", action="store_true", help="print the job's logs")
    what.add_argument("--stop", action="store_true", help="stop the job and wait until it has stopped")
    p.add_argument("--timeout", type=positive_float, default=60, help="seconds --stop waits for the job to end")
    p.set_defaults(func=run)


def describe(info) -> str:
    meta = info.metadata or {}
    start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time / 1000)) if info.start_time else "-"
    took = f"{(info.end_time - info.start_time) / 1000:.0f}s" if info.end_time and info.start_time else "-"
    return f"{info.submission_id:<48} {info.status.value!s:<10} {meta.get('samtone.kind', '-'):<7} {start:<20} {took:>6}"


def run(args: argparse.Namespace) -> int:
    from samtone_ray.cluster.submit import TERMINAL, client, stop
    from samtone_ray.core.redact import redact_uri  # a job submitted by other means may carry a password

    jobs = client(args.address)
    if not args.id:
        infos = sorted(jobs.list_jobs(), key=lambda i: i.start_time or 0)
        infos = [i for i in infos if i.submission_id]  # drivers started by hand have none
        if not infos:
            print("no submitted jobs")
            return 0
        print(f"{'submission id':<48} {'status':<10} {'kind':<7} {'started':<20} {'took':>6}")
        for info in infos:
            print(describe(info))
        return 0
    if args.stop:
        status = stop(jobs, args.id, timeout_s=args.timeout)
        print(f"{args.id}: {status}")
        return 0 if status in TERMINAL else 1
    if args.logs:
        print(redact_uri(jobs.get_job_logs(args.id)), end="")
        return 0
    info = jobs.get_job_info(args.id)
    print(describe(info))
    print(f"  entrypoint: {redact_uri(info.entrypoint)}")
    if info.message:
        print(f"  message:    {redact_uri(info.message)}")
    for key, value in sorted((info.metadata or {}).items()):
        print(f"  {key}: {redact_uri(value)}")
    return 0
