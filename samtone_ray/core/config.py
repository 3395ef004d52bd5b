"""Typed configuration: one dataclass tree, loaded from YAML, with dotted overrides.

The dataclasses below are the schema and the only source of defaults. Every key is addressed by
its dotted path (``train.batch_size``): the same names are used by ``--set`` overrides, MLflow
params and the tuning space (``tune.space``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from samtone_ray.core import choices as settings
from samtone_ray.core.choices import Mode, NegativeSampling, NegativeSource, Pooling, Precision, SameTower, Scheduler, TowerMode, TuneAlgorithm
from samtone_ray.core.choices import GuideMargin, PlacementStrategy
from samtone_ray.core.redact import has_credentials, redact_uri
from samtone_ray.core.storage import StorageError, is_uri, normalize

BUNDLED_SAMPLE = "bundled:debian"
"""Placeholder for the Debian sample shipped inside the package (resolved by ``resolve_data_path``)."""


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the dotted key."""


class CombinationError(ConfigError):
    """Each value is valid alone but the combination is not (a tuning run skips such trials)."""


@dataclass
class ModelConfig:
    name_or_path: str = "all-MiniLM-L6-v2"
    tower_mode: TowerMode = "shared"
    pooling: Pooling = "mean"
    projection_dim: int = 0
    query_max_length: int = 32
    doc_max_length: int = 128

    def __post_init__(self) -> None:
        with _as(ConfigError):
            settings.validate_layout(
                self.tower_mode, self.pooling, self.projection_dim, self.query_max_length, self.doc_max_length,
                prefix="model.",
            )


@dataclass
class DataConfig:
    train: str = BUNDLED_SAMPLE
    train_split: str = "train"
    eval: str = BUNDLED_SAMPLE
    eval_split: str = "dev"
    num_hard_negatives: int = 0
    negatives: NegativeSource = "file"
    """Where hard negatives come from: ``file``, data.train's ``negatives`` column; ``bm25`` / ``dense``,
    mined from data.train (a BEIR folder) with the ``mining:`` settings before training, once per
    setting (``mining.prepare``); ``none``, no hard negatives."""
    mining_model: str = ""
    """The dense miner's model URI; empty = model.name_or_path (the zero-shot model)."""

    def __post_init__(self) -> None:
        if self.num_hard_negatives < 0:
            raise ConfigError(f"data.num_hard_negatives must be >= 0, got {self.num_hard_negatives}")
        if self.negatives not in settings.NEGATIVE_SOURCES:
            raise ConfigError(f"data.negatives must be one of {settings.NEGATIVE_SOURCES}; got {self.negatives!r}")
        if self.negatives == "none" and self.num_hard_negatives:
            raise CombinationError(f"data.negatives=none trains without hard negatives, but "
                                   f"data.num_hard_negatives={self.num_hard_negatives}")
        if self.negatives in ("bm25", "dense") and not self.num_hard_negatives:
            raise CombinationError(f"data.negatives={self.negatives} mines hard negatives that "
                                   "data.num_hard_negatives=0 would not use")


