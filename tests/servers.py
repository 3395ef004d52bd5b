"""Real servers for the tracking-server tests: PostgreSQL (Debian's ``postgresql`` package), an S3
API (moto's standalone server) and an ``mlflow server`` on the two, as a cluster runs them.

Each listens on 127.0.0.1 and a free port, runs in a session of its own and is stopped by its own
pid (PostgreSQL: the postmaster's, from ``postmaster.pid``). The database password is
``$SAMTONE_TEST_PG_PASSWORD`` or generated; it reaches PostgreSQL's clients as ``PGPASSWORD``,
never in a URI, a command line or a log.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from samtone_ray.core.runtime import free_loopback_port

BIN = Path(sys.executable).parent  # moto_server and mlflow of this environment
S3_KEYS = {"AWS_ACCESS_KEY_ID": "samtone-test", "AWS_SECRET_ACCESS_KEY": "samtone-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}


def _wait(ready, what: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Signal ``proc``'s own process group (it was started in a session of its own), then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            pass


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


# --- PostgreSQL ---------------------------------------------------------------------------------

def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian: /usr/lib/postgresql/<ver>/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def postgres_unavailable() -> str:
    """Why a test PostgreSQL cannot run here ('' when it can)."""
    if postgres_bin() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        return "a test PostgreSQL runs as the 'postgres' user, which needs root and runuser"
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        return "no 'postgres' user (Debian's postgresql package creates it)"
    try:
        import psycopg2  # noqa: F401  (the MLflow server's PostgreSQL driver)
    except ImportError:
        return "psycopg2 is not installed (pip install psycopg2-binary)"
    return ""


@dataclass
class Postgres:
    root: Path  # owned by postgres: data/, the log, the unix socket
    port: int
    password: str = field(repr=False)
    database: str = "mlflow"
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        """The backend-store URI, without the password (that is ``PGPASSWORD``)."""
        # SQLAlchemy 2.1 takes bare postgresql:// for psycopg 3: name the driver installed.
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password}

    def connect(self, database: str = ""):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", password=self.password,
                                dbname=database or self.database, connect_timeout=5)

    def start(self) -> None:
        """Start (or restart) the postmaster on the same data and port; returns once it accepts logins."""
        log = self.root / "postgres.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                ["runuser", "-u", "postgres", "--", str(postgres_bin() / "postgres"), "-D", str(self.root / "data"),
                 "-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.root)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

        def accepts() -> bool:
            import psycopg2

            try:
                self.connect("postgres").close()
                return True
            except psycopg2.OperationalError:
                return False

        _wait(accepts, "PostgreSQL", self.proc, log)

    def stop(self) -> None:
        """Fast shutdown: SIGINT to the postmaster's pid (it ends its backends and exits)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pid_file = self.root / "data" / "postmaster.pid"
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)
            self.proc.wait(30)
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            _stop(self.proc, signal.SIGKILL)
        self.proc = None


def start_postgres() -> Postgres:
    """initdb into a fresh folder owned by ``postgres`` (password logins only over TCP), start it
    and create the ``mlflow`` database."""
    import pwd

    user = pwd.getpwnam("postgres")
    root = Path(tempfile.mkdtemp(prefix="samtone-pg-"))
    os.chown(root, user.pw_uid, user.pw_gid)
    pg = Postgres(root, free_loopback_port(), os.environ.get("SAMTONE_TEST_PG_PASSWORD") or secrets.token_urlsafe(24))
    pwfile = root / "pwfile"
    pwfile.touch(mode=0o600)
    pwfile.write_text(pg.password)
    os.chown(pwfile, user.pw_uid, user.pw_gid)
    try:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(postgres_bin() / "initdb"), "-D", str(root / "data"),
             "-U", "postgres", f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=peer",
             "--encoding=UTF8", "--no-sync"],
            check=True, capture_output=True, timeout=120,
        )
    finally:
        pwfile.unlink()
    pg.start()
    admin = pg.connect("postgres")
    admin.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
    admin.cursor().execute(f"CREATE DATABASE {pg.database}")
    admin.close()
    return pg


def remove_postgres(pg: Postgres) -> None:
    pg.stop()
    shutil.rmtree(pg.root, ignore_errors=True)


# --- S3 (moto) ----------------------------------------------------------------------------------

def s3_unavailable() -> str:
    if not (BIN / "moto_server").exists():
        return "moto's S3 server is not installed (pip install 'moto[server]')"
    try:
        import boto3  # noqa: F401
    except ImportError:
        return "boto3 is not installed"
    return ""


@dataclass
class S3:
    endpoint: str
    bucket: str
    proc: subprocess.Popen = field(repr=False)

    @property
    def env(self) -> dict[str, str]:
        """What a client (and the MLflow server) needs to reach this S3."""
        return {"MLFLOW_S3_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint, **S3_KEYS}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def start_s3(log_dir: Path, bucket: str = "samtone", port: int | None = None) -> S3:
    port = port or free_loopback_port()
    log = log_dir / "moto.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    s3 = S3(f"http://127.0.0.1:{port}", bucket, proc)
    try:
        _wait(lambda: _http_ok(f"{s3.endpoint}/moto-api/"), "moto_server", proc, log)
        s3.client().create_bucket(Bucket=bucket)
    except BaseException:
        _stop(proc)
        raise
    return s3


def stop_s3(s3: S3) -> None:
    _stop(s3.proc)


# --- MLflow tracking server ---------------------------------------------------------------------

@dataclass
class MLflowServer:
    uri: str
    artifacts: str  # s3://bucket/prefix the server proxies artifacts to
    proc: subprocess.Popen = field(repr=False)


def start_mlflow_server(pg: Postgres, s3: S3, log_dir: Path) -> MLflowServer:
    """``mlflow server`` with PostgreSQL as its backend store and artifacts proxied to S3 (clients
    see ``mlflow-artifacts:/`` URIs and need no S3 credentials)."""
    port = free_loopback_port()
    artifacts = f"s3://{s3.bucket}/mlartifacts"
    log = log_dir / "mlflow-server.log"
    # No job executor: it starts worker processes for GenAI jobs these tests never run.
    env = dict(os.environ) | pg.env | s3.env | {"MLFLOW_DISABLE_TELEMETRY": "true",
                                                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", pg.uri, "--artifacts-destination", artifacts],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
    server = MLflowServer(f"http://127.0.0.1:{port}", artifacts, proc)
    try:  # the first start creates MLflow's tables in PostgreSQL: tens of seconds on 2 cores
        _wait(lambda: _http_ok(f"{server.uri}/health"), "mlflow server", proc, log, timeout=180)
    except BaseException:
        _stop(proc)
        raise
    return server


def stop_mlflow_server(server: MLflowServer) -> None:
    _stop(server.proc)
