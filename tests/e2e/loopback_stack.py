"""Real servers on 127.0.0.1 for the scaling tests: PostgreSQL, an S3 API, MLflow in front of both.

Each is started as its own process (its own session, stopped with everything it
started) and reached over TCP the way a cluster reaches its database and bucket:
nothing is patched in-process.

- PostgreSQL is Debian's server binary, in a temporary data directory with a
  password (scram-sha-256), listening on a free loopback port and no Unix socket.
  It refuses to run as root, so under root it runs as Debian's ``postgres`` user
  (``nobody`` where that user is missing).
- The S3 API is moto's standalone server (``moto_server``): the S3 HTTP protocol,
  so boto3, MLflow's artefact store and DVC's ``s3://`` remote talk to it as to
  a bucket elsewhere.
- ``mlflow server`` keeps runs in that PostgreSQL database and proxies artefacts
  to that bucket (``--artifacts-destination s3://…``): clients need no S3
  credentials, only the tracking URI.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_helpers import free_port, stop_group, until, wait_healthy

BIN = Path(sys.executable).parent
# Test credentials of the loopback store: moto accepts any key pair (one default account).
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "fgclip-test", "AWS_SECRET_ACCESS_KEY": "fgclip-test-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
BUCKET = "fgclip-vad"
DB_USER, DB_PASSWORD, DB_NAME = "mlflow", "loopback-only", "mlflow"
# mlflow server boots in ~50 s on two busy cores (tests/e2e/test_mlflow_server.py).
MLFLOW_BOOT_S = 240
INSTALL_POSTGRES = (
    "PostgreSQL's server not found: `make postgres` (root on Debian) or `sudo apt-get install postgresql`"
)


def postgres_bindir() -> Path:
    """The directory of ``initdb`` and ``postgres``: on PATH, else Debian's versioned directory (newest)."""
    found = shutil.which("postgres")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not debian:
        pytest.fail(INSTALL_POSTGRES)
    return Path(debian[-1]).parent


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: None (this user) unless this is root, which PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    pytest.fail("running as root with neither a postgres nor a nobody user to start PostgreSQL as")


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A started PostgreSQL with database ``mlflow``; yields its SQLAlchemy URI (psycopg 3 driver)."""
    import psycopg

    bindir = postgres_bindir()
    user = _server_user()
    as_user = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    # Not under pytest's tmp_path: its 0700 parents would lock the server's user out.
    home = Path(tempfile.mkdtemp(prefix="fgclip-postgres-"))
    proc = None
    try:
        (home / "password").write_text(DB_PASSWORD + "\n")
        if user is not None:
            for path in (home, home / "password"):
                os.chown(path, user.pw_uid, user.pw_gid)
        initdb = subprocess.run(
            [str(bindir / "initdb"), "-D", str(home / "data"), "-U", DB_USER, "--pwfile", str(home / "password"),
             "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"],
            cwd=home, capture_output=True, text=True, timeout=120, check=False, **as_user,
        )  # fmt: skip
        assert initdb.returncode == 0, f"initdb failed:\n{initdb.stdout}{initdb.stderr}"
        port = free_port()
        log = home / "server.log"
        with log.open("w") as out:
            # -k '': no Unix socket; TCP on loopback only, as the other servers.
            # fsync off: a throwaway database, and fsync is most of a commit's cost.
            proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(home / "data"), "-h", "127.0.0.1", "-p", str(port),
                 "-k", "", "-c", "fsync=off"],
                cwd=home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **as_user,
            )  # fmt: skip
        admin = f"postgresql://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{port}/postgres"

        def created() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"postgres exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"CREATE DATABASE {DB_NAME}")
                return True
            except psycopg.OperationalError:  # not accepting connections yet
                return False

        until("PostgreSQL to accept connections", created, timeout=60, interval=0.1)
        yield f"postgresql://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{port}/{DB_NAME}"
    finally:
        if proc is not None:
            stop_group(proc)  # SIGTERM: PostgreSQL's smart shutdown
        shutil.rmtree(home, ignore_errors=True)


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment of an S3 client of the loopback store (credentials; MLflow's endpoint variable)."""
    return {**S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": endpoint}


def s3_client(endpoint: str):
    import boto3

    keys = {"aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}  # fmt: skip
    return boto3.client("s3", endpoint_url=endpoint, region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"], **keys)


@contextlib.contextmanager
def s3_server(workdir: Path) -> Iterator[str]:
    """moto's S3 server with bucket ``fgclip-vad``; yields its endpoint URL."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = workdir / "s3.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            cwd=workdir, env={**os.environ, **S3_CREDENTIALS}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        client = s3_client(endpoint)

        def bucket_made() -> bool:
            from botocore.exceptions import EndpointConnectionError

            if proc.poll() is not None:
                pytest.fail(f"moto_server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                client.create_bucket(Bucket=BUCKET)
                return True
            except EndpointConnectionError:  # not listening yet
                return False

        until("the S3 server to create its bucket", bucket_made, timeout=120, interval=0.2)
        yield endpoint
    finally:
        stop_group(proc)


@dataclass(frozen=True)
class TrackingStack:
    url: str  # what `tracking.uri` says
    backend: str  # the PostgreSQL URI behind it
    s3_endpoint: str
    artifacts: str  # s3://bucket/prefix of the run artefacts


@contextlib.contextmanager
def mlflow_server(backend: str, s3_endpoint: str, workdir: Path) -> Iterator[TrackingStack]:
    """``mlflow server`` on PostgreSQL ``backend`` with artefacts proxied to the S3 bucket; healthy on return."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    artifacts = f"s3://{BUCKET}/mlflow-artifacts"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(s3_env(s3_endpoint))
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job runner competing for the CPUs
    log = workdir / "mlflow.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", backend, "--artifacts-destination", artifacts,
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_healthy("the MLflow server", f"{url}/health", proc, log, MLFLOW_BOOT_S)
        yield TrackingStack(url, backend, s3_endpoint, artifacts)
    finally:
        stop_group(proc)
