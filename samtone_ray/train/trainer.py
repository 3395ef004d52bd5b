"""Dual-encoder training on Ray Train with negatives from the whole global batch.

Each worker encodes its shard of the global batch; query, document and hard-negative embeddings
are all-gathered WITH gradients and each worker computes the loss of its own anchors against
every global candidate. DDP then averages the parameter gradients, so N workers compute exactly
the single-process loss and gradients of the global batch (tests/train/test_trainer.py proves it).

Layout: ``train_step`` is plain PyTorch (importable without a Ray cluster); ``train_loop`` is the
Ray Train worker function; ``build_trainer`` / ``train`` are the driver side.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from samtone_ray.data.batching import (
    PairKeys,
    Schedule,
    Shard,
    batch_digest,
    make_shard,
    pin_memory,
)
from samtone_ray.core.config import END_ONLY, Config, from_dict
from samtone_ray.data.sources import load_data
from samtone_ray.evaluation.retrieval import evaluate_model
from samtone_ray.core.files import atomic_write_json
from samtone_ray.core.storage import Store, open_store
from samtone_ray.train.gradcache import grad_cache_step
from samtone_ray.model.losses import SamToNeLoss
from samtone_ray.core.telemetry import TrainMetrics
from samtone_ray.data.pairs import PairTable
from samtone_ray.evaluation.per_query import PER_QUERY_FILE, write_per_query
from samtone_ray.core.runtime import (
    autocast,
    check_ray_cluster,
    connect_ray,
    device_name,
    resolve_precision,
)
from samtone_ray.model.tokenization import TokenChunks
from samtone_ray.model.towers import DualEncoder
from samtone_ray.tracking.model_uri import run_model_uri

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
HISTORY_FILE = "trained_batches.json"


# --------------------------------------------------------------------------- the step (pure torch)


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each of W ranks -> [W*b, ...] in rank order; gradients flow back to every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # Deprecated in torch 2.13 in favour of functional collectives, but it is the stable
        # autograd-aware gather that works on both gloo and NCCL.
        warnings.simplefilter("ignore")
        return torch.cat(all_gather(t), dim=0)


def _to_device(chunks: TokenChunks | None, device: torch.device) -> TokenChunks | None:
    if chunks is None:
        return None
    return TokenChunks(
        chunks=[{k: v.to(device, non_blocking=True) for k, v in c.items()} for c in chunks.chunks],
        order=chunks.order.to(device),
    )


def train_step(
    model: torch.nn.Module,
    shard: Shard,
    loss_fn: SamToNeLoss,
    *,
    keys: dict[str, torch.Tensor] | None,
    rank: int,
    precision: str = "fp32",
    guide: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Forward one worker's shard and return the loss of its own anchors (a scalar with grad).

    ``keys`` holds int64 duplicate keys of the GLOBAL batch (``query`` [B], ``doc`` [B],
    optionally ``negatives`` [B, K]) or None for no false-negative masking; ``guide`` the guide
    model's embeddings of this shard (``guide_embeddings``) or None.
    """
    device = next(model.parameters()).device
    with autocast(device, precision):
        q, d, n = model(
            _to_device(shard.queries, device), _to_device(shard.documents, device), _to_device(shard.negatives, device)
        )
    return shard_loss(q, d, n, loss_fn, keys=keys, rank=rank, guide=guide)


