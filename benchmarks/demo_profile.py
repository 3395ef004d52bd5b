"""Where `make demo` (`samtone tune`, the embedded default) spends its time, measured by parts.

The demo is too long to run for every question, so this measures its components with short runs
on the demo's own settings (all-MiniLM-L6-v2, the bundled Debian sample, 2 CPU workers, global
batch 64, eval batch 128) at a chosen precision (``--precision fp32`` reproduces a CPU without
AMX), then multiplies them by the demo's counts:

* ``ray_start``: ``connect_ray()`` (a fresh local cluster).
* ``worker_group``: one ``TorchTrainer.fit`` whose 2 workers only report once: worker-group
  start, process-group set-up, controller polling and teardown, paid once per trial (under
  ``runtime.TRAIN_POLL_INTERVAL_S``).
* ``train_step``: the median wall time of a real training step (``train_step`` + backward +
  AdamW on the DDP model, 2 workers, fp32 gloo all-reduce), after one warm-up step; also at
  the other ``train.chunk_size`` values of ``--chunk-sizes`` (a pure speed knob: texts per
  padded forward chunk), to show what that lever would give.
* ``eval_shared``: one in-training evaluation as the workers run it (``evaluate_model`` with
  rank/world: each worker encodes half the length-sorted batches, rank 0 searches), on the
  corpus ``train.eval_max_docs`` bounds (``load_data``), and ``eval_shared_full`` on the
  whole corpus (``train.eval_max_docs=0``, as before that setting existed).
* ``zero_shot`` / ``zero_shot_full``: the base model's evaluation on the driver (``samtone
  tune`` without ``--no-baseline``), with every core, on the bounded and on the whole corpus.
  The champion rule's evaluations (the candidate, and the incumbent when there is one,
  re-evaluated from the registry on the driver) cost the same.

The demo's counts (``demo_counts``) follow its measured runs (benchmarks/README.md, "How long `make demo` takes"): 4 trials, the first trains
all 47 steps (evaluated every ``train.eval_every`` steps and at the end), ASHA stops the other three
at their first evaluation; 1 zero-shot evaluation, 4 worker groups. The champion rule adds evaluations of its
own (the candidate and the incumbent re-evaluated from the registry: ``champion_evals``).
``*_before`` estimates put the whole corpus in every evaluation (``train.eval_max_docs=0``).

Usage (holds the machine's cores: run it under the shared lock)::

    flock /tmp/samtone-ray.lock python benchmarks/demo_profile.py --precision fp32 \
        --out benchmarks/results/demo_profile.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samtone_ray.core.env import apply_defaults  # noqa: E402

apply_defaults()

import torch  # noqa: E402

from samtone_ray.core.config import load_config  # noqa: E402
from samtone_ray.data.sources import load_data  # noqa: E402
from samtone_ray.evaluation.retrieval import evaluate_model  # noqa: E402
from samtone_ray.core.files import atomic_write_json  # noqa: E402
from samtone_ray.core.runtime import TRAIN_POLL_INTERVAL_S, connect_ray, resolve_precision  # noqa: E402
from samtone_ray.model.towers import DualEncoder  # noqa: E402

EPOCH_STEPS = 47  # the bundled sample's 3,008 training pairs in batches of 64


def demo_counts(eval_every: int, trials: int = 4) -> dict[str, int]:
    """The demo's work as its runs go: the first trial trains the whole epoch (evaluated every
    ``eval_every`` steps and at the end), ASHA stops the other three at their first evaluation."""
    survivor_evals = len(range(eval_every, EPOCH_STEPS, eval_every)) + 1
    return {"trials": trials, "steps": EPOCH_STEPS + (trials - 1) * eval_every,
            "in_training_evals": survivor_evals + trials - 1, "zero_shot_evals": 1}


def _noop_worker(config):
    import ray.train

    ray.train.report({"done": 1})


def _profile_worker(config):
    """Train a few real steps per chunk size, then evaluate on the bounded and the whole corpus;
    rank 0 writes the timings."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from samtone_ray.data.batching import PairKeys, Schedule, make_shard
    from samtone_ray.core.config import from_dict
    from samtone_ray.train.trainer import batch_keys, linear_schedule, train_step
    from samtone_ray.model.losses import SamToNeLoss

    cfg = from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    pairs, split, full = ray.get(config["pairs"]), ray.get(config["eval"]), ray.get(config["eval_full"])
    torch.manual_seed(cfg.train.seed)
    model = DualEncoder.from_config(cfg.model)
    ddp = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = linear_schedule(optimizer, 47, cfg.train.warmup_ratio)
    schedule = Schedule(len(pairs), cfg.train.batch_size, cfg.train.seed, 1, 0)
    keys = PairKeys.build(pairs, 0)
    per = cfg.per_worker_batch_size()
    steps: dict[int, list[float]] = {}
    model.train()
    for chunk_size in config["chunk_sizes"]:  # the config's own first
        steps[chunk_size] = []
        for i in range(config["steps"] + 1):
            indices = schedule.batch(i)  # the same batches at every chunk size
            shard = make_shard(pairs, indices[rank * per : (rank + 1) * per], model.tokenizer,
                               query_max_length=cfg.model.query_max_length, doc_max_length=cfg.model.doc_max_length,
                               num_negatives=0, chunk_size=chunk_size)
            dist.barrier()
            t0 = time.perf_counter()
            loss = train_step(ddp, shard, SamToNeLoss(cfg.loss), keys=batch_keys(keys, indices), rank=rank,
                              precision=cfg.train.precision)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            dist.barrier()
            if i:  # the first step warms up allocators, DDP buckets and the new shapes
                steps[chunk_size].append(time.perf_counter() - t0)
    timed, metrics = {}, {}
    for name, data in (("eval_shared_s", split), ("eval_shared_full_s", full)):
        if data is None:  # taken from an earlier profile (--before-from)
            continue
        dist.barrier()
        t0 = time.perf_counter()
        metrics[name] = evaluate_model(model, data, cfg.train.eval_batch_size, cfg.train.precision,
                                       rank=rank, world=world)
        dist.barrier()
        timed[name] = time.perf_counter() - t0
    if rank == 0:
        Path(config["out"]).write_text(json.dumps({
            "train_step_s": {str(k): v for k, v in steps.items()}, **timed,
            "trained_mrr@10": metrics["eval_shared_s"]["mrr@10"],
            **({"trained_mrr@10_full": metrics["eval_shared_full_s"]["mrr@10"]} if full is not None else {}),
        }))
        print(f"train steps {steps}, evaluations {timed}", flush=True)
    ray.train.report({"done": 1})


