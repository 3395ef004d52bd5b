"""Per-worker memory of the training pairs: Python lists pickled per worker (main) vs the shared
Arrow table (this branch), at 1M synthetic pairs.

The script writes a Parquet training set (``--pairs`` rows; queries ~60 characters, documents
~600, ``--negatives`` hard negatives drawn from the other pairs' documents), then for each path:

* the driver loads it (timed) and puts it in the object store;
* ``--workers`` fresh Ray actors (one process each, like Ray Train workers) get it, build the
  duplicate keys and materialise ``--steps`` global batches of ``--batch-size`` pairs (their
  shard's rows and the global batch's keys, as ``make_shard`` / ``batch_keys`` do, without the
  tokenizer, which is the same for both);
* each worker reports its USS (private memory: what the set costs per worker) and RSS after
  start-up, after the get, after the keys and after the steps.

The old path is main's own code (``git show main:samtone_ray/data.py`` and ``batching.py``, loaded
as modules ``main_data`` / ``main_batching``); nothing of it lives in the package.

Usage::

    PYTHONPATH=$PWD flock /tmp/samtone-ray.lock .venv/bin/python benchmarks/pairs_memory.py   # 1M pairs
    PYTHONPATH=$PWD flock /tmp/samtone-ray.lock .venv/bin/python benchmarks/pairs_memory.py --pairs 100000 --paths new
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from samtone_ray.env import apply_defaults  # noqa: E402

apply_defaults()

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "pairs_memory.json"
MB = 1e6


# --------------------------------------------------------------------------- the data


def random_texts(rng: np.random.Generator, n: int, low: int, high: int):
    """n random lower-case texts with lengths uniform in [low, high], built as one Arrow array."""
    import pyarrow as pa

    lengths = rng.integers(low, high + 1, n)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
    chars = alphabet[rng.integers(0, len(alphabet), int(offsets[-1]))]
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars.tobytes()))


def write_pairs(path: Path, n: int, negatives: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    writer = None
    step = 100_000
    for start in range(0, n, step):
        m = min(step, n - start)
        columns = {"query": random_texts(rng, m, 40, 80), "document": random_texts(rng, m, 400, 800)}
        if negatives:
            # Mined negatives are other corpus documents: texts that also occur as positives.
            picks = rng.integers(0, m, (m, negatives)).reshape(-1)
            values = columns["document"].take(pa.array(picks))
            columns["negatives"] = pa.ListArray.from_arrays(pa.array(np.arange(0, m * negatives + 1, negatives,
                                                                                 dtype=np.int32)), values)
        table = pa.table(columns)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=65536)
    writer.close()


def load_main_modules(folder: Path) -> None:
    """main's data.py and batching.py as modules main_data / main_batching in ``folder``."""
    for name in ("data", "batching"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"main:samtone_ray/{name}.py"], check=True,
                              capture_output=True, text=True).stdout
        text = text.replace("from samtone_ray.data import", "from main_data import")
        (folder / f"main_{name}.py").write_text(text)


# --------------------------------------------------------------------------- one worker


def memory() -> dict[str, float]:
    from ray.thirdparty_files import psutil

    info = psutil.Process().memory_full_info()
    return {"uss_mb": info.uss / MB, "rss_mb": info.rss / MB}


class Worker:
    """One worker process: gets the pairs, builds the keys, materialises its shards."""

    def __init__(self, main_folder: str) -> None:
        sys.path.insert(0, main_folder)
        import pyarrow  # noqa: F401
        import torch  # noqa: F401

        import samtone_ray.batching  # noqa: F401
        gc.collect()
        self.memory = {"started": memory()}

    def run(self, box: list, path: str, rank: int, world: int, num_negatives: int, batch_size: int, steps: int):
        import ray
        import torch

        from samtone_ray.batching import Schedule

        t0 = time.perf_counter()
        pairs = ray.get(box[0])
        got_s = time.perf_counter() - t0
        gc.collect()
        self.memory["after_get"] = memory()
        t0 = time.perf_counter()
        if path == "main":
            import main_batching

            keys = main_batching.PairKeys.build(pairs, num_negatives)

            def batch_keys(indices):
                idx = torch.as_tensor(indices)
                out = {"query": keys.query[idx], "doc": keys.doc[idx]}
                return out | ({"negatives": keys.negatives[idx]} if keys.negatives is not None else {})
        else:
            from samtone_ray.batching import PairKeys

            keys = PairKeys.build(pairs, num_negatives)
            batch_keys = keys.take
        keys_s = time.perf_counter() - t0
        gc.collect()
        self.memory["after_keys"] = memory()
        schedule = Schedule(len(pairs), batch_size, seed=0, epochs=1, max_steps=steps)
        per = batch_size // world
        t0 = time.perf_counter()
        for step in range(schedule.total_steps):
            indices = schedule.batch(step)
            rows = pairs.subset(indices[rank * per : (rank + 1) * per])
            batch_keys(indices)
            assert len(rows.queries) == per
        steps_s = time.perf_counter() - t0
        gc.collect()
        self.memory["after_steps"] = memory()
        return {"memory": self.memory, "get_s": got_s, "keys_s": keys_s, "steps_s": steps_s,
                "keys_mb": sum(v.nbytes for v in vars(keys).values() if hasattr(v, "nbytes")) / MB}


