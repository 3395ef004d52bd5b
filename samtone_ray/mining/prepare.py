"""Mined negatives for training and tuning (``data.negatives: bm25 | dense``), once per setting.

The mined pairs are content-addressed: their file name hashes the training data's bytes, the
split, the retriever, the miner's weights fingerprint (dense) and the ``mining:`` settings. A
run whose setting was mined before (by ``samtone train``, a tuning run, another trial) reads the
file instead of mining again; two processes mining one setting at once take turns on a lock.

A tuning run may vary the mining as grid keys (``data.negatives``, ``data.mining_model``,
``mining.*``): every distinct setting of the grid is mined once, before the trials
(``prepare_search``), and each trial trains on the pairs of its own setting (``mining_setting``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from samtone_ray.core.config import Config, ConfigError
from samtone_ray.data.sources import DataError, resolve_data_path

log = logging.getLogger(__name__)

DEFAULT_MINED_DIR = Path(".samtone/cache/mined")
_MINED_KEYS = ("data.negatives", "data.mining_model")


def _files_digest(root: Path, split: str) -> str:
    h = hashlib.sha256()
    for path in (root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / f"{split}.tsv"):
        if not path.is_file():
            raise DataError(f"{path}: data.negatives mines from a BEIR folder, and this file is missing")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def mining_identity(cfg: Config) -> dict[str, Any]:
    """What the mined pairs of ``cfg`` depend on (and nothing else: not its path, not training settings)."""
    root = Path(resolve_data_path(cfg.data.train))
    identity = {"data": _files_digest(root, cfg.data.train_split), "split": cfg.data.train_split,
                "retriever": cfg.data.negatives, "mining": asdict(cfg.mining)}
    if cfg.data.negatives == "dense":
        from samtone_ray.tracking.model_uri import resolve_model

        model = resolve_model(cfg.data.mining_model or cfg.model.name_or_path, cfg.tracking.uri or None)
        identity["model"] = model.fingerprint
    return identity


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_negatives(cfg: Config, mined_dir: Path = DEFAULT_MINED_DIR, *, show_progress: bool = False) -> Config:
    """``cfg`` training on mined pairs when ``data.negatives`` is ``bm25`` or ``dense`` (mined now
    unless this setting was mined before), else ``cfg`` itself. Pairs whose query got no negative
    are left out: training with ``data.num_hard_negatives`` > 0 needs one in every pair."""
    if cfg.data.negatives not in ("bm25", "dense"):
        return cfg
    from samtone_ray.mining.job import MineOptions, format_report, run_mine

    key = hashlib.sha256(json.dumps(mining_identity(cfg), sort_keys=True).encode()).hexdigest()[:24]
    out = Path(mined_dir).resolve() / f"{cfg.data.negatives}-{key}.parquet"
    with _locked(out.with_suffix(".lock")):
        if out.is_file():
            log.info("hard negatives: %s (mined before with these settings)", out)
        else:
            model = (cfg.data.mining_model or cfg.model.name_or_path) if cfg.data.negatives == "dense" else None
            result = run_mine(MineOptions(data=cfg.data.train, out=out, split=cfg.data.train_split,
                                          retriever=cfg.data.negatives, model=model, mining=cfg.mining,
                                          tracking_uri=cfg.tracking.uri or None, show_progress=show_progress,
                                          drop_empty=True))
            log.info("hard negatives: %s mined into %s\n%s", cfg.data.negatives, out, format_report(result.report))
    return cfg.with_overrides({"data.train": str(out), "data.negatives": "file"})


def is_mining_key(key: str) -> bool:
    return key in _MINED_KEYS or key.startswith("mining.")


def mining_setting(cfg: Config) -> str:
    """What decides the pairs ``cfg`` trains on, as a key: its mining setting when it mines, else ''."""
    if cfg.data.negatives not in ("bm25", "dense"):
        return ""
    model = cfg.data.mining_model or cfg.model.name_or_path if cfg.data.negatives == "dense" else ""
    return json.dumps({"negatives": cfg.data.negatives, "model": model, "mining": asdict(cfg.mining)}, sort_keys=True)


def check_not_sampled(sampled: set[str]) -> None:
    """Refuse a sampled (``choice``, ``uniform``, ...) mining key: what a trial will draw is not
    known before the trials, when each setting is mined once. Grid keys may vary the mining."""
    varied = sorted(k for k in sampled if is_mining_key(k))
    if varied:
        raise ConfigError(f"tune.space samples {varied[0]}: a tuning run mines each setting once, before the trials, "
                          f"so it can vary the mining only as a grid ({{grid: [...]}})")


def prepare_search(cfg: Config, combinations: list[dict[str, Any]], mined_dir: Path = DEFAULT_MINED_DIR,
                   *, show_progress: bool = False) -> dict[str, Config]:
    """For each distinct mining setting among ``cfg`` with each of ``combinations`` (grid
    combinations; ``[{}]`` for none), the config of its mined pairs (``prepare_negatives``), by
    ``mining_setting``. Mined once per setting, in the order the grid lists them."""
    settings: dict[str, Config] = {}
    for combination in combinations or [{}]:
        trial = cfg.with_overrides(combination)
        settings.setdefault(mining_setting(trial), trial)
    if len(settings) > 1:
        log.info("hard negatives: %d mining settings in this search, each mined once", len(settings))
    return {key: prepare_negatives(trial, mined_dir, show_progress=show_progress) for key, trial in settings.items()}
