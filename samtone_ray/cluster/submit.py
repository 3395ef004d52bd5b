"""Submit samtone commands to a Ray cluster as jobs, and watch or stop them.

Everything goes through Ray's ``JobSubmissionClient`` (the job server on the head's dashboard
port). The config is loaded and validated here, on the submitting machine, before anything is
sent; the job then runs the same ``samtone`` command on the cluster from an uploaded copy of the
working directory (less secrets and large files: ``cluster.upload``). The submission id is derived
from the command and the config, so a retried submit of the same job attaches to it instead of
starting it twice.

Credentials never travel in the job: a URI with a password is refused in the config and sent
without it from ``$MLFLOW_TRACKING_URI``; the job's environment names the variables the cluster
supplies (``${MLFLOW_TRACKING_PASSWORD}``, resolved by Ray on the node from its own environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samtone_ray.cluster.upload import (
    DEFAULT_MAX_FILE_MB, UploadPlan, human_bytes, ignored_rule, plan_upload, write_zip,
)
from samtone_ray.core.config import BUNDLED_SAMPLE, Config, ConfigError, flatten
from samtone_ray.core.redact import has_credentials, redact_uri, strip_credentials
from samtone_ray.core.storage import is_uri
from samtone_ray.tracking.runs import SUBMISSION_ID_ENV

log = logging.getLogger(__name__)

KINDS = ("train", "tune", "encode")
# MLflow's own credential variables: a job that tracks to a server behind auth reads them from the
# cluster's environment (a Kubernetes secret, the nodes' profile), never from the submission.
MLFLOW_CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class SubmitError(ConfigError):
    """The job cannot run as asked on the cluster (the message says why and what to change)."""


@dataclass
class Submission:
    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    num_cpus: float
    num_gpus: float
    warnings: list[str]
    upload: UploadPlan | None = None  # what of the working directory the job receives
    command: list[str] = field(default_factory=list)  # the samtone arguments the entrypoint runs

    def describe(self) -> str:
        """What would be sent, for the terminal and --dry-run (credentials masked)."""
        env = ", ".join(f"{k}={v}" for k, v in sorted(self.runtime_env.get("env_vars", {}).items()))
        lines = [f"submission id: {self.submission_id}", f"entrypoint: {redact_uri(self.entrypoint)}",
                 f"environment: {redact_uri(env)}"]
        return "\n".join(lines + ([self.upload.describe()] if self.upload else []))


def cluster_address(address: str | None) -> str:
    """The job server's URL: ``--address``, else $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS.

    Never "auto": on a machine running several local clusters that would pick one at random.
    """
    for value in (address, *(os.environ.get(k) for k in ADDRESS_ENV)):
        if value:
            return value if "://" in value else f"http://{value}"
    raise SubmitError(
        "no cluster address: pass --address http://HEAD:8265 (the head's dashboard port, e.g. forwarded by "
        "`ray dashboard cluster.yaml` or `kubectl port-forward svc/<cluster>-head-svc 8265`) or set RAY_API_SERVER_ADDRESS"
    )


def config_hash(kind: str, cfg: Config, args: list[str]) -> str:
    payload = json.dumps({"kind": kind, "config": cfg.to_dict(), "args": args}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def submission_id_for(kind: str, name: str, digest: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "job"
    return f"samtone-{kind}-{slug[:40]}-{digest[:12]}"


def git_commit(directory: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def check_paths(cfg: Config, working_dir: Path, *, nodes: int, upload: UploadPlan) -> list[str]:
    """Paths the cluster cannot see are errors; paths it may not keep are warnings (returned)."""
    warnings = []
    for key, value in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval), ("model.name_or_path", cfg.model.name_or_path)):
        if not value or value == BUNDLED_SAMPLE or "://" in value or Path(value).is_absolute():
            continue
        if key == "model.name_or_path" and not Path(value).exists():
            continue  # an alias such as all-MiniLM-L6-v2, resolved on the cluster
        # The job resolves it against its copy of the working directory: only what is uploaded.
        target = (working_dir / value).resolve()
        if not _inside(target, working_dir):
            raise SubmitError(
                f"{key}={value} is a relative path outside the working directory {working_dir}: the cluster cannot "
                "see it. Use a path on storage every node mounts (absolute, or s3://...), or move it under the working directory."
            )
        rel = target.relative_to(working_dir).as_posix()
        left = upload.holds(rel)
        if left:
            size = [s for s in left if s.reason == "size"]
            hint = (f"; raise --max-file-mb above {human_bytes(max(s.size for s in size))} or" if size else ";") + \
                " use a path on storage every node mounts"
            raise SubmitError(f"{key}={value}: {left[0].path} is not uploaded ({left[0].reason}: {left[0].detail}){hint}")
        if not any(f == rel or f.startswith(rel + "/") for f, _ in upload.files):
            rule = ignored_rule(rel)
            raise SubmitError(
                f"{key}={value} lies under {rule}, which is not uploaded to the cluster" if rule else
                f"{key}={value} is not uploaded to the cluster: nothing under {working_dir} by that name, or a "
                ".gitignore / .rayignore entry leaves it out"
            )
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if cfg.tracking.enabled:
        if not uri:
            warnings.append(
                "no MLflow tracking URI (tracking.uri / $MLFLOW_TRACKING_URI): runs go to a SQLite file inside the "
                "job's temporary working directory on the head and are lost with it"
            )
        elif uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
            path = uri.split(":///", 1)[1] if ":///" in uri else uri.split(":", 1)[-1]
            if not path.startswith("/"):
                raise SubmitError(
                    f"tracking uri {redact_uri(uri)} is relative: on the cluster it would point into the job's temporary directory"
                )
            if nodes > 1:
                raise SubmitError(
                    f"tracking uri {redact_uri(uri)} is a local file but the cluster has {nodes} nodes: workers on other nodes cannot "
                    "reach it. Run an MLflow server every node can reach (cluster.yaml starts one on the head) and pass its http:// URI."
                )
    if not cfg.output_dir or not (Path(cfg.output_dir).is_absolute() or is_uri(cfg.output_dir)):
        warnings.append(
            f"output_dir={cfg.output_dir or '(default)'} is relative: models and checkpoints stay in the job's temporary "
            "working directory; set it to shared storage (NFS, or a path every node mounts)"
        )
    return warnings


def check_credentials(cfg: Config, args: list[str]) -> None:
    """Refuse credentials in the config or the command line: both reach the cluster as they are (the
    config file is uploaded, the command line is the job's entrypoint, shown by ``samtone jobs``)."""
    found = [f"{k}={redact_uri(v)}" for k, v in flatten(cfg.to_dict()).items() if isinstance(v, str) and has_credentials(v)]
    found += [redact_uri(a) for a in args if has_credentials(a)]
    if found:
        raise SubmitError(
            f"{found[0]} carries a credential, which would be uploaded with the job and shown in its entrypoint: "
            "give the URI without it and let the cluster supply it from its own environment (for MLflow: "
            f"{', '.join(MLFLOW_CREDENTIAL_ENV)}, e.g. from a Kubernetes secret)"
        )


def job_env(submission_id: str, warnings: list[str]) -> dict[str, str]:
    """The job's environment variables: no value of a credential, only references the cluster resolves."""
    env_vars = {"HF_HUB_OFFLINE": "1", SUBMISSION_ID_ENV: submission_id}
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    needs_auth = has_credentials(uri) or any(os.environ.get(k) for k in MLFLOW_CREDENTIAL_ENV)
    if uri:
        env_vars["MLFLOW_TRACKING_URI"] = strip_credentials(uri)
    if needs_auth:
        # "${NAME}": Ray substitutes the node's own value when the job starts; the value never leaves here.
        env_vars.update({k: "${" + k + "}" for k in MLFLOW_CREDENTIAL_ENV})
        warnings.append(
            "MLflow credentials are not sent with the job: the cluster's nodes must define "
            f"{' / '.join(MLFLOW_CREDENTIAL_ENV)} themselves (e.g. from a Kubernetes secret)"
        )
    return env_vars


def build_submission(
    kind: str,
    cfg: Config,
    *,
    config_path: Path | None,
    overrides: list[str],
    extra_args: list[str],
    working_dir: Path,
    num_cpus: float,
    num_gpus: float,
    nodes: int = 1,
    submission_id: str | None = None,
    max_file_mb: float = DEFAULT_MAX_FILE_MB,
) -> Submission:
    """Everything sent to the job server, validated; reads only the working directory and git."""
    if kind not in KINDS:
        raise SubmitError(f"unknown job kind {kind!r}; expected one of {', '.join(KINDS)}")
    working_dir = working_dir.resolve()
    if not working_dir.is_dir():
        raise SubmitError(f"working directory {working_dir} does not exist")
    upload = plan_upload(working_dir, max_file_mb=max_file_mb)
    warnings = check_paths(cfg, working_dir, nodes=nodes, upload=upload)
    args = [kind]
    if config_path is not None:
        if not _inside(config_path, working_dir):
            raise SubmitError(
                f"--config {config_path} lies outside the working directory {working_dir}, which is all the job receives"
            )
        rel = config_path.resolve().relative_to(working_dir).as_posix()
        if not any(f == rel for f, _ in upload.files):
            why = upload.holds(rel)
            raise SubmitError(f"--config {config_path} is not uploaded to the cluster ("
                              + (f"{why[0].reason}: {why[0].detail}" if why else "an ignored folder or ignore-file entry")
                              + "): move it beside the code the job receives")
        args += ["--config", rel]
    for item in overrides:
        args += ["--set", item]
    args += extra_args
    check_credentials(cfg, args)
    digest = config_hash(kind, cfg, extra_args)
    sid = submission_id or submission_id_for(kind, cfg.name, digest)
    env_vars = job_env(sid, warnings)
    # `python -m` from the job's working directory runs the uploaded code, not whatever samtone
    # version happens to be installed on the cluster.
    entrypoint = "python -m samtone_ray.cli " + " ".join(shlex.quote(a) for a in args)
    metadata = {
        "samtone.kind": kind,
        "samtone.name": cfg.name,
        "config_hash": digest,
        "git_commit": git_commit(working_dir),
        "mlflow_experiment": cfg.tracking.experiment if cfg.tracking.enabled else "",
    }
    runtime_env = {"working_dir": str(working_dir), "env_vars": env_vars}
    return Submission(sid, entrypoint, runtime_env, metadata, num_cpus, num_gpus, warnings, upload, args)


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster_address(address))