# --------------------------------------------------------------------------- one path


def measure(path: str, parquet: Path, args, main_folder: Path) -> dict:
    import ray

    t0 = time.perf_counter()
    if path == "main":
        import main_data

        pairs = main_data.load_training_pairs(parquet, num_negatives=args.negatives)
        keys_s = None  # built by every worker
    else:
        from samtone_ray.data import load_training_pairs
        from samtone_ray.pairs import PairKeys

        pairs = load_training_pairs(parquet, num_negatives=args.negatives)
    load_s = time.perf_counter() - t0
    if path == "new":
        t0 = time.perf_counter()
        PairKeys.of_table(pairs.table)  # the share of load_s that built the keys, timed again
        keys_s = time.perf_counter() - t0
    driver = memory()
    t0 = time.perf_counter()
    ref = ray.put(pairs)
    put_s = time.perf_counter() - t0
    del pairs
    gc.collect()
    actor = ray.remote(num_cpus=0)(Worker)
    workers = [actor.remote(str(main_folder)) for _ in range(args.workers)]
    results = ray.get([w.run.remote([ref], path, r, args.workers, args.negatives, args.batch_size, args.steps)
                       for r, w in enumerate(workers)])
    for w in workers:
        ray.kill(w)
    del ref
    gc.collect()
    worker = results[0]["memory"]
    growth = {stage: {k: worker[stage][k] - worker["started"][k] for k in ("uss_mb", "rss_mb")}
              for stage in ("after_get", "after_keys", "after_steps")}
    return {"driver_load_s": load_s, "driver_keys_s": keys_s, "put_s": put_s, "driver_memory_after_load": driver,
            "workers": results, "worker0_growth_mb": growth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--negatives", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--paths", default="main,new")
    parser.add_argument("--object-store-gb", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import ray

    with tempfile.TemporaryDirectory(prefix="pairs-memory-") as tmp:
        tmp = Path(tmp)
        load_main_modules(tmp)
        sys.path.insert(0, str(tmp))
        parquet = tmp / "pairs.parquet"
        t0 = time.perf_counter()
        write_pairs(parquet, args.pairs, args.negatives)
        meta = pq.ParquetFile(parquet).metadata
        print(f"wrote {args.pairs} pairs ({parquet.stat().st_size / MB:.0f} MB Parquet, "
              f"{meta.num_row_groups} row groups) in {time.perf_counter() - t0:.1f} s", flush=True)
        ray.init(address="local", num_cpus=args.workers, include_dashboard=False, _node_ip_address="127.0.0.1",
                 object_store_memory=int(args.object_store_gb * (1 << 30)), logging_level="WARNING")
        try:
            runs = {}
            for path in args.paths.split(","):
                print(f"--- {path}", flush=True)
                runs[path] = measure(path, parquet, args, tmp)
                g = runs[path]["worker0_growth_mb"]
                w = runs[path]["workers"][0]
                print(f"load {runs[path]['driver_load_s']:.1f} s, keys {runs[path]['driver_keys_s'] or w['keys_s']:.1f} s"
                      f" ({'driver, once' if path == 'new' else 'per worker'}); worker 0 USS +{g['after_get']['uss_mb']:.0f}"
                      f" MB after get, +{g['after_keys']['uss_mb']:.0f} after keys, +{g['after_steps']['uss_mb']:.0f}"
                      f" after {args.steps} steps (RSS +{g['after_steps']['rss_mb']:.0f})", flush=True)
        finally:
            ray.shutdown()

    result = {
        "benchmark": "pairs_memory",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "note": "2-core machine shared with other jobs (a niced background tuning run may have been running): "
                "times are indicative, memory figures are per process and not affected",
        "settings": vars(args) | {"out": str(args.out)},
        "runs": runs,
    }
    if {"main", "new"} <= runs.keys():
        old, new = (runs[p]["worker0_growth_mb"]["after_steps"]["uss_mb"] for p in ("main", "new"))
        result["worker_uss_growth_mb"] = {"main": old, "new": new}
        result["worker_uss_growth_per_million_pairs_mb"] = {"main": old * 1e6 / args.pairs,
                                                            "new": new * 1e6 / args.pairs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from samtone_ray.files import atomic_write_json

    atomic_write_json(args.out, result)
    print(json.dumps({k: result[k] for k in result if k.startswith("worker_uss")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