def shard_loss(
    q: torch.Tensor,
    d: torch.Tensor,
    n: torch.Tensor | None,
    loss_fn: SamToNeLoss,
    *,
    keys: dict[str, torch.Tensor] | None,
    rank: int,
    guide: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The loss of this worker's anchors against the global batch, from its local embeddings
    ``q`` [b, D], ``d`` [b, D], ``n`` [b*K, D] or None, and the guide model's embeddings of the
    same texts (``loss.guide``; no gradients). Shared by ``train_step`` and the gradient cache
    (gradcache.py) so both compute the same loss."""
    local = q.shape[0]
    q_all, d_all = gather_with_grad(q.float()), gather_with_grad(d.float())  # [B, D]
    hard = None
    if n is not None:
        hard = gather_with_grad(n.float().view(local, -1, n.shape[-1]))  # [B, K, D]
    if guide is not None:
        gq, gd, gn = guide
        guide = (gather_with_grad(gq), gather_with_grad(gd),
                 None if gn is None else gather_with_grad(gn.view(local, -1, gn.shape[-1])))
    keys = {k: v.to(q.device) for k, v in keys.items()} if keys else {}
    return loss_fn(q_all, d_all, hard, keys.get("query"), keys.get("doc"), keys.get("negatives"),
                   anchor_offset=rank * local, num_anchors=local, guide_embeddings=guide)


def load_guide(cfg: Config, device: torch.device) -> DualEncoder:
    """The frozen guide model of ``loss.guide`` (any model URI; ``ModelURIError`` names it)."""
    from samtone_ray.tracking.model_uri import resolve_model

    guide = DualEncoder.from_pretrained(resolve_model(cfg.loss.guide, cfg.tracking.uri or None).path).to(device).eval()
    guide.requires_grad_(False)
    return guide


def shard_for(model: DualEncoder, pairs: PairTable, rows: np.ndarray, cfg: Config) -> Shard:
    """``rows`` of ``pairs`` tokenised for ``model``: its tokenizer and max lengths, the run's
    hard negatives and chunk size (the guide's shard; the model's own uses the same lengths)."""
    return make_shard(pairs, rows, model.tokenizer, query_max_length=model.query_max_length,
                      doc_max_length=model.doc_max_length, num_negatives=cfg.data.num_hard_negatives,
                      chunk_size=cfg.train.chunk_size)


def guide_embeddings(guide: DualEncoder, shard: Shard, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The guide's ``(q [b, G], d [b, G], n [b*K, G] or None)`` of this rank's shard, tokenised
    with the guide's own tokenizer and lengths."""
    device = next(guide.parameters()).device
    with torch.no_grad(), autocast(device, precision):
        q, d, n = guide(_to_device(shard.queries, device), _to_device(shard.documents, device),
                        _to_device(shard.negatives, device))
    return q.float(), d.float(), None if n is None else n.float()


def batch_keys(pair_keys: PairKeys | None, indices: np.ndarray) -> dict[str, torch.Tensor] | None:
    return None if pair_keys is None else pair_keys.take(indices)


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- the Ray Train worker


@dataclass
class _State:
    step: int = 0  # optimizer steps done
    history: list | None = None  # [(step, epoch, batch_in_epoch, digest)] of batches trained into the weights


@dataclass
class _Run:
    """What a worker trains: the model (and its DDP wrapper), optimizer, schedule and progress."""

    model: DualEncoder
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    schedule: Schedule
    state: _State


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker function: restore, then step, evaluating and reporting when due."""
    import ray
    import ray.train

    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(cfg.scaling.cpus_per_worker)
    pairs = ray.get(loop_config["pairs"])  # a PairTable: views of the object store, not a copy
    # Every rank encodes a share of the evaluation (evaluate_model), so every rank needs the split.
    eval_split = ray.get(loop_config["eval"]) if loop_config.get("eval") is not None else None
    logger = _rank0_logger(loop_config, rank)
    meter = TrainMetrics(loop_config.get("run_id") or cfg.name, rank)
    output = open_store(loop_config["output_dir"])

    run = _restore(cfg, len(pairs), rank, world, logger)
    loss_fn = SamToNeLoss.from_config(cfg.loss)
    guide = load_guide(cfg, next(run.model.parameters()).device) if cfg.loss.guide else None
    batches = _Batches(cfg, pairs, run.model, run.schedule, rank, start=run.state.step, guide=guide)
    window = _Window()
    run.model.train()
    while run.state.step < run.schedule.total_steps:
        t0 = time.perf_counter()
        indices, shard, step_keys, guide_shard = batches.next()
        waited = time.perf_counter() - t0
        guided = None if guide is None else guide_embeddings(guide, guide_shard, cfg.train.precision)
        loss = _step(run, shard, loss_fn, step_keys, cfg, rank, guided)
        epoch, position = run.schedule.position(run.state.step - 1)
        run.state.history.append([run.state.step, epoch, position, batch_digest(indices)])

        global_loss, tokens = _all_reduce_mean_and_sum(loss.detach(), shard.num_tokens, world)
        window.add(time.perf_counter() - t0, waited, global_loss, tokens, cfg.train.batch_size)
        meter.step(step=run.state.step, seconds=time.perf_counter() - t0, waited=waited, loss=global_loss,
                   pairs=cfg.train.batch_size, tokens=tokens)
        if logger and (run.state.step % cfg.train.log_every == 0 or run.state.step == run.schedule.total_steps):
            logger.log_metrics(window.metrics() | {"lr": run.scheduler.get_last_lr()[0]}, run.state.step)
        metrics = {"step": run.state.step, "epoch": epoch, "loss": global_loss} | window.summary()
        _evaluate_and_report(run, metrics, cfg, eval_split, rank, world, logger, meter, output)
        _maybe_inject_fault(cfg, run.state.step, rank, world, loop_config)
    batches.close()

    if rank == 0:
        _save_outputs(run, output, logger)


def _save_outputs(run: _Run, output: Store, logger) -> None:
    """The final model and the history of trained batches, into ``output`` (and MLflow). On object
    storage both are written here first, then uploaded file by file (each file whole)."""
    with tempfile.TemporaryDirectory(prefix="samtone-model-") as tmp:
        local = Path(output.location) if not output.remote else Path(tmp)
        model_dir = run.model.save_pretrained(local / "model")
        history = local / HISTORY_FILE
        atomic_write_json(history, run.state.history)
        if output.remote:
            output.upload(model_dir, "model")
            output.write_bytes(HISTORY_FILE, history.read_bytes())
        if logger:
            logger.log_model(model_dir)
            logger.log_artifact(history)


def _restore(cfg: Config, num_pairs: int, rank: int, world: int, logger) -> _Run:
    """A fresh model, optimizer and schedule, or the state of the last checkpoint when Ray Train
    restarts the run (a lost worker, a resumed tuning run)."""
    import ray.train
    import ray.train.torch

    torch.manual_seed(cfg.train.seed)  # identical initialisation of any new layer on every rank
    model = DualEncoder.from_config(cfg.model)
    schedule = Schedule(num_pairs, cfg.train.batch_size, cfg.train.seed, cfg.train.epochs, cfg.train.max_steps)
    state = _State(history=[])
    ckpt = ray.train.get_checkpoint()
    saved = None
    if ckpt is not None:
        saved = _load_checkpoint(ckpt)
        model.load_state_dict(saved["model"])
        state = _State(step=saved["step"], history=saved["history"])
    ddp = ray.train.torch.prepare_model(model)  # moves to the device; wraps in DDP when world > 1
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=cfg.scaling.use_gpu
    )  # fused: one kernel for all parameters on CUDA instead of several per tensor
    scheduler = linear_schedule(optimizer, schedule.total_steps, cfg.train.warmup_ratio)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"][rank]["torch"])
        random.setstate(saved["rng"][rank]["python"])
        if torch.cuda.is_available() and saved["rng"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(saved["rng"][rank]["cuda"])
        log.info("rank %d resumed at step %d", rank, state.step)
        if logger:
            logger.set_tags({"resumed_at_step": state.step})
    else:
        torch.manual_seed(cfg.train.seed + 1000 * (rank + 1))  # per-rank dropout streams
        if logger:
            device = ray.train.torch.get_device()
            logger.set_tags({"workers": world, "device": str(device), "device_name": device_name(device),
                             "precision": resolve_precision(cfg.train.precision, device)})
    return _Run(model, ddp, optimizer, scheduler, schedule, state)


class _Batches:
    """This rank's shard of each global batch, tokenised on a thread while the previous one trains
    (the fast tokenizer drops the GIL), with the global batch's duplicate keys and, with a guide
    model, the shard tokenised again for the guide."""

    def __init__(self, cfg: Config, pairs: PairTable, model: DualEncoder, schedule: Schedule, rank: int, *, start: int,
                 guide: DualEncoder | None = None):
        self.cfg, self.pairs, self.model, self.schedule, self.rank = cfg, pairs, model, schedule, rank
        self.guide = guide
        self.keys = PairKeys.build(pairs, cfg.data.num_hard_negatives) if cfg.loss.mask_duplicates else None
        self.step = start
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = self.pool.submit(self._prepare, start) if start < schedule.total_steps else None

    def _prepare(self, step: int) -> tuple[np.ndarray, Shard, Shard | None]:
        cfg, per_worker = self.cfg, self.cfg.per_worker_batch_size()
        indices = self.schedule.batch(step)
        mine = indices[self.rank * per_worker : (self.rank + 1) * per_worker]
        shards = [shard_for(model, self.pairs, mine, cfg) for model in (self.model, self.guide) if model is not None]
        if cfg.scaling.use_gpu:
            shards = [pin_memory(shard) for shard in shards]
        return indices, shards[0], shards[1] if self.guide is not None else None

    def next(self) -> tuple[np.ndarray, Shard, dict[str, torch.Tensor] | None, Shard | None]:
        indices, shard, guide_shard = self.pending.result()
        self.step += 1
        if self.step < self.schedule.total_steps:
            self.pending = self.pool.submit(self._prepare, self.step)
        return indices, shard, batch_keys(self.keys, indices), guide_shard

    def close(self) -> None:
        self.pool.shutdown()


def _step(run: _Run, shard: Shard, loss_fn: SamToNeLoss, keys, cfg: Config, rank: int, guide=None) -> torch.Tensor:
    """One optimizer step on this rank's shard; returns its loss (detached use only)."""
    run.optimizer.zero_grad(set_to_none=True)
    if cfg.train.micro_batch_size:
        loss = grad_cache_step(run.ddp, shard, functools.partial(shard_loss, loss_fn=loss_fn, keys=keys, rank=rank, guide=guide),
                               micro_batch_size=cfg.train.micro_batch_size, precision=cfg.train.precision)
    else:
        loss = train_step(run.ddp, shard, loss_fn, keys=keys, rank=rank, precision=cfg.train.precision, guide=guide)
        loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    run.state.step += 1
    return loss


def _evaluate_and_report(run: _Run, metrics: dict[str, Any], cfg: Config, eval_split, rank: int, world: int,
                         logger, meter: TrainMetrics, output: Store) -> None:
    """When due, evaluate (every rank encodes its share) and report to Ray Train, with a
    checkpoint when one is due."""
    do_eval, do_ckpt = eval_and_checkpoint_due(run.state.step, run.schedule.total_steps, cfg.train)
    if not (do_eval or do_ckpt):
        return
    metrics["pairs"] = run.state.step * cfg.train.batch_size  # ASHA's clock in a tuning run
    # Collect every rank's RNG state first: no rank may sit in a collective while another one evaluates.
    rngs = _gather_rng_states() if do_ckpt else None
    if do_eval and eval_split is not None:
        # On the worker's own cores: more threads than Ray reserved only slow whatever else runs
        # there (another trial's steps took 28 % longer, the evaluation no less time).
        scores, per_query = evaluate_model(run.model, eval_split, cfg.train.eval_batch_size, cfg.train.precision,
                                           rank=rank, world=world, per_query=True)
        metrics |= scores
        if rank == 0:
            meter.evaluation(metrics)
            # Every evaluation's per-query values, by budget: intervals, and paired tests at equal budget.
            write_per_query(output.url(PER_QUERY_FILE), per_query, run.state.step, metrics["pairs"])
        if logger:
            logger.log_metrics({f"eval/{k}": v for k, v in metrics.items() if "@" in k}, run.state.step)
    _report(metrics, run, rank, rngs=rngs)


class _Window:
    """Throughput and data-wait figures since the last log."""

    def __init__(self) -> None:
        self.total_time = self.total_wait = 0.0
        self._reset()

    def _reset(self) -> None:
        self.time = self.wait = self.loss = 0.0
        self.tokens = self.pairs = self.steps = 0

    def add(self, seconds: float, waited: float, loss: float, tokens: int, pairs: int) -> None:
        self.time += seconds
        self.wait += waited
        self.loss += loss
        self.tokens += tokens
        self.pairs += pairs
        self.steps += 1
        self.total_time += seconds
        self.total_wait += waited

    def metrics(self) -> dict[str, float]:
        out = {
            "loss": self.loss / max(1, self.steps),
            "pairs_per_s": self.pairs / max(self.time, 1e-9),
            "tokens_per_s": self.tokens / max(self.time, 1e-9),
            "data_wait_share": self.wait / max(self.time, 1e-9),
        }
        self._reset()
        return out

    def summary(self) -> dict[str, float]:
        return {"data_wait_share": self.total_wait / max(self.total_time, 1e-9)}


def _all_reduce_mean_and_sum(loss: torch.Tensor, tokens: int, world: int) -> tuple[float, int]:
    packed = torch.tensor([float(loss), float(tokens)], dtype=torch.float64)
    if world > 1:
        if dist.get_backend() == "nccl":
            packed = packed.cuda()
        dist.all_reduce(packed)
        packed = packed.cpu()
    return float(packed[0]) / world, int(packed[1])


def eval_and_checkpoint_due(step: int, total_steps: int, train_cfg) -> tuple[bool, bool]:
    """(evaluate, checkpoint) after optimizer step ``step``: both at the end; evaluations every
    ``eval_every`` steps; checkpoints every ``checkpoint_every`` steps, with every evaluation
    when ``checkpoint_every`` is 0 (so a lost worker resumes from the last evaluation), or at the
    end only when it is ``END_ONLY``."""
    done = step == total_steps
    do_eval = done or bool(train_cfg.eval_every and step % train_cfg.eval_every == 0)
    if train_cfg.checkpoint_every == END_ONLY:
        return do_eval, done
    if train_cfg.checkpoint_every:
        return do_eval, done or step % train_cfg.checkpoint_every == 0
    return do_eval, do_eval


def _gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG states (rank order), so each rank's dropout stream resumes where it was.

    Only tensors, ints, tuples and None: the checkpoint loads with ``weights_only=True``."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": None}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [rng]
    rngs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng)
    return rngs


