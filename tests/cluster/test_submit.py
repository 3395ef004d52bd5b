"""What `samtone submit` would send, checked without a cluster (tests/test_cluster.py sends it)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from samtone_ray.cli import build_parser, main
from samtone_ray.core.config import load_config
from samtone_ray.cluster.submit import SubmitError, build_submission, cluster_address
from samtone_ray.cluster.upload import IGNORED

ROOT = Path(__file__).resolve().parents[2]


def _build(overrides=(), *, config=None, nodes=1, kind="train", extra=(), working_dir=ROOT, max_file_mb=10.0):
    cfg = load_config(config, list(overrides))
    return build_submission(kind, cfg, config_path=config, overrides=list(overrides), extra_args=list(extra),
                            working_dir=working_dir, num_cpus=0, num_gpus=0, nodes=nodes, max_file_mb=max_file_mb)


def test_the_entrypoint_reruns_the_same_command_from_the_uploaded_copy():
    sub = _build(["train.lr=1e-4", "name=my run"], config=ROOT / "jobs" / "train_debian.yaml", extra=["--no-baseline"])
    argv = shlex.split(sub.entrypoint)
    assert argv[:4] == ["python", "-m", "samtone_ray.cli", "train"]
    assert argv[4:] == ["--config", "jobs/train_debian.yaml", "--set", "train.lr=1e-4", "--set", "name=my run",
                        "--no-baseline"]
    assert sub.runtime_env["working_dir"] == str(ROOT) and set(IGNORED) >= {".git", ".venv", ".samtone"}
    uploaded = {rel for rel, _ in sub.upload.files}
    assert {"samtone_ray/cli/__init__.py", "jobs/train_debian.yaml", "pyproject.toml"} <= uploaded
    assert not any(rel.startswith((".git/", ".venv/", ".samtone/")) for rel in uploaded)
    assert sub.runtime_env["env_vars"]["SAMTONE_SUBMISSION_ID"] == sub.submission_id
    assert sub.runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert sub.metadata["samtone.kind"] == "train" and sub.metadata["mlflow_experiment"] == "samtone"
    assert sub.submission_id.startswith("samtone-train-my-run-")


def test_the_submission_id_follows_the_config_not_the_spelling():
    a = _build(["train.lr=1e-4"])
    assert _build(["train.lr=0.0001"]).submission_id == a.submission_id  # same resolved config
    assert _build(["train.lr=2e-4"]).submission_id != a.submission_id
    assert _build(["train.lr=1e-4"], kind="tune").submission_id != a.submission_id
    assert _build(["train.lr=1e-4"], extra=["--no-baseline"]).submission_id != a.submission_id


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.train=../elsewhere"], "data.train=../elsewhere is a relative path outside the working directory"),
        (["data.eval=../../x"], "data.eval=../../x"),
        (["tracking.uri=sqlite:///rel/mlflow.db"], "is relative"),
        (["data.train=.samtone/data"], "lies under .samtone, which is not uploaded"),
    ],
)
def test_paths_the_cluster_cannot_see_are_refused(overrides, message):
    with pytest.raises(SubmitError, match=re.escape(message)):
        _build(overrides)


def test_a_local_tracking_store_is_refused_on_a_multi_node_cluster(tmp_path):
    uri = f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"
    assert _build([uri, f"output_dir={tmp_path}"], nodes=1).warnings == []
    with pytest.raises(SubmitError, match="3 nodes"):
        _build([uri], nodes=3)


def test_the_submitters_tracking_uri_goes_to_the_job(monkeypatch):
    # The job logs to the store the submitter names (cluster.yaml: the head's MLflow server), not
    # to a SQLite file in its temporary working directory; nothing is contacted to build this.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    sub = _build([])
    assert sub.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://10.0.0.5:5000"
    assert not any("tracking URI" in w for w in sub.warnings)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert "MLFLOW_TRACKING_URI" not in _build([]).runtime_env["env_vars"]


def test_state_left_in_the_jobs_temporary_directory_is_a_warning(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    warnings = _build([]).warnings
    assert any("output_dir" in w for w in warnings) and any("tracking URI" in w for w in warnings)


def test_a_config_outside_the_working_directory_is_refused(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("train: {lr: 1.0e-4}\n")
    with pytest.raises(SubmitError, match="outside the working directory"):
        _build(config=config)


@pytest.mark.parametrize("rel, why", [("outputs/job.yaml", "an ignored folder"), ("prod.env", "secret: \\*.env")])
def test_a_config_the_upload_leaves_behind_is_refused(tmp_path, rel, why):
    config = tmp_path / rel
    config.parent.mkdir(exist_ok=True)
    config.write_text("train: {lr: 1.0e-4}\n")
    with pytest.raises(SubmitError, match=rf"--config {config} is not uploaded to the cluster \({why}"):
        _build(config=config, working_dir=tmp_path)


def test_the_address_is_explicit(monkeypatch):
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SubmitError, match="--address"):
        cluster_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:8265")
    assert cluster_address(None) == "http://127.0.0.1:8265"
    assert cluster_address("http://h:1") == "http://h:1"


def test_arguments_after_double_dash_go_to_the_command_and_only_for_submit(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--", "--no-baseline"])
    assert "unrecognized arguments" in capsys.readouterr().err
    args = build_parser().parse_args(["submit", "encode", "--no-wait"])
    assert args.job_args == [] and args.kind == "encode"


def test_bad_config_fails_before_any_connection(capsys):
    # A bad value and an address where nothing listens: the config error comes first (exit code 2),
    # before any connection is tried.
    assert main(["submit", "train", "--set", "train.batch_size=0", "--address", "http://127.0.0.1:9"]) == 2
    assert "train.batch_size" in capsys.readouterr().err


class _Jobs:
    """A job server whose agent is not ready for the first ``not_ready`` submissions."""

    def __init__(self, not_ready: int):
        self.not_ready, self.submitted = not_ready, 0

    def get_job_info(self, sid):
        raise RuntimeError("Request failed with status code 404: Job does not exist.")

    def submit_job(self, **kwargs):
        self.submitted += 1
        if self.submitted <= self.not_ready:
            raise RuntimeError("Request failed with status code 500: No available agent to submit job, please try again later..")
        return kwargs["submission_id"]


def test_submit_waits_while_a_fresh_head_has_no_job_agent_yet(capsys):
    from samtone_ray.cluster.submit import Submission, submit

    sub = Submission("samtone-train-x-0123456789ab", "python -m samtone_ray.cli train", {}, {}, 0, 0, [])
    jobs = _Jobs(not_ready=3)
    assert submit(sub, jobs, agent_wait_s=30, poll_s=0.01) == (sub.submission_id, True)
    assert jobs.submitted == 4
    err = capsys.readouterr().err
    assert err.count("job agent is not ready yet") == 1 and "retrying for up to 30s" in err  # said once, not per try
    with pytest.raises(SubmitError, match=r"still had no agent to run the job after 0s.*dashboard_agent.log"):
        submit(sub, _Jobs(not_ready=10**6), agent_wait_s=0.05, poll_s=0.01)


SECRET = "s3cret-pw"


def test_a_password_in_the_submitters_tracking_uri_is_never_sent(monkeypatch):
    # The job gets the URI without it and references to the variables the cluster supplies.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{SECRET}@10.0.0.5:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)  # a local value is no reason to send it
    sub = _build(["output_dir=/shared/out"])
    env = sub.runtime_env["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://10.0.0.5:5000"
    assert env["MLFLOW_TRACKING_PASSWORD"] == "${MLFLOW_TRACKING_PASSWORD}"
    assert env["MLFLOW_TRACKING_USERNAME"] == "${MLFLOW_TRACKING_USERNAME}"
    assert any("MLFLOW_TRACKING_PASSWORD" in w for w in sub.warnings)
    sent = repr((sub.entrypoint, sub.runtime_env, sub.metadata, sub.warnings, sub.describe()))
    assert SECRET not in sent and "alice" not in sent


def test_a_credential_in_the_config_or_command_is_refused():
    with pytest.raises(SubmitError, match=r"carries a credential.*MLFLOW_TRACKING_PASSWORD") as err:
        _build(["data.train=https://alice:s3cret-pw@data.example/beir"])
    assert SECRET not in str(err.value)
    with pytest.raises(SubmitError, match=r"alice:\*\*\*@data.example/c.jsonl carries a credential"):
        _build(kind="encode", extra=["--input", "https://alice:s3cret-pw@data.example/c.jsonl"])


def test_data_the_upload_leaves_behind_is_an_error_before_submitting(tmp_path):
    beir = tmp_path / "beir"
    beir.mkdir()
    with open(beir / "corpus.jsonl", "wb") as f:
        f.truncate(12 << 20)
    with pytest.raises(SubmitError, match=r"data.train=beir: beir/corpus.jsonl is not uploaded \(size: 12.0 MiB\); "
                                          r"raise --max-file-mb above 12.0 MiB"):
        _build(["data.train=beir", "data.eval="], working_dir=tmp_path)
    assert _build(["data.train=beir", "data.eval="], working_dir=tmp_path, max_file_mb=16).upload.files == [
        ("beir/corpus.jsonl", 12 << 20)]
    with pytest.raises(SubmitError, match="data.train=nothing-here is not uploaded to the cluster"):
        _build(["data.train=nothing-here", "data.eval="], working_dir=tmp_path)


def test_dry_run_shows_what_would_be_sent_and_contacts_nothing(tmp_path, capsys, monkeypatch):
    for rel, text in {"train.py": "x = 1\n", ".env": f"PASSWORD={SECRET}\n", ".ssh/id_rsa": "KEY\n"}.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{SECRET}@10.0.0.5:5000")
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)  # no cluster at all
    assert main(["submit", "train", "--dry-run", "--working-dir", str(tmp_path), "--", "--no-baseline"]) == 0
    out, err = capsys.readouterr()
    assert "dry run: nothing submitted" in out and "1 file to upload, 6 B" in out and ".env" in out and ".ssh/" in out
    assert "entrypoint: python -m samtone_ray.cli train --no-baseline" in out
    assert "MLFLOW_TRACKING_URI=http://10.0.0.5:5000" in out
    assert SECRET not in out + err


def test_submit_runs_the_local_commands_checks_with_the_same_message(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    space = 'tune.space={"loss.temperature": {"grid": [0, 0.05]}}'
    assert main(["tune", "--set", space]) == 2
    local = capsys.readouterr().err
    assert "tune.space.loss.temperature: value 0 is invalid" in local
    assert main(["submit", "tune", "--set", space, "--address", "http://127.0.0.1:9"]) == 2
    assert capsys.readouterr().err == local
    # The job's own arguments are parsed here too: a usage error now, not a failed job later.
    with pytest.raises(SystemExit) as exit_:
        main(["submit", "encode", "--dry-run", "--", "--model", "m", "--input", "c.jsonl", "--output", "o",
              "--batch-size", "0"])
    assert exit_.value.code == 2 and "argument --batch-size: must be >= 1, got 0" in capsys.readouterr().err
