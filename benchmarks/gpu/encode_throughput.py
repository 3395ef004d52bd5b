"""Encoding throughput: ``DualEncoder.encode_documents`` vs ``SentenceTransformer.encode``.

Same base model directory, same documents, the SAME max length for both (``--max-length``,
set as ST's ``max_seq_length``), the same batch size and precision (bf16 = autocast around both
calls), eval mode, no gradients. Both sort texts by length before batching. Systems run
interleaved in rounds; reported: median documents/s per system and the ratio project / ST. The
embeddings of both are compared on the first 256 documents (max abs difference) to show that the
same thing is computed.

Usage::

    python benchmarks/encode_throughput.py --device cuda --precision bf16 --docs 50000 --batch-size 512
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from samtone_ray.data.sources import bundled_sample_path, load_training_pairs  # noqa: E402
from samtone_ray.core.files import atomic_write_json  # noqa: E402
from samtone_ray.core.runtime import autocast, device_name  # noqa: E402
from samtone_ray.model.layout import resolve_model_path  # noqa: E402
from samtone_ray.model.towers import DualEncoder  # noqa: E402

DEFAULT_DATA = Path("/work/shared/data/debian")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "gpu" / "encode_throughput.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--docs", type=int, default=2000, help="documents encoded per round and system")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", default=None, help="BEIR folder or Parquet pairs (documents are taken from it)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.data is None:
        args.data = str(DEFAULT_DATA if DEFAULT_DATA.is_dir() else bundled_sample_path())
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(args.device)
    pairs = load_training_pairs(args.data, "train")
    unique = list(dict.fromkeys(pairs.to_pairs().documents))
    texts = [unique[i % len(unique)] for i in range(args.docs)]
    path = resolve_model_path(args.model)
    project = DualEncoder.from_base(path, doc_max_length=args.max_length).to(device).eval()
    st = SentenceTransformer(path, device=str(device))
    st.max_seq_length = args.max_length

    def run_project(batch: list[str]) -> torch.Tensor:
        with autocast(device, args.precision):
            return project.encode_documents(batch, batch_size=args.batch_size, show_progress=False)

    def run_st(batch: list[str]) -> torch.Tensor:
        with autocast(device, args.precision):
            return st.encode(batch, batch_size=args.batch_size, convert_to_tensor=True,
                             normalize_embeddings=True, show_progress_bar=False).float().cpu()

    systems = {"samtone-ray encode_documents": run_project, "SentenceTransformer.encode": run_st}
    check = {name: fn(texts[:256]) for name, fn in systems.items()}  # also the warm-up
    max_diff = float((check["samtone-ray encode_documents"] - check["SentenceTransformer.encode"]).abs().max())
    rates: dict[str, list[float]] = {name: [] for name in systems}
    names = list(systems)
    for r in range(args.rounds):
        for name in names[r % 2 :] + names[: r % 2]:
            _sync(device)
            t0 = time.perf_counter()
            systems[name](texts)
            _sync(device)
            rates[name].append(len(texts) / (time.perf_counter() - t0))
            print(f"round {r + 1}/{args.rounds} {name:<30} {rates[name][-1]:9.1f} docs/s", file=sys.stderr, flush=True)
    med = {name: statistics.median(v) for name, v in rates.items()}
    ratio = med["samtone-ray encode_documents"] / med["SentenceTransformer.encode"]
    payload = {
        "benchmark": "encode_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": vars(args) | {"out": str(args.out), "device_name": device_name(device), "torch": torch.__version__},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "docs_per_s": rates,
        "medians": med,
        "max_abs_embedding_difference_first_256": max_diff,
        "ratio_project_over_sentence_transformers": ratio,
    }
    atomic_write_json(args.out, payload)
    for name, v in med.items():
        print(f"{name:<30} {v:9.1f} docs/s (median of {args.rounds})")
    print(f"max |embedding difference| on 256 docs: {max_diff:.2e}")
    print(f"wrote {args.out}")
    print(f"ratio (project / sentence-transformers): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
