"""The choice types of every setting and their validation, defined once.

``config.py`` (the YAML schema), ``towers.py`` and ``losses.py`` all import the ``Literal`` types
and call the validators below, so a setting is accepted or refused by the same rule whether it
comes from a config file, a tuning space or a direct call. Validators raise ``ValueError`` naming
the setting as ``prefix + name`` (``config.py`` passes ``"model."`` and re-raises as ConfigError).
Pure Python: importing this module loads neither torch nor Ray.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, get_args

TowerMode = Literal["shared", "separate", "separate_shared_projection"]
Pooling = Literal["mean", "cls"]
Side = Literal["query", "doc"]
SameTower = Literal["none", "query", "doc", "both"]
Precision = Literal["auto", "fp32", "bf16", "int8"]
"""``int8`` (dynamic int8 quantisation of the encoders' linear layers, CPU only) is for inference
(evaluation, re-encoding, serving), never training: ``check_precision`` refuses it there."""
TuneAlgorithm = Literal["grid", "random", "optuna"]
Scheduler = Literal["asha", "none"]
Mode = Literal["max", "min"]
NegativeSampling = Literal["top", "random"]
"""How mined hard negatives are picked from a query's filtered candidates: the best-scoring ones, or a
seeded random sample of them (``MiningConfig.sampling``)."""
NegativeSource = Literal["none", "file", "bm25", "dense"]
GuideMargin = Literal["absolute", "relative"]
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_SPREAD"]
"""Where Ray puts the training workers: PACK on as few nodes as possible (the default: collectives
stay inside a node), SPREAD over as many nodes as it can, STRICT_SPREAD each on a node of its own
(the run waits until there are enough nodes)."""

TOWER_MODES: tuple[str, ...] = get_args(TowerMode)
POOLINGS: tuple[str, ...] = get_args(Pooling)
SAME_TOWER_CHOICES: tuple[str, ...] = get_args(SameTower)
PRECISIONS: tuple[str, ...] = get_args(Precision)
PLACEMENT_STRATEGIES: tuple[str, ...] = get_args(PlacementStrategy)
NEGATIVE_SAMPLINGS: tuple[str, ...] = get_args(NegativeSampling)
NEGATIVE_SOURCES: tuple[str, ...] = get_args(NegativeSource)


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


def validate_layout(
    tower_mode: str,
    pooling: str,
    projection_dim: int | None,
    query_max_length: int,
    doc_max_length: int,
    *,
    prefix: str = "",
) -> int:
    """Check the tower layout settings; returns ``projection_dim`` with None as 0."""
    if tower_mode not in TOWER_MODES:
        raise ValueError(f"{prefix}tower_mode must be one of {TOWER_MODES}; got {tower_mode!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"{prefix}pooling must be one of {POOLINGS}; got {pooling!r}")
    projection_dim = 0 if projection_dim is None else projection_dim
    if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim < 0:
        raise ValueError(f"{prefix}projection_dim must be an int >= 0 or None; got {projection_dim!r}")
    if tower_mode == "separate_shared_projection" and projection_dim == 0:
        raise ValueError(
            f"{prefix}tower_mode=separate_shared_projection (ADE-SPL) needs {prefix}projection_dim > 0"
        )
    check_positive_int(f"{prefix}query_max_length", query_max_length)
    check_positive_int(f"{prefix}doc_max_length", doc_max_length)
    return projection_dim


def check_temperature(temperature: float, *, prefix: str = "") -> None:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"{prefix}temperature must be a finite number > 0, got {temperature!r}")


def check_loss_combination(same_tower: str, bidirectional: bool, *, prefix: str = "") -> None:
    """The (same_tower, bidirectional) pair alone: each value may be valid but the pair not."""
    if same_tower not in SAME_TOWER_CHOICES:
        raise ValueError(f"{prefix}same_tower must be one of {SAME_TOWER_CHOICES}, got {same_tower!r}")
    if same_tower == "doc" and not bidirectional:
        # Document-tower negatives only enter the d->q direction, so this would silently
        # degrade to the plain in-batch loss.
        raise ValueError(
            f"{prefix}same_tower=doc needs {prefix}bidirectional=true: document-side negatives only "
            "exist in the d->q direction"
        )


def _finite_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_loss_knobs(same_tower_weight: float, false_negative_margin: float | None, *, prefix: str = "") -> None:
    if not _finite_real(same_tower_weight) or same_tower_weight < 0:
        raise ValueError(f"{prefix}same_tower_weight must be a finite number >= 0, got {same_tower_weight!r}")
    if false_negative_margin is not None and not _finite_real(false_negative_margin):
        raise ValueError(
            f"{prefix}false_negative_margin must be None/null (off) or a finite number, got {false_negative_margin!r}"
        )


def validate_loss_config(
    same_tower: str,
    bidirectional: bool,
    temperature: float,
    same_tower_weight: float = 1.0,
    false_negative_margin: float | None = None,
) -> None:
    """Raise ValueError unless the loss settings are a usable combination."""
    check_loss_combination(same_tower, bidirectional)
    check_temperature(temperature)
    check_loss_knobs(same_tower_weight, false_negative_margin)


def check_precision(precision: str, *, prefix: str = "", training: bool = False, gpu: bool = False) -> None:
    """``precision`` is usable for this work: int8 only for inference, and only on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"{prefix}precision must be one of {PRECISIONS}; got {precision!r}")
    if precision == "int8" and training:
        raise ValueError(
            f"{prefix}precision=int8 is for inference only (samtone eval / encode / serve): dynamically "
            "quantised layers have no gradients; train with auto, fp32 or bf16"
        )
    if precision == "int8" and gpu:
        raise ValueError(
            f"{prefix}precision=int8 runs on CPU only (torch's dynamic int8 kernels); on a GPU use bf16 or fp32"
        )


def check_placement_strategy(strategy: str, *, prefix: str = "") -> None:
    if strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(f"{prefix}placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}; got {strategy!r}")


def parse_count_range(text: str, option: str, *, single: bool) -> tuple[int, int]:
    """``"MIN:MAX"`` -> (MIN, MAX) with 0 < MIN <= MAX; with ``single``, ``"N"`` -> (N, N) too.

    For the replica and actor counts of ``--autoscale`` and ``--actors``.
    """
    expected = "N or MIN:MAX" if single else "MIN:MAX"
    parts = text.split(":")
    if len(parts) not in ((1, 2) if single else (2,)) or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{option} must be {expected}; got {text!r}")
    low, high = int(parts[0]), int(parts[-1])
    if not 0 < low <= high:
        raise ValueError(f"{option} needs 0 < MIN <= MAX; got {text!r}")
    return low, high
