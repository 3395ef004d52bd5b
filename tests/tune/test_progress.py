"""What `samtone tune` shows instead of Ray's output: the pure formatting, the progress view on a
fake clock, and Ray's output moved to a log file (no Ray cluster; the end-to-end runs are in
test_tuner.py)."""

from __future__ import annotations

import io
import logging
import shlex
import sys

import pytest

from samtone_ray.core.config import from_dict
from samtone_ray.tune.layout import TuneLayout
from samtone_ray.tune.progress import (
    ProgressView,
    RayOutput,
    TuneProgress,
    error_summary,
    format_duration,
    format_next_steps,
    format_plan,
    format_progress,
    planned_trials,
    trial_state,
)
from samtone_ray.tune.space import parse_space


def test_the_progress_line_counts_trials_by_state_and_names_the_best():
    counts = {"finished": 1, "stopped": 1, "error": 1, "running": 1}
    assert format_progress(counts, 6, "mrr@10", (0.91234, "e60f8_00001"), 185) == (
        "[ 3m05s] trials 3/6 done (1 finished, 1 stopped early, 1 errored), 1 running, 2 waiting"
        " | best mrr@10 0.9123 (trial e60f8_00001)"
    )
    assert format_progress({}, 4, "ndcg@10", None, 0) == (
        "[    0s] trials 0/4 done (0 finished, 0 stopped early, 0 errored), 0 running, 4 waiting | no ndcg@10 yet"
    )
    # Skipped draws only appear when there are some; all done: nothing waiting.
    assert "2/2 done (0 finished, 0 stopped early, 2 skipped, 0 errored), 0 running |" in format_progress(
        {"skipped": 2}, 2, "mrr@10", None, 1)


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (59.9, "59s"), (60, "1m00s"), (3599, "59m59s"), (3720, "1h02m")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_trial_states_follow_the_leaderboards_rule():
    assert trial_state("TERMINATED", trained=True) == "finished"
    assert trial_state("TERMINATED") == "stopped"  # no saved model: the scheduler stopped it
    assert trial_state("TERMINATED", skipped=True, trained=True) == "skipped"
    assert trial_state("ERROR") == "error"
    assert trial_state("RUNNING") == trial_state("PAUSED") == "running"
    assert trial_state("PENDING") == "pending"


def test_planned_trials():
    assert planned_trials("grid", 1, 4) == 4 and planned_trials("grid", 2, 0) == 2
    assert planned_trials("random", 5, 4) == planned_trials("optuna", 5, 0) == 5


def test_the_plan_says_what_runs_where_in_a_few_lines():
    cfg = from_dict({"scaling": {"num_workers": 1}})
    space = parse_space(cfg.tune.space, cfg)
    plan = format_plan(cfg, space, trials=4, concurrent=2, pairs=1234, queries=300, corpus="1000 of 5317 documents",
                       output_dir="/runs/x", log="/runs/x/ray.log", tracking_uri="sqlite:////m.db", parent_run_id="abc",
                       zero_shot=True)
    lines = plan.splitlines()
    assert lines[0] == "# plan: tuning all-MiniLM-L6-v2, trials ranked by mrr@10 (max)"
    assert len(lines) <= 12
    for needle in ("loss.same_tower: none, query, doc, both (grid)", "4 (grid search), up to 2 at a time, each on 1 worker",
                   "ASHA", "bundled:debian [train]: 1234 pairs", "300 queries, 1000 of 5317 documents",
                   "sqlite:////m.db, experiment samtone, parent run abc", "models:/samtone@champion",
                   "/runs/x/ray.log (Tune's status tables", "--verbose"):
        assert needle in plan, needle
    verbose = format_plan(cfg, space, trials=4, concurrent=2, pairs=1, queries=1, corpus="c", output_dir="/o", log=None)
    assert "ray.log" not in verbose and "off (tracking.enabled=false)" in verbose


