"""samtone: train, tune and evaluate SamToNe dual-encoder retrievers on Ray.

Every command runs on an embedded default (local Ray on 127.0.0.1, MLflow in
``./.samtone/mlflow.db``, the bundled Debian sample) unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from samtone_ray.core.env import apply_defaults

apply_defaults()  # before anything imports ray, mlflow or transformers


def _count_range(option: str, *, single: bool):
    """An argparse type for replica/actor counts, so a bad value is a usage error naming the flag."""
    from samtone_ray.core.choices import parse_count_range

    def parse(text: str) -> tuple[int, int]:
        try:
            return parse_count_range(text, option, single=single)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{option} ")) from None

    return parse


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (default: the embedded defaults)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="dotted override, e.g. --set train.batch_size=128 (repeatable)",
    )


def _load(args):
    from samtone_ray.core.config import load_config

    return load_config(args.config, args.overrides).with_output_dir()


def _echo(cfg) -> None:
    print("# resolved config", flush=True)
    print(cfg.to_yaml(), flush=True)


def cmd_eval(args) -> int:
    from samtone_ray.data.sources import bound_eval_corpus, load_beir
    from samtone_ray.evaluation.retrieval import bm25_run, format_metrics_table, retrieval_metrics
    from samtone_ray.model.towers import DualEncoder
    from samtone_ray.data.sources import resolve_data_path
    from samtone_ray.evaluation.retrieval import evaluate_model as evaluate

    split = bound_eval_corpus(load_beir(resolve_data_path(args.data), args.split), args.max_docs)
    rows = {}
    if args.baseline == "bm25":
        rows["bm25"] = retrieval_metrics(bm25_run(split.corpus, split.queries, k=100), split.qrels)
    model = DualEncoder.from_pretrained(args.model)
    rows[Path(args.model).name or args.model] = evaluate(model, split, args.batch_size, args.precision)
    if args.json:
        payload = {"data": args.data, "split": args.split, "queries": len(split.qrels), "documents": len(split.corpus),
                   "documents_total": split.corpus_params()["eval_docs_total"]}
        print(json.dumps(payload | {"results": rows} | rows[next(reversed(rows))]))
    else:
        print(f"{args.data} [{args.split}]: {len(split.qrels)} queries, {split.corpus_summary()}")
        print(format_metrics_table(rows))
    return 0


def cmd_train(args) -> int:
    from samtone_ray.evaluation.retrieval import format_metrics_table
    from samtone_ray.data.sources import load_data
    from samtone_ray.evaluation.retrieval import evaluate_model as evaluate
    from samtone_ray.model.towers import DualEncoder
    from samtone_ray.train.trainer import train

    cfg = _load(args)
    _echo(cfg)
    data = load_data(cfg)
    rows = {}
    if data[1] is not None and not args.no_baseline:
        print("evaluating the base model zero-shot ...", flush=True)
        rows["zero-shot"] = evaluate(DualEncoder.from_config(cfg.model), data[1], cfg.train.eval_batch_size, cfg.train.precision)
    outcome = train(cfg, data=data)
    if data[1] is not None:
        rows["fine-tuned"] = {k: v for k, v in outcome.metrics.items() if "@" in k}
        print(f"eval corpus: {data[1].corpus_summary()}")
        print(format_metrics_table(rows))
    print(f"model: {outcome.model_dir}")
    if outcome.run_id:
        print(f"mlflow run: {outcome.run_id} ({outcome.model_uri})")
    return 0


def cmd_tune(args) -> int:
    from samtone_ray.core.config import from_dict
    from samtone_ray.evaluation.retrieval import DEFAULT_TABLE_KEYS
    from samtone_ray.tune.leaderboard import format_leaderboard
    from samtone_ray.tune.layout import TuneLayout
    from samtone_ray.tune.progress import next_steps
    from samtone_ray.tune.tuner import tune

    if args.resume:
        layout = TuneLayout(Path(args.resume))
        if not layout.saved_state.exists():
            print(f"error: nothing to resume: {layout.state} does not exist", file=sys.stderr)
            return 2
        cfg = from_dict(layout.read_state()["config"])
    else:
        cfg = _load(args)
    verbose = args.ray_output or args.verbose  # Ray's own output here, as it was, rather than in ray.log
    if verbose:
        _echo(cfg)  # else the plan says what runs; tune.json keeps the whole config
    outcome = tune(cfg, resume=bool(args.resume), zero_shot=not args.no_baseline, verbose=verbose)
    print(f"\n# leaderboard ({cfg.tune.metric}, {cfg.data.eval} [{cfg.data.eval_split}])")
    print(f"eval corpus: {outcome.eval_corpus}")
    print(format_leaderboard(outcome.leaderboard, cfg.tune.metric))
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
        from samtone_ray.tracking.model_uri import alias_uri

        print(f"champion: {alias_uri(cfg.registry.model_name, cfg.registry.alias)} "
              f"(version {outcome.champion['version'] if outcome.champion['promoted'] else outcome.champion['incumbent_version']})")
    print("\n" + next_steps(cfg, outcome, None if verbose else TuneLayout(outcome.output_dir).ray_log))
    return 0


def cmd_models(args) -> int:
    from samtone_ray.tracking import runs as tracking

    uri = tracking.tracking_uri(args.tracking_uri or "")
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


def cmd_encode(args) -> int:
    from samtone_ray.encode.job import cli_encode

    return cli_encode(args)


def cmd_index(args) -> int:
    from samtone_ray.encode.index import cli_index

    return cli_index(args)


def cmd_serve(args) -> int:
    from samtone_ray.core.config import load_config
    from samtone_ray.serve.app import cmd_serve as serve

    return serve(args, load_config(args.config, args.overrides))


def build_parser() -> argparse.ArgumentParser:
    from samtone_ray.core.choices import PRECISIONS

    parser = argparse.ArgumentParser(prog="samtone", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="exact-search retrieval metrics of a model on a BEIR split")
    p.add_argument("--model", required=True, help="a samtone model dir, or a plain HF / sentence-transformers dir")
    p.add_argument("--data", required=True, help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    p.add_argument("--split", default="dev")
    p.add_argument("--baseline", choices=["bm25"], help="add a baseline row")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-docs", type=_non_negative, default=0,
                   help="search the judged documents plus a fixed sample of the rest, this many in all "
                        "(as train.eval_max_docs; default 0 = the whole corpus)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="auto/fp32/bf16 (autocast), or int8 (dynamic int8 linear layers, CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object (last line of stdout)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="fine-tune a dual encoder on Ray Train")
    _config_args(p)
    p.add_argument("--no-baseline", action="store_true", help="skip the zero-shot evaluation before training")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="tune negative strategies etc. with Ray Tune; register the champion")
    _config_args(p)
    p.add_argument("--resume", metavar="OUTPUT_DIR", help="resume an interrupted tuning run from its output_dir")
    p.add_argument("--no-baseline", action="store_true", help="skip the zero-shot reference evaluation")
    p.add_argument("--verbose", dest="ray_output", action="store_true",
                   help="show Ray's own output here (Tune's status tables, Ray's logs, the workers' output) instead "
                        "of the progress view; without it that output goes to <output_dir>/ray.log")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("serve", help="serve a model on Ray Serve: OpenAI-compatible /v1/embeddings and /search")
    _config_args(p)
    p.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a model dir "
                   "(default: models:/<registry.model_name>@<registry.alias>)")
    p.add_argument("--index", type=Path, help="a BEIR folder (its corpus is encoded at start) or a samtone index folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1)
    scale.add_argument(
        "--autoscale", metavar="MIN:MAX", type=_count_range("--autoscale", single=False), help="autoscale between MIN and MAX replicas"
    )
    p.add_argument("--gpu", action="store_true", help="one GPU per replica")
    p.add_argument("--num-cpus", type=float, help="CPUs per replica, torch threads follow (default: every core for one "
                   "replica on a local cluster started here, else 1)")
    p.add_argument("--print-config", action="store_true", help="print the `serve deploy` YAML and exit")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("models", help="list registered model versions, metrics and aliases")
    p.add_argument("name", nargs="?")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or ./.samtone/mlflow.db")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("encode", help="re-encode a corpus with a model on Ray Data (resumable, exactly once)")
    _config_args(p)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a local dir")
    p.add_argument("--input", required=True, help="BEIR corpus.jsonl, JSON Lines or Parquet: a file or a folder (local, s3://, ...)")
    p.add_argument("--output", required=True, type=Path, help="output folder (Parquet parts + manifest.json)")
    p.add_argument("--tower", choices=["document", "query"], default="document")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass")
    p.add_argument(
        "--actors", default=(1, 1), type=_count_range("--actors", single=True), help="embedding actors: N or MIN:MAX (autoscaling)"
    )
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) per actor")
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (bf16 where native), fp32, bf16, or int8 (dynamic int8 linear layers, CPU only)")
    p.add_argument("--id-field", default="_id")
    p.add_argument("--text-fields", default="title,text", help="comma-separated fields joined into the text")
    p.add_argument("--on-bad-record", choices=["error", "skip"], default="error",
                   help="skip: write bad records to rejects.jsonl and go on")
    p.add_argument("--rows-per-file", type=int, help="rows per output file (= per input shard; default 10000)")
    p.add_argument("--file-mb", type=float, help="size output files by MiB instead of rows")
    p.add_argument("--overwrite", action="store_true", help="replace an output written by another model or settings")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("index", help="build a search index (exact or faiss) from `samtone encode` output")
    p.add_argument("--embeddings", required=True, type=Path, help="a `samtone encode` output folder")
    p.add_argument("--output", required=True, type=Path, help="index folder (for `samtone serve --index`)")
    p.add_argument("--kind", choices=["exact", "faiss-ivf", "faiss-hnsw"], default="exact")
    p.add_argument("--queries", help="JSONL queries (`text`) for recall@10 vs exact; default: queries.jsonl beside the corpus")
    p.add_argument("--sample", type=int, default=500, help="queries sampled for recall@10")
    p.add_argument("--nlist", type=int, help="faiss-ivf: lists (default ~4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=32, help="faiss-ivf: lists probed per query")
    p.add_argument("--hnsw-m", type=int, default=32, help="faiss-hnsw: links per node")
    p.add_argument("--ef-search", type=int, default=128, help="faiss-hnsw: search breadth")
    p.add_argument("--tracking-uri", help="for models:/ and runs:/ URIs in the manifest")
    p.set_defaults(func=cmd_index)

    from samtone_ray.analysis.report import add_parser as add_analyze_parser

    add_analyze_parser(sub)

    from samtone_ray.cluster.submit import add_parsers as add_submit_parsers

    add_submit_parsers(sub, _config_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    from samtone_ray.core.config import ConfigError
    from samtone_ray.data.sources import DataError

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
    except (ConfigError, DataError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