@dataclass
class MiningConfig:
    """Hard-negative mining filters (``samtone mine``), as sentence-transformers'
    ``mine_hard_negatives`` defines them; scores are the retriever's (cosine or BM25)."""

    num_negatives: int = 3
    range_min: int = 0
    """Skip this many best-scoring candidates that pass the score filters (likely unjudged positives)."""
    range_max: int | None = None
    """Pick among the first ``range_max`` candidates that pass; null = ``range_min + num_negatives``
    (x10 when a margin or max_score is set) ``+`` the most positives a query has."""
    max_score: float | None = None
    min_score: float | None = None
    absolute_margin: float | None = None
    """Keep a candidate only if its score <= (the query's lowest positive score) - margin."""
    relative_margin: float | None = None
    """Keep a candidate only if its score <= p - |p| * margin, p the query's lowest positive score
    (p * (1 - margin) for p >= 0; NV-Retriever's TopK-PercPos at 95 % is 0.05)."""
    sampling: NegativeSampling = "top"
    seed: int = 0
    """Seed of ``sampling: random``."""

    def __post_init__(self) -> None:
        if isinstance(self.num_negatives, bool) or not isinstance(self.num_negatives, int) or self.num_negatives < 1:
            raise ConfigError(f"mining.num_negatives must be an integer >= 1, got {self.num_negatives!r}")
        if isinstance(self.range_min, bool) or not isinstance(self.range_min, int) or self.range_min < 0:
            raise ConfigError(f"mining.range_min must be an integer >= 0, got {self.range_min!r}")
        if self.range_max is not None and self.num_negatives > self.range_max - self.range_min:
            raise ConfigError(
                f"mining.range_max={self.range_max} leaves {self.range_max - self.range_min} candidates after "
                f"mining.range_min={self.range_min}, fewer than mining.num_negatives={self.num_negatives}"
            )
        for name in ("max_score", "min_score", "absolute_margin", "relative_margin"):
            if getattr(self, name) is not None:
                require_finite(f"mining.{name}", getattr(self, name))
        for name in ("absolute_margin", "relative_margin"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"mining.{name} must be >= 0 (or null = off), got {getattr(self, name)}")
        if None not in (self.min_score, self.max_score) and self.min_score > self.max_score:
            raise ConfigError(f"mining.min_score={self.min_score} is above mining.max_score={self.max_score}: "
                              "no candidate could pass")
        if self.sampling not in settings.NEGATIVE_SAMPLINGS:
            raise ConfigError(f"mining.sampling must be one of {settings.NEGATIVE_SAMPLINGS}; got {self.sampling!r}")

    @property
    def filters_scores(self) -> bool:
        return any(v is not None for v in (self.absolute_margin, self.relative_margin, self.max_score))

    def window(self, max_positives: int) -> int:
        """``range_max``, or its default for queries with at most ``max_positives`` positives."""
        if self.range_max is not None:
            return self.range_max
        return self.range_min + self.num_negatives * (10 if self.filters_scores else 1) + max_positives


HYPERPARAMETER = {"hyperparameter": True}
"""Field metadata of the settings that change what a model learns: they are logged as the loss's
MLflow params and get a leaderboard column of their own (``hyperparameter_keys``)."""


@dataclass
class LossConfig:
    same_tower: SameTower = field(default="both", metadata=HYPERPARAMETER)
    bidirectional: bool = field(default=True, metadata=HYPERPARAMETER)
    temperature: float = field(default=0.05, metadata=HYPERPARAMETER)
    mask_duplicates: bool = True
    same_tower_weight: float = field(default=1.0, metadata=HYPERPARAMETER)
    """alpha >= 0 multiplies each same-tower term of a softmax denominator (1 = SamToNe, 0 = plain in-batch)."""
    false_negative_margin: float | None = field(default=None, metadata=HYPERPARAMETER)
    """Drop each negative whose cosine to the anchor exceeds the positive's plus this margin (null = off)."""
    guide: str = ""
    """A frozen guide model (any model URI) for guided false-negative filtering, as GISTEmbed does:
    each negative the guide scores above the anchor's positive (less ``guide_margin``) leaves that
    anchor's softmax. Empty = off."""
    guide_margin: float = 0.0
    guide_margin_type: GuideMargin = "absolute"
    """``absolute``: drop a negative whose guide score exceeds p - margin; ``relative``: p * (1 - margin),
    p the guide's score of the positive (sentence-transformers' GISTEmbedLoss margin strategies).
    Not leaderboard columns of their own: a search that varies them shows them as it shows any varied key."""
    anchor_chunk_size: int = 0
    """Anchors per loss chunk (0 = all at once): bounds the logits to [chunk, candidates] for big batches."""

    def hyperparameters(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("hyperparameter")}

    def __post_init__(self) -> None:
        if type(self.anchor_chunk_size) is not int or self.anchor_chunk_size < 0:
            raise ConfigError(f"loss.anchor_chunk_size must be an int >= 0 (0 = off), got {self.anchor_chunk_size!r}")
        with _as(ConfigError):
            settings.check_temperature(self.temperature, prefix="loss.")
        with _as(CombinationError):
            settings.check_loss_combination(self.same_tower, self.bidirectional, prefix="loss.")
        with _as(ConfigError):
            settings.check_loss_knobs(self.same_tower_weight, self.false_negative_margin, prefix="loss.")
        if not isinstance(self.guide, str):
            raise ConfigError(f"loss.guide must be a model URI (a string; empty = off), got {self.guide!r}")
        if self.guide_margin_type not in ("absolute", "relative"):
            raise ConfigError(f"loss.guide_margin_type must be absolute or relative, got {self.guide_margin_type!r}")
        require_finite("loss.guide_margin", self.guide_margin)
        if isinstance(self.guide_margin, bool) or not isinstance(self.guide_margin, (int, float)):
            raise ConfigError(f"loss.guide_margin must be a number, got {self.guide_margin!r}")