def test_the_next_steps_are_real_commands():
    from samtone_ray.cli import build_parser

    text = format_next_steps(model="models:/samtone@champion", model_name="samtone", corpus="/data/debian",
                             output_dir="/runs/x", tracking_uri="sqlite:////tmp/m.db", log="/runs/x/ray.log")
    commands = [shlex.split(line.split(":", 1)[1]) for line in text.splitlines()[1:] if "samtone " in line]
    assert [c[1] for c in commands] == ["serve", "encode", "models"]
    parser = build_parser()
    serve, encode, models = (parser.parse_args(c[1:]) for c in commands)
    assert serve.model == encode.model == "models:/samtone@champion" and str(serve.index) == "/data/debian"
    assert serve.overrides == encode.overrides == ["tracking.uri=sqlite:////tmp/m.db"]
    assert encode.input == "/data/debian/corpus.jsonl" and str(encode.output) == "/runs/x/embeddings"
    assert models.name == "samtone" and models.tracking_uri == "sqlite:////tmp/m.db"
    assert "/runs/x/ray.log" in text
    # The default store: no --set; a model folder (no MLflow): no registry command.
    folder = format_next_steps(model="/runs/x/trials/a/model", model_name=None, corpus=None, output_dir="/runs/x")
    assert "--set" not in folder and "samtone models" not in folder
    assert parser.parse_args(shlex.split(folder.splitlines()[1].split(":", 1)[1])[1:]).model == "/runs/x/trials/a/model"
    assert "nothing to serve" in format_next_steps(model=None, model_name=None, corpus=None, output_dir="/o")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_view_writes_plain_lines_off_a_terminal_and_failures_to_stderr():
    out, err, clock = io.StringIO(), io.StringIO(), Clock()
    view = ProgressView(out, err, metric="mrr@10", mode="max", log="/runs/x/ray.log", hide=("train.lr",),
                        heartbeat_s=60, clock=clock)
    view.setup(3)
    view.trial_started("t_0", {"loss.same_tower": "none", "train.lr": 1e-3})
    view.known("t_1", "pending")
    view.tick()  # nothing ended, no heartbeat due: no line
    clock.now = 30
    view.trial_result("t_0", {"mrr@10": 0.5})
    view.trial_result("t_0", {"mrr@10": float("nan")})  # not finite: ignored
    view.tick()
    clock.now = 61
    view.tick()  # the heartbeat: the line changed (a first value)
    clock.now = 200
    view.tick()  # unchanged: the next line only after 5 heartbeats
    clock.now = 361
    view.tick()
    clock.now = 370
    view.trial_ended("t_0", "stopped", {"mrr@10": 0.5, "pairs": 64})
    view.trial_started("t_1", {"loss.same_tower": "both"})
    view.trial_result("t_1", {"mrr@10": 0.7})
    view.tick()  # a trial ended: a line at once
    view.trial_failed("t_2", "Traceback (most recent call last):\n  ...\nValueError: boom\n", "/runs/x/tune/t_2/error.txt")
    view.trial_ended("t_1", "finished", {"mrr@10": 0.7})
    view.close()
    view.close()  # once
    assert out.getvalue().splitlines() == [
        "[    0s] trial t_0 started: loss.same_tower=none",
        "[ 1m01s] trials 0/3 done (0 finished, 0 stopped early, 0 errored), 1 running, 2 waiting | best mrr@10 0.5000 (trial t_0)",
        "[ 6m01s] trials 0/3 done (0 finished, 0 stopped early, 0 errored), 1 running, 2 waiting | best mrr@10 0.5000 (trial t_0)",
        "[ 6m10s] trial t_0 stopped early by the scheduler: mrr@10 0.5000 after 64 pairs",
        "[ 6m10s] trial t_1 started: loss.same_tower=both",
        "[ 6m10s] trials 1/3 done (0 finished, 1 stopped early, 0 errored), 1 running, 1 waiting | best mrr@10 0.7000 (trial t_1)",
        "[ 6m10s] trial t_1 finished: mrr@10 0.7000",
        "[ 6m10s] trials 3/3 done (1 finished, 1 stopped early, 1 errored), 0 running | best mrr@10 0.7000 (trial t_1)",
    ]
    assert err.getvalue() == ("error: trial t_2 failed: ValueError: boom "
                              "(details: /runs/x/tune/t_2/error.txt and /runs/x/ray.log)\n")


def test_the_view_redraws_one_line_on_a_terminal():
    out, clock = io.StringIO(), Clock()
    view = ProgressView(out, io.StringIO(), metric="mrr@10", mode="min", log=None, tty=True, clock=clock)
    view.setup(2)
    view.trial_started("t_0", {})
    clock.now = 1
    view.trial_result("t_0", {"mrr@10": 0.4})
    view.trial_result("t_0", {"mrr@10": 0.6})  # mode min: not better
    view.tick()
    view.close()
    text = out.getvalue()
    assert text.startswith("[    0s] trial t_0 started\n")
    assert "\r\x1b[2K[    1s] trials 0/2 done (0 finished, 0 stopped early, 0 errored), 1 running, 1 waiting | best mrr@10 0.4000" in text
    assert text.endswith("\r\x1b[2K[    1s] trials 0/2 done (0 finished, 0 stopped early, 0 errored), 1 running, 1 waiting"
                         " | best mrr@10 0.4000 (trial t_0)\n")


