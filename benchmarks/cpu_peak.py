"""How much of this CPU an encoder uses: peak GEMM FLOP/s, and the FLOPs of a BERT forward pass.

Peak: the best of a few timed large square matrix multiplies (``torch.matmul``, n = 2048) in fp32
and bf16 (AMX on CPUs that have it), and the int8 GEMM that dynamic quantisation runs (a large
``torch.ao.nn.quantized.dynamic.Linear``: int8 weights, activations quantised on the fly), with 1
and 2 torch threads. Counting: a multiply-add is 2 FLOPs.

Encoder FLOPs (forward, per sequence of L tokens, per layer, hidden size h, FFN 4h)::

    Q, K, V and output projections  4 L h^2 multiply-adds
    feed-forward (h -> 4h -> h)      8 L h^2
    attention scores and mixing      2 L^2 h
    total                           12 L h^2 + 2 L^2 h multiply-adds = 24 L h^2 + 4 L^2 h FLOPs

(embeddings, LayerNorm, GELU, softmax and pooling add well under 2 % at L <= 256 and are left out).
A batch padded to its longest text costs ``rows x flops(L_max)``: what each system executes depends on
how it forms batches, so each is counted with its own batching rule (``*_batches`` below) over the
real token counts of the benchmark's documents.

Run alone to print the peak table::

    flock /tmp/samtone-ray.lock python benchmarks/cpu_peak.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samtone_ray.core.runtime import cpu_threads  # noqa: E402
from samtone_ray.model.tokenization import length_sorted_batches  # noqa: E402


def layer_flops(length: int, hidden: int) -> float:
    """Forward FLOPs of one BERT layer on one sequence of ``length`` tokens (module docstring)."""
    return 24.0 * length * hidden**2 + 4.0 * length**2 * hidden


def batches_flops(batches: list[list[int]], lengths: list[int], hidden: int, layers: int) -> float:
    """FLOPs executed for ``batches`` (index lists into ``lengths``), each padded to its longest."""
    return sum(len(b) * layer_flops(max(lengths[i] for i in b), hidden) for b in batches) * layers


def useful_flops(lengths: list[int], hidden: int, layers: int) -> float:
    """FLOPs with no padding at all: every text at its own length."""
    return sum(layer_flops(n, hidden) for n in lengths) * layers


def st_batches(texts: list[str], batch_size: int) -> list[list[int]]:
    """sentence-transformers' ``encode`` batching: sorted by descending character length (its
    ``_text_length``), cut into ``batch_size`` batches, each padded to its longest in tokens."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def inprocess_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """``DualEncoder.encode_documents``: sorted by token length over all texts."""
    return length_sorted_batches(lengths, batch_size)


def pipeline_batches(lengths: list[int], batch_size: int, rows_per_file: int) -> list[list[int]]:
    """``samtone encode``: one shard per ``rows_per_file`` consecutive records, sorted by token
    length within its shard (``tokenize_chunks``)."""
    out = []
    for start in range(0, len(lengths), rows_per_file):
        shard = lengths[start : start + rows_per_file]
        out += [[start + i for i in b] for b in length_sorted_batches(shard, batch_size)]
    return out


def _best_time(fn, seconds: float) -> float:
    fn()  # warm-up: allocation, kernel selection, weight packing
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return best


def gemm_peak(kind: str, threads: int, n: int = 2048, seconds: float = 2.0) -> float:
    """Best FLOP/s of an n x n x n GEMM: ``kind`` fp32 or bf16 (torch.matmul), or int8 (a dynamic
    int8 quantised Linear, the kernel ``--precision int8`` runs)."""
    with cpu_threads(threads):
        torch.manual_seed(0)
        if kind == "int8":
            linear = torch.ao.nn.quantized.dynamic.Linear(n, n, dtype=torch.qint8)
            x = torch.randn(n, n)
            fn = lambda: linear(x)  # noqa: E731
        else:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[kind]
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            fn = lambda: torch.matmul(a, b)  # noqa: E731
        with torch.no_grad():
            return 2.0 * n**3 / _best_time(fn, seconds)


def peak_table(kinds=("fp32", "bf16", "int8"), threads=(1, 2), seconds: float = 2.0) -> dict[str, dict[int, float]]:
    """{kind: {threads: FLOP/s}} measured now."""
    return {k: {t: gemm_peak(k, t, seconds=seconds) for t in threads} for k in kinds}


def main() -> int:
    table = peak_table()
    print("peak GEMM (n=2048, best of ~2 s), GFLOP/s:")
    for kind, row in table.items():
        print(f"  {kind:<5} " + "  ".join(f"{t} thread{'s' if t > 1 else ''} {v / 1e9:8.1f}" for t, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