END_ONLY = -1
"""``train.checkpoint_every`` value for a checkpoint at the end of training only."""


@dataclass
class TrainConfig:
    batch_size: int = field(default=64, metadata=HYPERPARAMETER)
    """The GLOBAL batch: split evenly over the workers; negatives come from all of it."""
    lr: float = field(default=5e-5, metadata=HYPERPARAMETER)
    weight_decay: float = 0.01
    epochs: int = 1
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    warmup_ratio: float = 0.1
    seed: int = 42
    precision: Precision = "auto"
    """auto = bf16 where the device multiplies bf16 natively (recent GPUs, AMX CPUs), else fp32.
    int8 is inference-only and refused here."""
    eval_every: int = 16
    """Evaluate every N steps (0 = only at the end); ASHA decides on these evaluations. 16 puts
    ASHA's first milestone a third of the way into the demo's 47-step epoch: at 25 it came after
    more than half, and stopping a trial there saved too little to be worth the early stop."""
    checkpoint_every: int = 0
    """Checkpoint every N steps; 0 = with every evaluation (and at the end), so a lost worker
    resumes from the last evaluation instead of step 0; -1 = at the end only."""
    collective_timeout_s: int = 1800
    """Process-group timeout: how long a worker waits in a collective for the others."""
    chunk_size: int = 16
    """Texts encoded per forward chunk, sorted by length so each chunk pads only to its own longest.
    A pure speed knob: on a 2-core CPU (fp32, the demo) 16 made a step 26 % faster than 32 and 8 no
    faster than 16 (benchmarks/results/demo_profile.json); GPUs want larger chunks (64-256)."""
    micro_batch_size: int = 0
    """Gradient cache (0 = off): encode the batch without a graph, then re-encode it with grad in
    micro-batches of at most this many texts (whole chunks: >= chunk_size), so activation memory
    no longer grows with batch_size. Same loss and gradients as without (gradcache.py)."""
    eval_batch_size: int = 128
    eval_max_docs: int = 1000
    """Documents each evaluation searches (0 = the whole corpus): every document the eval qrels
    judge plus a fixed random sample of the rest (independent of ``seed``), chosen once when the
    data is loaded, so every trial, the zero-shot reference and the champion re-evaluation score
    on the same documents. Fewer distractors raise the metrics: compare only at equal values."""
    log_every: int = 10
    """Log loss, learning rate and throughput to MLflow every N steps."""
    fail_at_step: int = 0
    """Fault injection for tests: the last worker kills itself once after this step (0 = never)."""

    def __post_init__(self) -> None:
        for key in ("batch_size", "epochs", "chunk_size", "eval_batch_size", "log_every", "collective_timeout_s"):
            _positive(f"train.{key}", getattr(self, key))
        for key in ("max_steps", "eval_every", "fail_at_step", "micro_batch_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.checkpoint_every < END_ONLY:
            raise ConfigError(f"train.checkpoint_every must be >= 0, or {END_ONLY} (end only), got {self.checkpoint_every}")
        _positive("train.lr", self.lr)
        if self.eval_max_docs < 0:
            raise ConfigError(f"train.eval_max_docs must be >= 0 (0 = the whole corpus), got {self.eval_max_docs}")
        if self.micro_batch_size and self.micro_batch_size < self.chunk_size:
            raise ConfigError(
                f"train.micro_batch_size must be 0 (off) or >= train.chunk_size={self.chunk_size} (a chunk "
                f"is the smallest forward), got {self.micro_batch_size}"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        with _as(ConfigError):
            settings.check_precision(self.precision, prefix="train.", training=True)


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 3
    """Worker-group restarts allowed; training resumes from the last checkpoint each time."""
    placement_strategy: PlacementStrategy = "PACK"
    """How the workers are placed on nodes: PACK (fewest nodes), SPREAD or STRICT_SPREAD (one per node)."""

    def __post_init__(self) -> None:
        _positive("scaling.num_workers", self.num_workers)
        _positive("scaling.cpus_per_worker", self.cpus_per_worker)
        with _as(ConfigError):
            settings.check_placement_strategy(self.placement_strategy, prefix="scaling.")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""
    """MLflow tracking URI; empty = $MLFLOW_TRACKING_URI, else SQLite under ``.samtone/``."""
    experiment: str = "samtone"

    def __post_init__(self) -> None:
        # A config is echoed, copied into tuning state and uploaded by `samtone submit`: no place for a secret.
        if has_credentials(self.uri):
            raise ConfigError(
                f"tracking.uri={redact_uri(self.uri)} carries a password or token: give the URI without it and set "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), which MLflow reads"
            )


@dataclass
class TuneConfig:
    metric: str = "mrr@10"
    mode: Mode = "max"
    num_samples: int = 1
    algorithm: TuneAlgorithm = "grid"
    scheduler: Scheduler = "asha"
    grace_period: int = 1
    """ASHA: evaluations a trial always gets before it may be stopped."""
    max_concurrent_trials: int | Literal["auto"] = "auto"
    reference: str = ""
    """Trial the leaderboard tests every other against: a trial id, or dotted settings
    (``loss.same_tower=none,train.batch_size=64``: the best trial matching them); empty = the
    best ``loss.same_tower=none`` trial when there is one, else the best trial."""
    seeds: int = 1
    """Training seeds per configuration (grid search): ``train.seed``, ``train.seed + 1``, ... Each
    seed is a trial of its own, which ASHA judges on its own; the leaderboard adds a table by
    configuration (mean and spread over seeds, a paired test pooled over seeds) and the champion
    comes from the configuration with the best mean."""
    results_dir: str = ""
    """A folder (e.g. under ``results/``, committed) where every tuning run adds each trial that
    ended: ``<configuration>-seed<N>/summary.json`` and its ``per_query.parquet``, plus
    ``progress.md`` over all of them, so a study too long for one session grows run by run."""
    analyze: bool = False
    """At the end, run ``samtone analyze`` on the best trial and its reference (``<output_dir>/analysis``)."""
    space: dict[str, Any] = field(
        default_factory=lambda: {"loss.same_tower": {"grid": ["none", "query", "doc", "both"]}}
    )

    def __post_init__(self) -> None:
        _positive("tune.num_samples", self.num_samples)
        _positive("tune.grace_period", self.grace_period)
        _positive("tune.seeds", self.seeds)
        if self.seeds > 1 and self.algorithm != "grid":
            # A sampler draws configurations one trial at a time: it has no way to repeat a draw per seed.
            raise ConfigError(f"tune.seeds={self.seeds} needs tune.algorithm: grid (got {self.algorithm})")
        if self.seeds > 1 and "train.seed" in self.space:
            raise ConfigError("tune.space.train.seed and tune.seeds both set the training seeds: use one")
        if self.max_concurrent_trials != "auto":
            _positive("tune.max_concurrent_trials", self.max_concurrent_trials)


@dataclass
class RegistryConfig:
    model_name: str = "samtone"
    alias: str = "champion"
    min_delta: float = 0.0
    """The alias moves only when the candidate beats the incumbent by more than this."""
    require_significance: bool = False
    """Also require the paired difference vs the incumbent (same queries) to have a 95% CI above 0."""

    def __post_init__(self) -> None:
        if not self.min_delta >= 0:  # also refuses NaN
            raise ConfigError(f"registry.min_delta must be >= 0, got {self.min_delta}")


@dataclass
class ServeConfig:
    """``samtone serve``: batching, request limits and champion polling (docs/serving.md)."""

    max_batch_size: int = 64
    """Texts per forward batch (each input of a request enters the batch on its own)."""
    max_batch_tokens: int = 8192
    """Padded tokens per forward batch as well (texts x longest); 0 = count texts only."""
    batch_wait_timeout_s: float = 0.005
    max_ongoing_requests: int = 256
    """Requests per replica; must be >= max_batch_size, or batches of one-text requests never fill."""
    max_pending_texts: int = 4096
    """Texts admitted but not yet embedded, per replica; beyond it: 429 with Retry-After."""
    max_inputs: int = 256
    max_input_chars: int = 20000
    max_body_bytes: int = 4_000_000
    max_top_k: int = 100
    max_search_results: int = 1000
    """Queries x top_k per /search request: each hit carries its document's text."""
    body_timeout_s: float = 10.0
    """A request body must arrive within this; else 408 (a client that stops mid-body)."""
    request_timeout_s: float = 60.0
    """Ray Serve's end-to-end limit per request (http_options.request_timeout_s); then 408."""
    keep_alive_timeout_s: int = 5
    """An idle connection is closed this long after its last response (http_options.keep_alive_timeout_s)."""
    poll_interval_s: float = 30.0
    """Re-resolve a models:/NAME@ALIAS URI this often (0 = only on reconfigure)."""
    index_batch_size: int = 128
    precision: Precision = "fp32"
    """fp32, bf16 (autocast; auto = bf16 where native) or int8 (dynamic int8 linear layers, CPU
    only; speed and quality cost measured in docs/encoding-and-indexing.md, "Precision")."""

    def __post_init__(self) -> None:
        for key in ("max_batch_size", "max_ongoing_requests", "max_pending_texts",
                    "max_inputs", "max_input_chars", "max_body_bytes", "max_top_k", "max_search_results",
                    "body_timeout_s", "request_timeout_s", "keep_alive_timeout_s", "index_batch_size"):
            _positive(f"serve.{key}", getattr(self, key))
        for key in ("max_batch_tokens", "batch_wait_timeout_s", "poll_interval_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"serve.{key} must be >= 0, got {getattr(self, key)}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError(
                f"serve.max_ongoing_requests={self.max_ongoing_requests} must be >= serve.max_batch_size="
                f"{self.max_batch_size}, or batches of one-text requests never fill"
            )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    output_dir: str = ""
    """Where models, checkpoints and leaderboards go: a folder, or object storage (``s3://bucket/run``,
    credentials from the nodes' AWS_* environment); empty = ``.samtone/runs/<name>-<timestamp>``."""
    name: str = "samtone"

    def __post_init__(self) -> None:
        if is_uri(self.output_dir):
            try:
                normalize(self.output_dir)
            except StorageError as exc:
                raise ConfigError(f"output_dir: {exc}") from None
        if self.train.batch_size % self.scaling.num_workers:
            raise ConfigError(
                f"train.batch_size={self.train.batch_size} is the global batch and must be divisible "
                f"by scaling.num_workers={self.scaling.num_workers}"
            )

    @staticmethod
    def hyperparameter_keys() -> list[str]:
        """Dotted keys of the fields marked ``HYPERPARAMETER``, in schema order (loss, then train)."""
        return [f"{section.name}.{f.name}" for section in dataclasses.fields(Config)
                if dataclasses.is_dataclass(section.default_factory)
                for f in dataclasses.fields(section.default_factory) if f.metadata.get("hyperparameter")]

    def with_output_dir(self) -> "Config":
        """This config with ``output_dir`` fixed (a fresh timestamped folder when empty)."""
        if self.output_dir:
            return self
        import time

        return self.with_overrides({"output_dir": f".samtone/runs/{self.name}-{time.strftime('%Y%m%d-%H%M%S')}"})

    def per_worker_batch_size(self) -> int:
        return self.train.batch_size // self.scaling.num_workers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self, *, include: tuple[str, ...] = ("model", "data", "mining", "loss", "train", "scaling")) -> dict[str, Any]:
        """Dotted key -> value for the training sections (the MLflow params)."""
        return {k: v for k, v in flatten(self.to_dict()).items() if k.split(".")[0] in include}

    def with_overrides(self, overrides: dict[str, Any]) -> "Config":
        data = self.to_dict()
        for key, value in _migrate_overrides(overrides).items():
            _set_dotted(data, key, value)
        return from_dict(data)

    def to_yaml(self) -> str:
        """The config as YAML for display: a URI's password or token is masked (``redact_uri``)."""
        return redact_uri(yaml.safe_dump(self.to_dict(), sort_keys=False))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        # tune.space is a leaf: its keys are themselves dotted paths.
        if isinstance(value, dict) and dotted != "tune.space":
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def from_dict(data: dict[str, Any], *, source: str | Path | None = None) -> Config:
    """Build and validate a Config from a nested dict; unknown keys and bad types name the key.

    ``source`` (a file the dict was read from) is named by the warning about a renamed section."""
    return _build(Config, migrate_sections(data or {}, source), "")


RENAMED_SECTIONS = {"search": "tune"}
"""Old section name -> new name. The old name is still read, with a FutureWarning, until
samtone-ray 0.3: ``search`` (hyperparameter search) became ``tune`` so that "search" means top-k
retrieval only."""


def _renamed_warning(old: str, new: str, where: str) -> None:
    warnings.warn(f"{where}the config section '{old}' is now '{new}'; '{old}' goes in samtone-ray 0.3",
                  FutureWarning, stacklevel=4)


def migrate_sections(data: dict[str, Any], source: str | Path | None = None) -> dict[str, Any]:
    """``data`` with every renamed section (``RENAMED_SECTIONS``) under its new name, warning once
    per old name found; both names at once is a ConfigError. ``data`` itself is not modified."""
    if not isinstance(data, dict):
        return data
    where = f"{source}: " if source else ""
    for old, new in RENAMED_SECTIONS.items():
        if old not in data:
            continue
        if new in data:
            raise ConfigError(
                f"{where}both sections '{old}' and '{new}' are set: '{old}' is the old name of '{new}'; keep only '{new}'"
            )
        _renamed_warning(old, new, where)
        data = {(new if key == old else key): value for key, value in data.items()}
    return data


def _migrate_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Dotted overrides with a renamed section's old name (``search.metric``) under the new one
    (``tune.metric``), with the same FutureWarning; old and new spellings of one key is a ConfigError."""
    out: dict[str, Any] = {}
    renamed: dict[str, list[str]] = {}
    for key, value in overrides.items():
        section, dot, rest = key.partition(".")
        if section in RENAMED_SECTIONS:
            new_key = RENAMED_SECTIONS[section] + dot + rest
            if new_key in overrides:
                raise ConfigError(f"both {key} and {new_key} are set: '{section}' is the old name of "
                                  f"'{RENAMED_SECTIONS[section]}'; keep only {new_key}")
            renamed.setdefault(section, []).append(key)
            key = new_key
        out[key] = value
    for section, keys in renamed.items():
        _renamed_warning(section, RENAMED_SECTIONS[section], f"override {', '.join(keys)}: ")
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load YAML (or the embedded defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = migrate_sections(data, path)  # before the overrides, which use the new names
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in _migrate_overrides(overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise type(exc)(f"{path}: {exc}" if path else str(exc)) from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "loss.same_tower=none"]`` -> typed values (parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if parts[:2] == ["tune", "space"] and len(parts) > 2:
        data.setdefault("tune", {}).setdefault("space", {})[".".join(parts[2:])] = value
        return
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]} (valid keys under {prefix.rstrip('.') or 'the top level'}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key + ".")
        else:
            kwargs[name] = _coerce(key, hint, value)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - dataclass constructor errors
        raise ConfigError(f"{prefix.rstrip('.')}: {exc}") from exc


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            # YAML reads `none` as a string but `null`/`~` as None; accept both spellings of "none".
            if value is None and "none" in choices:
                return "none"
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _coerce(key, option, value)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} fits none of: " + "; ".join(errors))
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key} must be null; got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer; got {value!r}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key} must be a number; got {value!r}")
        require_finite(key, number)
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string; got {value!r}")
    if origin is dict:
        if isinstance(value, dict):
            require_finite(key, value)
            return dict(value)
        raise ConfigError(f"{key} must be a mapping; got {value!r}")
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover


@contextlib.contextmanager
def _as(error: type[ConfigError]):
    """Re-raise a settings validator's ValueError as ``error`` (its message already names the key)."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as exc:
        raise error(str(exc)) from None


def _positive(key: str, value: float) -> None:
    if not value > 0:  # also refuses NaN
        raise ConfigError(f"{key} must be > 0, got {value}")


def require_finite(key: str, value: Any) -> None:
    """Refuse NaN and infinities anywhere in ``value`` (nested lists/mappings: tune.space)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number; got {value!r}")
    if isinstance(value, dict):
        for name, item in value.items():
            require_finite(f"{key}.{name}", item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            require_finite(f"{key}[{i}]", item)
