"""The tuning space of ``tune.space``: parsing, validation before any trial, Tune objects.

Keys are dotted training keys (``loss.same_tower``); each value is one of
``{grid: [...]}``, ``{choice: [...]}``, ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``,
``{randint: [lo, hi]}`` or a plain value (fixed for every trial).

Values that are invalid on their own (unknown key, wrong type, NaN or infinity, a batch size the
workers cannot split) fail here, before any trial. Combinations that are only invalid together (same_tower=doc
with bidirectional=false) are skipped with a logged reason: grid combinations before the tuning run,
combinations of sampled (``choice``, ...) values by the trial that draws them.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from samtone_ray.core.config import CombinationError, Config, ConfigError, require_finite

log = logging.getLogger(__name__)

TUNABLE = ("model", "data", "mining", "loss", "train", "scaling")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
GRID_KEY = "grid"  # Tune param holding one valid combination of the grid keys
SEED_KEY = "train.seed"  # varied by tune.seeds


@dataclass
class Space:
    grid: list[dict[str, Any]]  # valid combinations of the grid keys (empty: no grid keys)
    skipped: list[tuple[dict[str, Any], str]]  # (combination, reason)
    sampled: dict[str, tuple[str, list]] = field(default_factory=dict)  # key -> (distribution, args)
    fixed: dict[str, Any] = field(default_factory=dict)
    grid_values: dict[str, list] = field(default_factory=dict)  # grid key -> its values

    def tune_space(self, algorithm: str) -> dict[str, Any]:
        from ray import tune

        space: dict[str, Any] = dict(self.fixed)
        for key, (dist, args) in self.sampled.items():
            space[key] = _sampler(dist, args)
        if algorithm == "grid":
            if self.grid:
                space[GRID_KEY] = tune.grid_search(self.grid)  # only the valid combinations
        elif self.grid:
            # random/optuna draw one of the VALID grid combinations, so no draw is a combination
            # the grid already knows to be invalid; as JSON text because optuna's categoricals
            # hold scalars only.
            space[GRID_KEY] = tune.choice([json.dumps(combo, sort_keys=True) for combo in self.grid])
        return space

    def num_grid_points(self) -> int:
        return max(1, len(self.grid))


def overrides_of(params: dict[str, Any]) -> dict[str, Any]:
    """Flatten a Tune trial config back into dotted overrides."""
    out = {k: v for k, v in params.items() if k != GRID_KEY}
    combo = params.get(GRID_KEY) or {}
    out.update(json.loads(combo) if isinstance(combo, str) else combo)
    return out


def parse_space(space: dict[str, Any], base: Config) -> Space:
    """Validate every key and value against ``base``; expand the grid into valid combinations."""
    if not space:
        raise ConfigError("tune.space is empty: name at least one dotted training key to tune")
    valid_keys = set(base.flat(include=TUNABLE))
    grid_values: dict[str, list] = {}
    result = Space(grid=[], skipped=[])
    for key, spec in space.items():
        where = f"tune.space.{key}"
        if key not in valid_keys:
            raise ConfigError(f"{where}: unknown training key {key!r}")
        # NaN passes or fails the comparisons below by accident (every comparison with NaN is
        # False), and an infinite randint bound would crash int(): refuse both by name.
        require_finite(where, spec)
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ConfigError(f"{where} must be one of {{{', '.join(DISTRIBUTIONS)}: ...}} or a plain value; got {spec!r}")
            dist, args = next(iter(spec.items()))
            if not isinstance(args, list) or not args:
                raise ConfigError(f"{where}.{dist} needs a non-empty list; got {args!r}")
            if dist in ("grid", "choice"):
                for value in args:
                    _check_value(base, key, value, where)
                if dist == "grid":
                    grid_values[key] = args
                else:
                    result.sampled[key] = (dist, args)
            else:
                if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                    raise ConfigError(f"{where}.{dist} needs [low, high] numbers; got {args!r}")
                low, high = args
                if not low < high:
                    raise ConfigError(f"{where}.{dist}: low must be < high; got {args!r}")
                if dist == "loguniform" and low <= 0:
                    raise ConfigError(f"{where}.loguniform needs low > 0; got {args!r}")
                for value in (low, high):
                    _check_value(base, key, int(value) if dist == "randint" else value, where)
                result.sampled[key] = (dist, args)
        else:
            _check_value(base, key, spec, where)
            result.fixed[key] = spec
    if base.tune.seeds > 1:  # the seeds are the innermost grid key: a configuration's seeds run side by side
        grid_values[SEED_KEY] = [base.train.seed + i for i in range(base.tune.seeds)]
    result.grid_values = grid_values
    if grid_values:
        keys = list(grid_values)
        for values in itertools.product(*grid_values.values()):
            combo = dict(zip(keys, values))
            try:
                base.with_overrides(result.fixed | combo)
            except CombinationError as exc:
                log.warning("skipping %s: %s", combo, exc)
                result.skipped.append((combo, str(exc)))
                continue
            result.grid.append(combo)
        if not result.grid:
            raise ConfigError("tune.space: every grid combination is invalid: " + "; ".join(r for _, r in result.skipped))
    return result


def _check_value(base: Config, key: str, value: Any, where: str) -> None:
    try:
        base.with_overrides({key: value})
    except CombinationError:
        pass  # only invalid together with other settings: decided per combination
    except ConfigError as exc:
        raise ConfigError(f"{where}: value {value!r} is invalid: {exc}") from None


def _sampler(dist: str, args: list):
    from ray import tune

    if dist == "choice":
        return tune.choice(args)
    if dist == "uniform":
        return tune.uniform(*args)
    if dist == "loguniform":
        return tune.loguniform(*args)
    return tune.randint(int(args[0]), int(args[1]))
