"""Argument types and option groups shared by several commands, so a bad value is a usage error
that names its flag rather than a traceback from deep inside a job."""

from __future__ import annotations

import argparse
from pathlib import Path


def count_range(option: str, *, single: bool):
    """Replica/actor counts: ``N`` or ``MIN:MAX``."""
    from samtone_ray.core.choices import parse_count_range

    def parse(text: str) -> tuple[int, int]:
        try:
            return parse_count_range(text, option, single=single)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{option} ")) from None

    return parse


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (default: the embedded defaults)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="dotted override, e.g. --set train.batch_size=128 (repeatable)",
    )


def tracking_uri_arg(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--tracking-uri", default="", help=f"{what}default: $MLFLOW_TRACKING_URI or ./.samtone/mlflow.db")


def address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the job server, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")


def load(args: argparse.Namespace):
    """The config that ``--config`` and ``--set`` give."""
    from samtone_ray.core.config import load_config

    return load_config(args.config, args.overrides)


def echo(cfg) -> None:
    print("# resolved config", flush=True)
    print(cfg.to_yaml(), flush=True)