def test_the_callback_pickles_and_feeds_the_view_of_its_run(tmp_path):
    from ray import cloudpickle

    from samtone_ray.tune import progress

    class Trial:
        trial_id, status, last_result, config, error_file = "t_0", "TERMINATED", {"mrr@10": 0.3}, {}, None

    TuneLayout(tmp_path).trial("t_0").model.mkdir(parents=True)
    callback = cloudpickle.loads(cloudpickle.dumps(TuneProgress(tmp_path)))  # as Tune saves and restores it
    out = io.StringIO()
    with RayOutput(tmp_path / "ray.log") as output:
        output.terminal = out
        assert [type(c) for c in output.track(TuneLayout(tmp_path), "mrr@10", "max")] == [TuneProgress]
        view = progress._VIEWS[str(tmp_path)]
        callback.on_trial_complete(0, [Trial], Trial)
        assert view.states == {"t_0": "finished"}
    assert str(tmp_path) not in progress._VIEWS
    TuneProgress(tmp_path / "elsewhere").on_trial_complete(0, [Trial], Trial)  # no view: nothing happens


def test_ray_output_goes_to_the_log_only_while_active(tmp_path, capfd):
    log = tmp_path / "out" / "ray.log"
    handlers = list(logging.getLogger("ray").handlers)
    with RayOutput(log) as output:
        assert not log.exists()  # created on the first write: a run refused by its checks leaves nothing
        logging.getLogger("ray.tune").warning("a ray warning")
        with output.quiet():
            print("Trial status: 1 RUNNING")
            print("a warning", file=sys.stderr)
        print("ours", file=output.terminal)
    assert logging.getLogger("ray").handlers == handlers  # Ray's own handler is back
    captured = capfd.readouterr()
    assert "ours" in captured.out and "Trial status" not in captured.out
    assert "a ray warning" not in captured.err and "a warning" not in captured.err
    text = log.read_text()
    assert "a ray warning" in text and "Trial status: 1 RUNNING" in text and "a warning" in text
    with RayOutput(None) as output, output.quiet():  # --verbose: nothing moves
        print("Trial status: 2 RUNNING")
        assert output.track(TuneLayout(tmp_path), "mrr@10", "max") == []
    assert "Trial status: 2 RUNNING" in capfd.readouterr().out


def test_ray_output_names_its_log_when_the_run_fails(tmp_path, capsys):
    log = tmp_path / "ray.log"
    with pytest.raises(RuntimeError), RayOutput(log):
        logging.getLogger("ray").error("the cause")
        raise RuntimeError("x")
    assert f"Ray's output: {log}" in capsys.readouterr().err


def test_a_failed_trial_is_summed_up_by_its_last_exception():
    text = """Failure # 1 (occurred at 2026-12-07_17-03-04)
Traceback (most recent call last):
  File "tuner.py", line 76, in run_trial
    trainer.fit()
ValueError: the first cause

During handling of the above exception, another exception occurred:

ray.train.ControllerError: Training failed due to controller error:
6 worker(s) were killed due to the node running low on memory.
Object store memory usage: [- objects spillable: 6
"""
    assert error_summary(text) == ("ray.train.ControllerError: Training failed due to controller error: "
                                   "6 worker(s) were killed due to the node running low on memory.")
    assert error_summary("ray.train.WorkerGroupError: Training failed due to worker errors:\n[Rank 0 Error Snippet]:\n"
                         "A worker health check failed.\nWorker info: Worker(\n") == (
        "ray.train.WorkerGroupError: Training failed due to worker errors: A worker health check failed.")
    assert error_summary("something odd\n\n") == "something odd"
    assert error_summary(None) == "no error message"
    assert len(error_summary("ValueError: " + "x" * 1000)) == 300


def test_the_plan_and_the_next_steps_never_print_a_tracking_password():
    cfg = from_dict({"scaling": {"num_workers": 1}})
    uri = "http://alice:s3cret@mlflow.example:5000"
    plan = format_plan(cfg, parse_space(cfg.tune.space, cfg), trials=1, concurrent=1, pairs=1, queries=1, corpus="c",
                       output_dir="/o", log=None, tracking_uri=uri)
    steps = format_next_steps(model="models:/samtone@champion", model_name="samtone", corpus=None, output_dir="/o",
                              tracking_uri=uri)
    for text in (plan, steps):
        assert "s3cret" not in text and "http://alice:***@mlflow.example:5000" in text
