"""What ``samtone tune`` shows while it runs, and where Ray's own output goes instead.

The terminal gets a short plan, then one progress line (redrawn in place on a terminal, a plain
line now and then otherwise) with a line per trial started and ended, then the leaderboard and the
commands to run next. Ray's own output goes to ``<output_dir>/ray.log`` (``TuneLayout.ray_log``):
Ray Tune's status tables and trial tables, the ``ray`` loggers of this driver, and the stdout and
stderr of every trial and worker process that Ray forwards to the driver. A failed trial is still
reported on stderr, with that file's name. ``--verbose`` (``RayOutput(None)``) leaves Ray's output on
the terminal, as it was before, and shows no progress view.

The text is built by pure functions (``format_plan``, ``format_progress``, ``format_next_steps``,
``trial_state``); ``ProgressView`` keeps the counts and writes, ``RayOutput`` moves Ray's output.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from samtone_ray.core.redact import redact_uri
from samtone_ray.tune.layout import TuneLayout
from samtone_ray.tune.space import overrides_of

ENDED = ("finished", "stopped", "skipped", "error")
WORKER_HANDLER = "samtone_ray_log"  # our handler of the worker output Ray forwards to the driver
RAY_PRINT_LOGS = "ray_print_logs"  # Ray's own: prints that output on the driver's stdout/stderr


# ----------------------------------------------------------------- pure formatting


def format_duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``1h02m``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_progress(counts: Mapping[str, int], total: int, metric: str, best: tuple[float, str] | None,
                    elapsed_s: float) -> str:
    """The progress line: elapsed time, trials done (finished / stopped early / errored), running,
    waiting, and the best value of ``metric`` reported so far with its trial.

    ``counts``: trials per state of ``trial_state`` (missing states count 0); ``best``: (value, trial id).
    """
    done = sum(counts.get(s, 0) for s in ENDED)
    detail = [f"{counts.get('finished', 0)} finished", f"{counts.get('stopped', 0)} stopped early"]
    if counts.get("skipped"):
        detail.append(f"{counts['skipped']} skipped")
    detail.append(f"{counts.get('error', 0)} errored")
    waiting = max(0, total - done - counts.get("running", 0))
    line = f"[{format_duration(elapsed_s):>6}] trials {done}/{total} done ({', '.join(detail)}), {counts.get('running', 0)} running"
    if waiting:
        line += f", {waiting} waiting"
    best_text = f"best {metric} {best[0]:.4f} (trial {best[1]})" if best else f"no {metric} yet"
    return f"{line} | {best_text}"


def trial_state(status: str, *, skipped: bool = False, trained: bool = False) -> str:
    """Our state of a trial from Tune's status: a trial that terminated with a saved model
    finished; one without was stopped early by the scheduler (the leaderboard's rule)."""
    if status == "TERMINATED":
        return "skipped" if skipped else "finished" if trained else "stopped"
    if status == "ERROR":
        return "error"
    if status in ("RUNNING", "PAUSED"):
        return "running"
    return "pending"


def improves(value: Any, best: float | None, mode: str) -> bool:
    """Whether ``value`` (a reported metric) is finite and better than ``best`` under ``mode``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


_EXCEPTION = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*")


def error_summary(text: str | None, limit: int = 300) -> str:
    """The line of a trial's error text that says what went wrong: its last exception line (the one
    a chained traceback ends with) and, when that ends with ':', the first line after it that
    is not a heading too (Ray Train's "[Rank 0 Error Snippet]:")."""
    lines = [line.rstrip() for line in (text or "").splitlines()]
    heads = [i for i, line in enumerate(lines) if _EXCEPTION.fullmatch(line)]
    if not heads:
        rest = [line.strip() for line in lines if line.strip()]
        summary = rest[-1] if rest else "no error message"
    else:
        i = heads[-1]
        summary = lines[i]
        if summary.endswith(":"):
            after = [line.strip() for line in lines[i + 1:] if line.strip()]
            summary += next((f" {line}" for line in after if not line.endswith(":")), "")
    return summary if len(summary) <= limit else summary[: limit - 3] + "..."


def planned_trials(algorithm: str, num_samples: int, grid_points: int) -> int:
    """Trials a tuning run starts: the grid ``num_samples`` times over, or ``num_samples`` draws."""
    return num_samples * max(1, grid_points) if algorithm == "grid" else num_samples


def _space_lines(space) -> list[str]:
    lines = [f"{k}: {', '.join(map(str, values))} (grid)" for k, values in space.grid_values.items()]
    for key, (dist, args) in space.sampled.items():
        lines.append(f"{key}: {dist} of {', '.join(map(str, args))}" if dist == "choice" else f"{key}: {dist} [{args[0]}, {args[1]}]")
    if space.fixed:
        lines.append("fixed: " + ", ".join(f"{k}={v}" for k, v in space.fixed.items()))
    if space.skipped:
        lines.append(f"{len(space.skipped)} invalid grid combination{'s' if len(space.skipped) != 1 else ''} skipped")
    return lines


def format_plan(cfg, space, *, trials: int, concurrent: int, pairs: int, queries: int, corpus: str,
                output_dir: Path | str, log: Path | str | None, tracking_uri: str | None = None,
                parent_run_id: str | None = None, zero_shot: bool = False, resumed: bool = False) -> str:
    """What a tuning run will do, in a few lines: what is tuned, how many trials and how they run,
    the data, where MLflow and the outputs go, and where Ray's output goes (``log``; None: here)."""
    t, s = cfg.tune, cfg.scaling
    device = "1 GPU" if s.use_gpu else f"{s.cpus_per_worker} CPU"
    workers = f"{s.num_workers} worker{'s' if s.num_workers != 1 else ''} with {device}{' each' if s.num_workers != 1 else ''}"
    how = f"{trials} ({'grid search' if t.algorithm == 'grid' else t.algorithm}), up to {concurrent} at a time, each on {workers}"
    if t.scheduler == "asha":
        how += "; ASHA stops the weaker ones early"
    rows = [("tuning", line) for line in _space_lines(space)]
    rows += [
        ("trials", how),
        ("train", f"{cfg.data.train} [{cfg.data.train_split}]: {pairs} pairs"),
        ("eval", f"{cfg.data.eval} [{cfg.data.eval_split}]: {queries} queries, {corpus}"),
    ]
    if zero_shot:
        rows.append(("reference", "the base model zero-shot and BM25, evaluated first"))
    if tracking_uri:
        rows.append(("mlflow", f"{tracking_uri}, experiment {cfg.tracking.experiment}"
                               + (f", parent run {parent_run_id}" if parent_run_id else "")))
        champion = f"models:/{cfg.registry.model_name}@{cfg.registry.alias}"
        rows.append(("champion", f"{champion}, if the best finished trial beats the current one"))
    else:
        rows.append(("mlflow", "off (tracking.enabled=false): no runs, no champion"))
    rows.append(("outputs", short_path(output_dir)))
    rows.append(("ray log", f"{short_path(log)} (Tune's status tables, Ray's logs, the workers' output; --verbose shows them here)"
                            if log else "shown here (--verbose)"))
    title = f"# plan: {'resume ' if resumed else ''}tuning {cfg.model.name_or_path}, trials ranked by {t.metric} ({t.mode})"
    width = max(len(k) for k, _ in rows)
    out, last = [title], None
    for key, text in rows:
        out.append(f"  {key if key != last else '':<{width}}  {text}")
        last = key
    return redact_uri("\n".join(out))  # the tracking and data URIs, without their passwords


def format_next_steps(*, model: str | None, model_name: str | None, corpus: str | None, output_dir: Path | str,
                      tracking_uri: str = "", log: Path | str | None = None) -> str:
    """The commands to run next for ``model`` (a ``models:/NAME@ALIAS`` URI or a model folder; None:
    nothing to serve): serve it, re-encode a corpus (``corpus``: a BEIR folder) with it, list the
    registered versions of ``model_name``. ``tracking_uri``: the configured store, when not the default."""
    lines = ["# next"]
    if model is None:
        lines.append("  no trial trained to the end: nothing to serve; see the leaderboard and "
                     + (f"{log}" if log else "the output above"))
        return "\n".join(lines)
    store = ["--set", f"tracking.uri={tracking_uri}"] if tracking_uri and model.startswith("models:/") else []
    q = shlex.join
    serve = ["samtone", "serve", *store, "--model", model] + (["--index", corpus] if corpus else [])
    lines.append(f"  serve it:       {q(serve)}")
    if corpus:
        encode = ["samtone", "encode", *store, "--model", model, "--input", str(Path(corpus) / "corpus.jsonl"),
                  "--output", str(Path(output_dir) / "embeddings")]
        lines.append(f"  encode with it: {q(encode)}")
    if model_name and model.startswith("models:/"):
        lines.append(f"  its versions:   {q(['samtone', 'models', model_name] + (['--tracking-uri', tracking_uri] if tracking_uri else []))}")
    if log:
        lines.append(f"  Ray's output:   {log}")
    return redact_uri("\n".join(lines))  # a password is typed by the user, never printed


def short_path(path: Path | str) -> str:
    """``path`` relative to the working directory when inside it (as a user would type it), else absolute."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def next_steps(cfg, outcome, log: Path | str | None) -> str:
    """``format_next_steps`` for a finished tuning run: its champion (or, without MLflow, its best
    trial's model folder), the eval data's corpus when it is a BEIR folder."""
    from samtone_ray.data.sources import resolve_data_path
    from samtone_ray.tracking.model_uri import alias_uri

    champion = outcome.champion and "error" not in outcome.champion
    model = (alias_uri(cfg.registry.model_name, cfg.registry.alias) if champion
             else short_path(outcome.best["model_dir"]) if outcome.best is not None and outcome.best.get("model_dir")
             else None)
    corpus = resolve_data_path(cfg.data.eval) if cfg.data.eval else None
    return format_next_steps(model=model, model_name=cfg.registry.model_name if champion else None,
                             corpus=short_path(corpus) if corpus and (Path(corpus) / "corpus.jsonl").exists() else None,
                             output_dir=short_path(outcome.output_dir), tracking_uri=cfg.tracking.uri,
                             log=short_path(log) if log else None)


# ----------------------------------------------------------------- the live view


class ProgressView:
    """Counts trials by state and writes the progress: on a terminal one line redrawn in place
    (events above it); elsewhere plain lines: the progress line when a trial ended, else after
    ``heartbeat_s`` if it changed (a better metric) and after ``QUIET_HEARTBEATS`` of them if not.
    Failures go to ``errors`` with the log file's name."""

    QUIET_HEARTBEATS = 5

    def __init__(self, stream: TextIO, errors: TextIO, *, metric: str, mode: str, log: Path | str | None,
                 hide: tuple[str, ...] = (), tty: bool | None = None, heartbeat_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.errors, self.metric, self.mode, self.log = stream, errors, metric, mode, log
        self.hide, self.heartbeat_s, self.clock = set(hide), heartbeat_s, clock
        self.tty = stream.isatty() if tty is None else tty
        self.states: dict[str, str] = {}
        self.best: tuple[float, str] | None = None
        self.total = 0
        self.started = clock()
        self._last_line = ""  # the progress line last written
        self._last_write = self.started  # the first plain line after heartbeat_s, or when a trial ends
        self._drawn = False  # a live line is on screen (tty)
        self._ended_since = False
        self._closed = False

    # --- state

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for state in self.states.values():
            out[state] = out.get(state, 0) + 1
        return out

    def line(self) -> str:
        return format_progress(self.counts(), max(self.total, len(self.states)), self.metric, self.best,
                               self.clock() - self.started)

    def setup(self, total: int | None) -> None:
        self.total = int(total) if total is not None and total < sys.maxsize else 0
        self.started = self._last_write = self.clock()

    def known(self, trial_id: str, state: str) -> None:
        """A trial Tune lists (pending, or restored by a resume): counted, nothing written."""
        self.states.setdefault(trial_id, state)

    def trial_started(self, trial_id: str, params: Mapping[str, Any]) -> None:
        self.states[trial_id] = "running"
        shown = ", ".join(f"{k}={v}" for k, v in params.items() if k not in self.hide)
        self._event(f"trial {trial_id} started" + (f": {shown}" if shown else ""))

    def trial_result(self, trial_id: str, result: Mapping[str, Any]) -> None:
        value = result.get(self.metric)
        if improves(value, self.best[0] if self.best else None, self.mode):
            self.best = (float(value), trial_id)

    def trial_ended(self, trial_id: str, state: str, result: Mapping[str, Any]) -> None:
        self.states[trial_id] = state
        self._ended_since = True
        if state == "skipped":
            self._event(f"trial {trial_id} skipped: {result.get('skipped')}")
            return
        value = result.get(self.metric)
        text = f"{self.metric} {value:.4f}" if isinstance(value, (int, float)) else f"no {self.metric}"
        if result.get("pairs") is not None:
            text += f" after {result['pairs']} pairs"
        self._event(f"trial {trial_id} {'finished' if state == 'finished' else 'stopped early by the scheduler'}: {text}")

    def trial_failed(self, trial_id: str, error: str | None, error_file: str | None) -> None:
        self.states[trial_id] = "error"
        self._ended_since = True
        where = [short_path(p) for p in (error_file, self.log) if p]
        self._clear()
        print(f"error: trial {trial_id} failed: {error_summary(error)}"
              + (f" (details: {' and '.join(where)})" if where else ""), file=self.errors, flush=True)
        self._draw()

    # --- writing

    def tick(self) -> None:
        """Called often (every Tune step): redraws the live line, or writes a plain one when due."""
        if self._closed:
            return
        now = self.clock()
        if self.tty:
            if now - self._last_write >= 0.5:
                self._draw()
        else:
            line, waited = self.line(), now - self._last_write
            changed = line.split("] ", 1)[1] != self._last_line.split("] ", 1)[-1]
            if self._ended_since or waited >= self.heartbeat_s * (1 if changed else self.QUIET_HEARTBEATS):
                self._plain(line)

    def close(self) -> None:
        """The final progress line, once; the terminal is left on a fresh line."""
        if self._closed:
            return
        self._closed = True
        line = self.line()
        if self.tty:
            self._clear()
            self.stream.write(line + "\n")
            self.stream.flush()
        elif line != self._last_line:
            self._plain(line)

    def _event(self, text: str) -> None:
        self._clear()
        self.stream.write(f"[{format_duration(self.clock() - self.started):>6}] {text}\n")
        self.stream.flush()
        if self.tty:
            self._draw()

    def _plain(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()
        self._last_line, self._last_write, self._ended_since = line, self.clock(), False

    def _draw(self) -> None:
        if not self.tty or self._closed:
            return
        width = max(20, shutil.get_terminal_size((120, 24)).columns - 1)  # a wrapped line cannot be redrawn
        line = self.line()[:width]
        self.stream.write("\r\x1b[2K" + line)
        self.stream.flush()
        self._drawn, self._last_line, self._last_write = True, line, self.clock()

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._drawn = False


_VIEWS: dict[str, ProgressView] = {}
"""The progress view of each tuning run in this process, by its output folder (``RayOutput.track``)."""


class TuneProgress(Callback):
    """Feeds the progress view of the tuning run in ``root`` (its output folder), when one is shown.

    It holds nothing but ``root``, so Tune can pickle it with its run config (``tuner.pkl``), and
    the copy that ``Tuner.restore`` brings back feeds the view of the process resuming the run.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = str(root)

    def _view(self) -> ProgressView | None:
        return _VIEWS.get(self.root)

    def _state_of(self, trial) -> str:
        return trial_state(trial.status, skipped="skipped" in (trial.last_result or {}),
                           trained=trial.status == "TERMINATED" and self._trained(trial.trial_id))

    def _trained(self, trial_id: str) -> bool:
        return TuneLayout(Path(self.root)).trial(trial_id).model.exists()

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        if view := self._view():
            view.setup(total_num_samples)

    def on_step_end(self, iteration, trials, **info):
        if view := self._view():
            for trial in trials:
                if trial.trial_id not in view.states:
                    view.known(trial.trial_id, self._state_of(trial))
            view.tick()

    def on_trial_start(self, iteration, trials, trial, **info):
        if view := self._view():
            view.trial_started(trial.trial_id, overrides_of(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if view := self._view():
            view.trial_result(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if view := self._view():
            result = trial.last_result or {}
            state = "skipped" if "skipped" in result else "finished" if self._trained(trial.trial_id) else "stopped"
            view.trial_ended(trial.trial_id, state, result)

    def on_trial_error(self, iteration, trials, trial, **info):
        if view := self._view():
            try:  # the driver's copy: the one in storage may not be synced yet
                error = Path(trial.error_file).read_text() if trial.error_file else trial.get_error()
            except Exception:  # noqa: BLE001  (Tune's error file: failing to read it must not fail the tuning run)
                error = None
            # Named where it is kept: the trial's folder in output_dir, not Ray's session staging copy.
            kept = str(Path(trial.path, Path(trial.error_file).name)) if trial.path and trial.error_file else trial.error_file
            view.trial_failed(trial.trial_id, str(error) if error else None, kept)

    def on_experiment_end(self, trials, **info):
        if view := self._view():
            view.close()


# ----------------------------------------------------------------- Ray's output to a file


class _LogFile:
    """``path`` opened for appending on the first write (so nothing is created for a run that
    fails its checks), line-buffered so that ``tail -f`` follows it; writes from several threads."""

    def __init__(self, path: Path) -> None:
        self.path, self._fh, self._lock = path, None, threading.Lock()

    def open(self) -> TextIO:
        with self._lock:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115  (closed by close())
            return self._fh

    def write(self, text: str) -> int:
        fh = self.open()
        with self._lock:
            return fh.write(text)

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    @property
    def opened(self) -> bool:
        return self._fh is not None

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class RayOutput:
    """While active, Ray's output goes to ``path`` instead of the terminal (``path`` None: nowhere
    else, as before). The ``ray`` loggers are redirected at once; the worker output Ray forwards
    to this driver once Ray is connected (``connected()``, also tried on entry); what Ray Tune prints
    in the driver inside ``quiet()`` (around ``Tuner.fit``). ``terminal``/``errors``: the streams
    the terminal had on entry, for the progress view."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.terminal: TextIO = sys.stdout
        self.errors: TextIO = sys.stderr
        self._file = _LogFile(path) if path is not None else None
        self._handler: logging.Handler | None = None
        self._saved_handlers: list[logging.Handler] = []
        self._saved_workers: list[tuple[str, Callable]] = []
        self._dispatcher = None
        self._tracked: str | None = None

    def track(self, layout: TuneLayout, metric: str, mode: str, hide: tuple[str, ...] = ()) -> list[Callback]:
        """The Tune callbacks that show the progress of the tuning run in ``layout`` on the
        terminal: none when Ray's output stays there (``path`` None), its tables being the progress."""
        if self._file is None:
            return []
        self._tracked = str(layout.root)
        _VIEWS[self._tracked] = ProgressView(self.terminal, self.errors, metric=metric, mode=mode, log=self.path, hide=hide)
        return [TuneProgress(layout.root)]

    def __enter__(self) -> RayOutput:  # noqa: PYI034
        self.terminal, self.errors = sys.stdout, sys.stderr
        if self._file is None:
            return self
        logger = logging.getLogger("ray")
        self._saved_handlers = list(logger.handlers)
        for handler in self._saved_handlers:
            logger.removeHandler(handler)
        self._handler = logging.StreamHandler(self._file)
        self._handler.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"))
        logger.addHandler(self._handler)
        self.connected()
        return self

    def connected(self) -> None:
        """Send the worker output that Ray forwards to this driver to the log (after ``ray.init``)."""
        if self._file is None or self._dispatcher is not None:
            return
        try:
            from ray._private.ray_logging import (
                global_worker_stdstream_dispatcher as dispatcher,
            )
        except ImportError:  # Ray moved it: the output stays on the terminal, the tuning runs on
            return
        saved = [(name, h) for name, h in getattr(dispatcher, "handlers", []) if name == RAY_PRINT_LOGS]
        if not saved:  # not connected yet, or connected with log_to_driver=False
            return
        self._saved_workers, self._dispatcher = saved, dispatcher
        dispatcher.remove_handler(RAY_PRINT_LOGS)
        dispatcher.add_handler(WORKER_HANDLER, self._worker_lines)

    def _worker_lines(self, data: dict) -> None:
        pid, lines = data.get("pid"), data.get("lines") or []
        if pid == "autoscaler":  # the monitor's whole log: only its events, as Ray shows them
            try:
                from ray._private.worker import filter_autoscaler_events

                lines = list(filter_autoscaler_events(lines))
            except Exception:  # noqa: BLE001, S110  (Ray's internals moved: keep the lines rather than fail)
                pass
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({pid})" if pid in ("raylet", "autoscaler") else f"({who + ' ' if who else ''}pid={pid})"
        if lines:
            self._file.write("".join(f"{prefix} {line}\n" for line in lines))

    @contextlib.contextmanager
    def quiet(self):
        """What is printed to stdout/stderr inside the block (Ray Tune's tables) goes to the log."""
        if self._file is None:
            yield
            return
        fh = self._file.open()
        with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            yield

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._tracked is not None:
            _VIEWS.pop(self._tracked).close()  # a run interrupted before Tune's end still ends its line
            self._tracked = None
        if self._file is None:
            return
        logger = logging.getLogger("ray")
        logger.removeHandler(self._handler)
        for handler in self._saved_handlers:
            logger.addHandler(handler)
        if self._dispatcher is not None:
            import ray

            self._dispatcher.remove_handler(WORKER_HANDLER)
            if ray.is_initialized():  # a shutdown in between removed Ray's handler for good
                for name, handler in self._saved_workers:
                    self._dispatcher.add_handler(name, handler)
            self._dispatcher = None
        if exc_type is not None and self._file.opened:
            print(f"Ray's output: {self.path}", file=self.errors, flush=True)
        self._file.close()