def alive_nodes(address: str) -> int | None:
    """Alive nodes of the cluster, from the dashboard's state API; None when it cannot say.

    An empty answer also means "cannot say": a cluster always has its head, and a dashboard lists
    no nodes for a few seconds after ``ray start``."""
    try:
        from ray.util.state import list_nodes

        alive = list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    except Exception as exc:  # the check is advisory: an old or locked-down dashboard must not block submits
        log.debug("could not list the cluster's nodes: %s", exc)
        return None
    return len(alive) or None


# A head's job server answers this (HTTP 500) for a few seconds after it starts, until its job
# agent has registered: worth waiting for, not a failure.
AGENT_NOT_READY = "No available agent to submit job"
AGENT_WAIT_S = 60.0


def submit(sub: Submission, jobs, *, agent_wait_s: float = AGENT_WAIT_S, poll_s: float = 2.0,
           out=None) -> tuple[str, bool]:
    """Submit, or attach when this submission id exists already; returns (id, newly_submitted).

    While the head's job agent is not ready yet, waits (up to ``agent_wait_s``, saying so on ``out``)
    and tries again. The working directory goes as a zip of exactly ``sub.upload``'s files."""
    try:
        jobs.get_job_info(sub.submission_id)
        return sub.submission_id, False
    except RuntimeError as exc:
        if "404" not in str(exc):
            raise
    with contextlib.ExitStack() as stack:
        runtime_env = dict(sub.runtime_env)
        if sub.upload is not None:
            # Ray uploads a local .zip as it is: nothing it would add or drop on its own.
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="samtone-upload-")))
            runtime_env["working_dir"] = str(write_zip(sub.upload, folder / "working_dir.zip"))
        return _submit_when_ready(sub, runtime_env, jobs, agent_wait_s=agent_wait_s, poll_s=poll_s, out=out)