def _before_figures(path: Path) -> dict:
    """Whole-corpus evaluation times of an earlier profile (its own format, or this one's)."""
    old = json.loads(path.read_text())
    m = old["measured"]
    return {"file": str(path), "date": old["date"], "corpus": old.get("eval_corpus", {}).get("before", "whole corpus"),
            "eval_shared_full_s": m.get("eval_shared_full_s", m["eval_shared_s"]),
            "zero_shot_full_s": m.get("zero_shot_full_s", m["zero_shot_s"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per chunk size (after one warm-up)")
    parser.add_argument("--chunk-sizes", default="", help="other train.chunk_size values to time steps at, e.g. 16,8")
    parser.add_argument("--before-from", type=Path,
                        help="take the whole-corpus evaluation times from this earlier profile JSON instead of "
                             "measuring them (they take minutes: the run then fits the lock's time slot)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as samtone's --set (e.g. train.eval_max_docs=2000)")
    parser.add_argument("--champion-evals", type=int, default=1,
                        help="evaluations the champion rule adds (1: the candidate re-evaluated; 2 with an incumbent)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_profile.json"))
    args = parser.parse_args()

    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = load_config(None, [f"train.precision={args.precision}", *args.overrides])
    chunk_sizes = list(dict.fromkeys([cfg.train.chunk_size, *(int(c) for c in args.chunk_sizes.split(",") if c)]))
    parts: dict[str, float] = {}
    scaling = ScalingConfig(num_workers=cfg.scaling.num_workers,
                            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker})
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(TRAIN_POLL_INTERVAL_S)
        ray.shutdown()
        t0 = time.perf_counter()
        connect_ray()
        parts["ray_start_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        TorchTrainer(_noop_worker, scaling_config=scaling, run_config=RunConfig(name="noop", storage_path=tmp)).fit()
        parts["worker_group_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pairs, split = load_data(cfg)
        parts["load_data_s"] = time.perf_counter() - t0
        full = load_data(cfg.with_overrides({"train.eval_max_docs": 0}))[1]
        before = _before_figures(args.before_from) if args.before_from else None

        zero_shot = {}
        for name, data in (("zero_shot_s", split), ("zero_shot_full_s", full)):
            if before and name == "zero_shot_full_s":
                continue
            t0 = time.perf_counter()
            zero_shot[name] = evaluate_model(DualEncoder.from_config(cfg.model), data, cfg.train.eval_batch_size, cfg.train.precision)
            parts[name] = time.perf_counter() - t0
            print(f"{name}: {parts[name]:.1f} s, mrr@10={zero_shot[name]['mrr@10']:.4f}", flush=True)

        out = Path(tmp) / "profile.json"
        TorchTrainer(
            _profile_worker,
            train_loop_config={"cfg": cfg.to_dict(), "pairs": ray.put(pairs), "eval": ray.put(split),
                               "eval_full": ray.put(None if before else full), "out": str(out), "steps": args.steps,
                               "chunk_sizes": chunk_sizes},
            scaling_config=scaling,
            run_config=RunConfig(name="profile", storage_path=tmp),
        ).fit()
        measured = json.loads(out.read_text())
    ray.shutdown()
    if before:
        parts["zero_shot_full_s"] = before["zero_shot_full_s"]
        measured["eval_shared_full_s"] = before["eval_shared_full_s"]

    step_by_chunk = {k: statistics.median(v) for k, v in measured["train_step_s"].items()}
    step = step_by_chunk[str(cfg.train.chunk_size)]
    counts = demo_counts(cfg.train.eval_every)
    demo = {
        "ray_start_and_data": parts["ray_start_s"] + parts["load_data_s"],
        "worker_groups": counts["trials"] * parts["worker_group_s"],
        "training_steps": counts["steps"] * step,
        "in_training_evals_before": counts["in_training_evals"] * measured["eval_shared_full_s"],
        "in_training_evals_now": counts["in_training_evals"] * measured["eval_shared_s"],
        "zero_shot_eval_before": parts["zero_shot_full_s"],
        "zero_shot_eval_now": parts["zero_shot_s"],
        "champion_evals_before": args.champion_evals * parts["zero_shot_full_s"],
        "champion_evals_now": args.champion_evals * parts["zero_shot_s"],
    }
    total_now = sum(v for k, v in demo.items() if not k.endswith("_before"))
    total_before = sum(v for k, v in demo.items() if not k.endswith("_now"))
    # What each other chunk size would make of the total (the step time scales the training part).
    total_at_chunk = {k: total_now + counts["steps"] * (v - step) for k, v in step_by_chunk.items()}
    payload = {
        "what": "components of `make demo` (samtone tune, embedded default), measured by benchmarks/demo_profile.py",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "precision": resolve_precision(args.precision, torch.device("cpu")),
                    "torch": torch.__version__},
        "settings": {"train.eval_max_docs": cfg.train.eval_max_docs, "train.chunk_size": cfg.train.chunk_size,
                     "train.eval_every": cfg.train.eval_every, "overrides": args.overrides},
        "eval_corpus": {"now": split.corpus_summary(), "before": full.corpus_summary(),
                        "queries": len(split.qrels)},
        "demo_counts": counts | {"champion_evals": args.champion_evals},
        "measured": parts | measured | {
            "train_step_median_s": step, "train_step_median_s_by_chunk_size": step_by_chunk,
            "zero_shot_mrr@10": zero_shot["zero_shot_s"]["mrr@10"],
            **({"zero_shot_mrr@10_full": zero_shot["zero_shot_full_s"]["mrr@10"]} if not before else {}),
        },
        "before_from": before,
        "load_average_1_5_15": os.getloadavg(),
        "demo_estimate_s": demo | {"total_before": total_before, "total_now": total_now,
                                   "total_now_by_chunk_size": total_at_chunk},
        "demo_share_now": {k: round(v / total_now, 3) for k, v in demo.items() if not k.endswith("_before")},
        "note": "Not counted: per-trial model build/load, the final save_pretrained + MLflow log_model, "
                "checkpoint writes, Tune bookkeeping; the gap to a measured demo wall time is their sum. "
                "The machine is shared: other helpers' unlocked work and a niced background tuning run may "
                "have been running.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, payload)
    print(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