def _load_checkpoint(ckpt) -> dict[str, Any]:
    """The state of a Ray Train checkpoint. One on object storage is downloaded into a folder of this
    rank's own: ``as_directory`` shares one download among the processes of a node, and after a
    restart a rank then read a half-written state.pt ("PytorchStreamReader failed reading file")."""
    import pyarrow.fs as pafs

    if isinstance(ckpt.filesystem, pafs.LocalFileSystem):
        return load_state(Path(ckpt.path))
    with tempfile.TemporaryDirectory(prefix="samtone-ckpt-") as tmp:
        return load_state(Path(ckpt.to_directory(tmp)))


def load_state(directory: Path) -> dict[str, Any]:
    """A checkpoint's training state. ``weights_only=True``: a checkpoint is data, and a tampered
    one is refused instead of running the code a pickle can carry."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def _report(metrics, run: _Run, rank: int, *, rngs: list | None) -> None:
    import ray.train

    if rngs is None or rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(
            {
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "step": run.state.step,
                "history": run.state.history,
                "rng": rngs,
            },
            Path(tmp) / STATE_FILE,
        )
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step_{run.state.step:08d}"
        )


def _maybe_inject_fault(cfg: Config, step: int, rank: int, world: int, loop_config: dict) -> None:
    """Test hook (train.fail_at_step): the last worker dies once, as a lost node would.

    Every rank first waits until Ray Train's controller has taken its last report: a report sits
    in the worker's queue until the next health poll (every 2 s), and a worker that dies before
    that loses the checkpoint with it. Without the wait, whether the run resumes from the last
    checkpoint or from step 0 depends on timing, and the test of resume would be a coin toss.
    """
    if not cfg.train.fail_at_step or step != cfg.train.fail_at_step:
        return
    output, marker = open_store(loop_config["output_dir"]), ".fault_injected"
    if output.exists(marker):
        return
    from ray.train.v2._internal.execution.context import get_train_context

    get_train_context().get_result_queue().join()  # task_done() comes from the controller's poll
    if world > 1:
        dist.barrier()
    if rank != world - 1:
        return
    output.write_text(marker, str(step))
    os.kill(os.getpid(), signal.SIGKILL)


def _rank0_logger(loop_config: dict, rank: int):
    if rank != 0 or not loop_config.get("run_id"):
        return None
    from samtone_ray.tracking.runs import RunLogger

    return RunLogger(loop_config["tracking_uri"], loop_config["run_id"])


# --------------------------------------------------------------------------- the driver


def build_trainer(
    cfg: Config,
    *,
    pairs_ref,
    eval_ref,
    output_dir: str | Path,
    storage_path: str | Path,
    name: str,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    callbacks: list | None = None,
):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from samtone_ray.train.collectives import NodeInterfaceTorchConfig

    return TorchTrainer(
        train_loop,
        train_loop_config={
            "config": cfg.to_dict(),
            "pairs": pairs_ref,
            "eval": eval_ref,
            "output_dir": str(output_dir),
            "run_id": run_id,
            "tracking_uri": tracking_uri,
        },
        # The process-group timeout bounds how long a rank may wait in a collective for the others.
        # gloo / NCCL bound to the interface of each node's Ray IP, unless the user named one.
        torch_config=NodeInterfaceTorchConfig(
            backend="nccl" if cfg.scaling.use_gpu else "gloo", timeout_s=cfg.train.collective_timeout_s
        ),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker} | ({"GPU": 1} if cfg.scaling.use_gpu else {}),
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
        ),
    )


@dataclass
class TrainOutcome:
    metrics: dict[str, Any]
    model_dir: Path | str  # a URI when output_dir is one (s3://...)
    run_id: str | None
    model_uri: str | None


def train(cfg: Config, *, data=None) -> TrainOutcome:
    """Run one training job (driver side): data into the object store, MLflow run, fit."""
    import ray

    from samtone_ray.tracking import runs as tracking

    cfg = cfg.with_output_dir()
    connect_ray()
    output = open_store(cfg.output_dir)  # a local folder or object storage (s3://bucket/run)
    uri = tracking.tracking_uri(cfg.tracking.uri) if cfg.tracking.enabled else None
    check_ray_cluster(uri, output.location)
    pairs, eval_split = data or load_data(cfg)
    pairs = PairTable.of(pairs)  # every worker maps this one table: see pairs.py
    if output.exists("model"):
        log.warning("%s exists and will be replaced when this run finishes", output.url("model"))
    run_id = None
    if cfg.tracking.enabled:
        params = cfg.flat() | (eval_split.corpus_params() if eval_split is not None else {})
        run_id = tracking.start_run(uri, cfg.tracking.experiment, cfg.name, params, tags={"samtone.kind": "train"})
    trainer = build_trainer(
        cfg,
        pairs_ref=ray.put(pairs),
        eval_ref=ray.put(eval_split) if eval_split is not None else None,
        output_dir=output.location,
        storage_path=output.url("ray"),  # Ray Train opens URIs itself (pyarrow.fs), as we do
        name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        run_id=run_id,
        tracking_uri=uri,
    )
    try:
        result = trainer.fit()
    except BaseException:
        if run_id:
            tracking.RunLogger(uri, run_id).finish("FAILED")
        raise
    if run_id:
        tracking.RunLogger(uri, run_id).finish("FINISHED")
    return TrainOutcome(
        metrics=dict(result.metrics or {}),
        model_dir=output.url("model") if output.remote else Path(output.url("model")),
        run_id=run_id,
        model_uri=run_model_uri(run_id) if run_id else None,
    )

