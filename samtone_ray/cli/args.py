"""Argument types and option groups shared by several commands, so a bad value is a usage error
that names its flag rather than a traceback from deep inside a job."""

from __future__ import annotations

import argparse
import math
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


def _number(text: str, kind: type[int] | type[float], low: float, high: float = math.inf, *, above: bool = False):
    """``text`` as ``kind`` within [low, high] (``above``: low itself excluded), else a usage error."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if not math.isfinite(value) or value < low or (above and value == low) or value > high:
        bound = f"> {low:g}" if above else f">= {low:g}"
        raise argparse.ArgumentTypeError(
            f"must be {bound}" + (f" and <= {high:g}" if high != math.inf else "") + f", got {text}"
        )
    return value


def non_negative(text: str) -> int:
    return _number(text, int, 0)


def positive_int(text: str) -> int:
    return _number(text, int, 1)


def positive_float(text: str) -> float:
    return _number(text, float, 0, above=True)


def non_negative_float(text: str) -> float:
    return _number(text, float, 0)


def port(text: str) -> int:
    return _number(text, int, 1, 65535)


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
