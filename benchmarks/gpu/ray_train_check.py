"""One Ray Train run on the GPU path: NCCL process group, bf16 autocast, gradient cache, eval.

Writes the run's final metrics, its wall time and what the worker resolved (device, precision)
as JSON. ``--dry-run`` runs the same entry point on CPU (gloo, fp32) with tiny sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import ray

from samtone_ray.core.config import from_dict
from samtone_ray.core.files import atomic_write_json
from samtone_ray.train.trainer import train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dry-run", action="store_true", help="CPU, gloo, fp32, tiny sizes")
    args = p.parse_args(argv)
    gpu = not args.dry_run
    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_dict(
            {
                "name": "gpu-check",
                "model": {"name_or_path": args.model},
                "train": {"batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
                          "max_steps": args.steps, "eval_every": 0, "log_every": 5, "warmup_ratio": 0.1,
                          "precision": "bf16" if gpu else "fp32", "chunk_size": min(64, args.micro_batch_size)},
                "scaling": {"num_workers": 1, "use_gpu": gpu, "cpus_per_worker": 4 if gpu else 1},
                "tracking": {"enabled": False},
                "output_dir": tmp,
            }
        )
        t0 = time.perf_counter()
        # Joined here rather than in train(): without the dashboard, whose extra packages the
        # GPU image may lack (it only serves ASHA's worker release, unused by one run).
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING",
                 num_cpus=max(2, min(16, os.cpu_count() or 2)))
        try:
            outcome = train(cfg)
        finally:
            ray.shutdown()
        seconds = time.perf_counter() - t0
        report = {
            "backend": "nccl" if gpu else "gloo",
            "precision": cfg.train.precision,
            "batch_size": args.batch_size,
            "micro_batch_size": args.micro_batch_size,
            "steps": args.steps,
            "wall_seconds_including_ray_start_and_eval": seconds,
            "metrics": outcome.metrics,
            "model_saved": (Path(outcome.model_dir) / "samtone_config.json").exists()
            or any(Path(outcome.model_dir).rglob("*.safetensors")),
        }
    atomic_write_json(args.out, report)
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
