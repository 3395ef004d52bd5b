"""samtone: train, tune and evaluate SamToNe dual-encoder retrievers on Ray.

Every command runs on an embedded default (local Ray on 127.0.0.1, MLflow in
``./.samtone/mlflow.db``, the bundled Debian sample) unless told otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from samtone_ray.core.env import apply_defaults

apply_defaults()  # before anything imports ray, mlflow or transformers

# One module per command, each with ``add_parser(sub)`` and ``run(args) -> int``; listed in the
# order ``samtone --help`` shows them. The handlers parse and print; the work is in the library.
COMMANDS = ("train", "tune", "eval", "serve", "encode", "index", "mine", "models", "analyze", "submit", "jobs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samtone", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"samtone_ray.cli.{name}").add_parser(sub)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input rather than a bug: one line on stderr and exit status 2."""
    from samtone_ray.core.config import ConfigError
    from samtone_ray.core.storage import StorageError
    from samtone_ray.data.sources import DataError
    from samtone_ray.encode.index import IndexError_
    from samtone_ray.tracking.model_uri import ModelURIError

    return ConfigError, StorageError, DataError, IndexError_, ModelURIError, FileNotFoundError, FileExistsError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `samtone submit KIND ... -- ARGS`: everything after `--` goes to the submitted command as is.
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = build_parser().parse_args(argv[: len(argv) - len(passthrough) - 1] if "--" in argv else argv)
    if passthrough and not hasattr(args, "job_args"):
        build_parser().error(f"unrecognized arguments: -- {' '.join(passthrough)}")
    if hasattr(args, "job_args"):
        args.job_args = passthrough
    # Our own messages at INFO; libraries (tensorboardX, bm25s, ...) only when they warn.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("samtone_ray").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