def _submit_when_ready(sub: Submission, runtime_env: dict[str, Any], jobs, *, agent_wait_s: float, poll_s: float,
                       out) -> tuple[str, bool]:
    deadline = time.monotonic() + agent_wait_s
    waited = False
    while True:
        try:
            jobs.submit_job(
                entrypoint=sub.entrypoint,
                submission_id=sub.submission_id,
                runtime_env=runtime_env,
                metadata=sub.metadata,
                entrypoint_num_cpus=sub.num_cpus,
                entrypoint_num_gpus=sub.num_gpus,
            )
        except RuntimeError as exc:
            if "already exists" in str(exc):  # a concurrent retry won the race: attach to it
                return sub.submission_id, False
            if AGENT_NOT_READY not in str(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise SubmitError(
                    f"the job server still had no agent to run the job after {agent_wait_s:.0f}s ({exc}): the head's "
                    "dashboard agent may have failed; see its logs (dashboard_agent.log in the head's Ray session folder)"
                ) from None
            if not waited:
                print(f"the cluster's job agent is not ready yet (a head that has just started?): retrying for up to "
                      f"{agent_wait_s:.0f}s", file=out or sys.stderr, flush=True)
            waited = True
            time.sleep(min(poll_s, left))
            continue
        return sub.submission_id, True


def wait(jobs, submission_id: str, *, follow: bool, poll_s: float = 1.0, out=sys.stdout) -> str:
    """Until the job ends: tail its logs (``follow``) or print its state changes; returns the final state."""
    if follow:
        async def tail() -> None:
            async for lines in jobs.tail_job_logs(submission_id):
                out.write(lines)
                out.flush()

        asyncio.run(tail())
    last = None
    while True:
        status = str(jobs.get_job_status(submission_id).value)
        if status != last and not follow:
            print(f"{submission_id}: {status}", file=out, flush=True)
        last = status
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


# Ray's stop request goes to the job's supervisor actor, which a PENDING job does not have yet:
# the request is dropped and the job stays PENDING until it starts or times out
# (ray-project/ray#58353, open in Ray 2.60). So a pending job is stopped from inside the cluster
# by a tiny job of its own (no resources, nothing uploaded, so it starts even when the cluster is
# full): it marks the job STOPPED, then removes the supervisor actor so it never starts.
# Uses Ray's job-manager internals: Ray is pinned, and tests/test_cluster.py runs it for real.
_STOP_PENDING = """
import asyncio, sys, ray
from ray.dashboard.modules.job.common import JOB_ACTOR_NAME_TEMPLATE, SUPERVISOR_ACTOR_RAY_NAMESPACE, JobInfoStorageClient
from ray.job_submission import JobStatus
sid = sys.argv[1]
ray.init(logging_level="ERROR")
store = JobInfoStorageClient(ray._private.worker.global_worker.gcs_client)
if asyncio.run(store.get_status(sid)) == JobStatus.PENDING:
    asyncio.run(store.put_status(sid, JobStatus.STOPPED, message="stopped while pending (samtone jobs --stop)"))
    try:
        ray.kill(ray.get_actor(JOB_ACTOR_NAME_TEMPLATE.format(job_id=sid), namespace=SUPERVISOR_ACTOR_RAY_NAMESPACE), no_restart=True)
    except ValueError:
        pass  # no supervisor actor (yet): nothing will start the job now that it is STOPPED
"""


def stop(jobs, submission_id: str, *, timeout_s: float, grace_s: float = 5.0) -> str:
    """Stop a job and wait until it has ended; returns its final (or last seen) state."""
    jobs.stop_job(submission_id)
    deadline = time.monotonic() + timeout_s
    pending_since = time.monotonic()
    helper = None
    while True:
        status = str(jobs.get_job_status(submission_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        if status == "PENDING" and helper is None and time.monotonic() - pending_since > grace_s:
            helper = jobs.submit_job(
                entrypoint="python -c " + shlex.quote(_STOP_PENDING) + " " + shlex.quote(submission_id),
                submission_id=f"{submission_id}-stop-{int(time.time())}",
                entrypoint_num_cpus=0,
                metadata={"samtone.kind": "stop", "samtone.target": submission_id},
            )
        time.sleep(0.5)
