"""The project's own Prometheus metrics, declared with ``ray.util.metrics``.

Ray exports them from every node's metrics agent with a ``ray_`` prefix (counters gain
``_total``, histograms ``_bucket``/``_sum``/``_count``); ``dashboards/`` plots them beside Ray's
built-in metrics and ``dashboards/README.md`` lists every name. They are declared lazily, in the
process that records them, so importing this module never needs a Ray connection.

Training: rank 0 records the global figures of a step (the loss and token count are already
all-reduced there); every rank records its own step time and data wait. Tuning: a Tune callback
on the driver counts trials by state and tracks the best value of the tuned metric.
"""

from __future__ import annotations

import functools
import math

# Step times from ~1 ms (tiny models) to minutes (big global batches with the gradient cache).
STEP_SECONDS_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


@functools.lru_cache(maxsize=None)
def _train_metrics():
    from ray.util.metrics import Counter, Gauge, Histogram

    return {
        "loss": Gauge("samtone_train_loss", "Training loss of the last step (mean over workers).", tag_keys=("run",)),
        "step": Gauge("samtone_train_step", "Optimizer steps done.", tag_keys=("run",)),
        "pairs": Counter("samtone_train_pairs", "Training pairs consumed (global batch per step).", tag_keys=("run",)),
        "tokens": Counter("samtone_train_tokens", "Tokens encoded, all workers (padding excluded).", tag_keys=("run",)),
        "step_seconds": Histogram(
            "samtone_train_step_seconds", "Wall time of one training step on one worker.",
            boundaries=STEP_SECONDS_BOUNDARIES, tag_keys=("run", "rank"),
        ),
        "data_wait": Counter(
            "samtone_train_data_wait_seconds", "Seconds a worker waited for its next batch.", tag_keys=("run", "rank")
        ),
        "eval": Gauge("samtone_train_eval", "Last evaluation of the model being trained.", tag_keys=("run", "metric")),
    }


class TrainMetrics:
    """What one training worker records; rank 0 alone records the global figures."""

    def __init__(self, run: str, rank: int) -> None:
        self._m = _train_metrics()
        self._run = {"run": run}
        self._worker = {"run": run, "rank": str(rank)}
        self._rank0 = rank == 0

    def step(self, *, step: int, seconds: float, waited: float, loss: float, pairs: int, tokens: int) -> None:
        self._m["step_seconds"].observe(seconds, self._worker)
        if waited > 0:  # Ray refuses to increment a counter by 0
            self._m["data_wait"].inc(waited, self._worker)
        if self._rank0:
            self._m["loss"].set(loss, self._run)
            self._m["step"].set(step, self._run)
            self._m["pairs"].inc(pairs, self._run)
            if tokens:
                self._m["tokens"].inc(tokens, self._run)

    def evaluation(self, metrics: dict[str, float]) -> None:
        """Retrieval metrics (keys with ``@``: ``mrr@10``, ``ndcg@10``, ...) of an evaluation."""
        for key, value in metrics.items():
            if "@" in key and isinstance(value, (int, float)) and math.isfinite(value):
                self._m["eval"].set(float(value), self._run | {"metric": key})


@functools.lru_cache(maxsize=None)
def _tune_metrics():
    from ray.util.metrics import Gauge

    return {
        "trials": Gauge("samtone_tune_trials", "Trials of a tuning run by state.", tag_keys=("tune", "state")),
        "best": Gauge("samtone_tune_best", "Best value of the tuned metric so far.", tag_keys=("tune", "metric")),
    }


TUNE_STATES = ("running", "finished", "stopped", "error", "skipped")


def tune_callback(tune: str, metric: str, mode: str, layout):
    """A Tune callback publishing trial counts by state and the best metric so far.

    A trial that completes with a saved model finished; one without was stopped early by the
    scheduler (the leaderboard applies the same rule).
    """
    from ray.tune import Callback

    class TuneMetrics(Callback):
        def __init__(self) -> None:
            self.state: dict[str, str] = {}
            self.best: float | None = None
            self._m = None

        def _publish(self) -> None:
            if self._m is None:
                self._m = _tune_metrics()
            for state in TUNE_STATES:
                count = sum(1 for s in self.state.values() if s == state)
                self._m["trials"].set(count, {"tune": tune, "state": state})
            if self.best is not None:
                self._m["best"].set(self.best, {"tune": tune, "metric": metric})

        def on_trial_start(self, iteration, trials, trial, **info):
            self.state[trial.trial_id] = "running"
            self._publish()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                if self.best is None or (value > self.best if mode == "max" else value < self.best):
                    self.best = float(value)
            self._publish()

        def on_trial_complete(self, iteration, trials, trial, **info):
            if "skipped" in (trial.last_result or {}):
                self.state[trial.trial_id] = "skipped"
            else:
                finished = layout.trial(trial.trial_id).model.exists()  # a TuneLayout
                self.state[trial.trial_id] = "finished" if finished else "stopped"
            self._publish()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.state[trial.trial_id] = "error"
            self._publish()

    return TuneMetrics()
