"""A real MLflow tracking server on 127.0.0.1 for tests, the demo and local use.

    with LocalMlflowServer(root=Path("/tmp/mlflow")) as server:
        mlflow.set_tracking_uri(server.tracking_uri)

    with LocalS3Server() as s3, LocalMlflowServer(root, **s3_artifact_settings(s3)) as server:   # artifacts on S3
        ...

    python -m infra.local_stack.mlflow_server --root ./mlflow-local --port 5000      # foreground, Ctrl-C stops
    python -m infra.local_stack.mlflow_server --root demo-output/mlflow --s3-root demo-output/s3   # the demo's

Runs runs/params/metrics/registry in ``<root>/mlflow.db`` (sqlite; the ``./mlruns`` file store is refused by MLflow 3
unless explicitly allowed) and proxies artifacts to ``<root>/artifacts`` or to a given destination such as
``s3://bucket/mlflow`` (pass the AWS credentials/endpoint in ``env``), as a production server does: clients upload
and download through the server and need no S3 credentials of their own.

Why it is shaped this way:
* ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` and one worker: a local server needs neither job runners nor a pool of
  workers, which would multiply its processes and memory.
* The server spawns children, so it runs as a ``GroupProcess``: ``stop`` signals the whole group and checks that
  nothing of it is left.
* Its start-up time varies; ``/health`` is polled instead of sleeping, and a server that dies while starting is
  reported with the tail of its log.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

from infra.local_stack.process_group import HOST, GroupProcess, free_port, log_tail

ARTIFACTS_BUCKET = "mlflow"
LOG_FILE = "mlflow_server.log"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"


def s3_artifact_settings(s3, bucket: str = ARTIFACTS_BUCKET) -> dict:
    """``LocalMlflowServer`` keyword arguments that keep its artifacts in ``s3://<bucket>/artifacts`` on the local S3
    server ``s3`` (a ``LocalS3Server``; the bucket is created). The MLflow server writes there with boto3, which
    reads the endpoint from ``MLFLOW_S3_ENDPOINT_URL``; clients upload and download through the server."""
    s3.create_bucket(bucket)
    env = {**s3.env(), "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url}
    return {"artifacts_destination": f"s3://{bucket}/artifacts", "env": env}


class LocalMlflowServer:
    """An ``mlflow server`` subprocess with a sqlite backend; context manager or explicit ``start()``/``stop()``.

    Attributes:
        root: directory holding the database, the local artifacts and the log file.
        port: the port it listens on (a free one is picked if not given).
        tracking_uri: ``http://127.0.0.1:<port>`` — hand this to ``jobs.tracking.set_tracking``.
        log_path: the server's combined stdout/stderr.
    """

    HOST = HOST

    def __init__(
        self,
        root: Path,
        port: Optional[int] = None,
        artifacts_destination: Optional[str] = None,
        env: Optional[dict] = None,
        workers: int = 1,
        startup_timeout: float = 60.0,
    ):
        self.root = Path(root).resolve()
        self.port = port or free_port(self.HOST)
        self.artifacts_destination = artifacts_destination or str(self.root / ARTIFACTS_DIR)
        self.extra_env = dict(env or {})
        self.workers = workers
        self.startup_timeout = startup_timeout
        self.tracking_uri = f"http://{self.HOST}:{self.port}"
        self.log_path = self.root / LOG_FILE
        self._process: Optional[GroupProcess] = None

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        # The interpreter's own `-m mlflow`, so the server runs the same mlflow as the client (no PATH surprises).
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / DB_FILE}",
            "--artifacts-destination", self.artifacts_destination,
            "--host", self.HOST,
            "--port", str(self.port),
            "--workers", str(self.workers),
        ]  # fmt: skip

    def _environment(self) -> dict:
        env = dict(os.environ)
        if "AWS_ACCESS_KEY_ID" in self.extra_env:
            # Given keys come alone: a user's own session token, profile or region must not mix with them.
            env = {name: value for name, value in env.items() if not name.startswith("AWS_")}
        env.update(self.extra_env)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        return env

    def start(self) -> LocalMlflowServer:
        """Launch the server and block until ``/health`` answers; raises RuntimeError (with log tail) otherwise."""
        if self._process is not None:
            raise RuntimeError("server already started")
        self.root.mkdir(parents=True, exist_ok=True)
        if "://" not in self.artifacts_destination:
            Path(self.artifacts_destination).mkdir(parents=True, exist_ok=True)
        # cwd: anything the server writes relative to its working directory lands under root
        self._process = GroupProcess("mlflow server", self.command(), self.log_path, env=self._environment(),
                                     cwd=self.root)
        try:
            self._process.wait_until(self.is_healthy, self.startup_timeout, poll_seconds=0.5)
        except BaseException:
            self.stop()
            raise
        return self

    def is_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM the whole process group, SIGKILL whatever is left after ``grace_seconds``, and verify it is gone
        (RuntimeError if a process of the group still exists afterwards)."""
        if self._process is not None:
            self._process.stop(grace_seconds)
            self._process = None

    def is_running(self) -> bool:
        return self._process is not None and self._process.is_running()

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    def __enter__(self) -> LocalMlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- command line -------------------------------------------------------------------------------------------------
def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run a local MLflow tracking server in the foreground.")
    parser.add_argument("--root", type=Path, default=Path("./mlflow-local"), help="database, artifacts and log")
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--artifacts-destination", default=None,
                       help="default: <root>/artifacts; or s3://bucket/prefix (AWS_* and MLFLOW_S3_ENDPOINT_URL from "
                            "the environment)")
    where.add_argument("--s3-root", type=Path, default=None,
                       help="also start the local S3 server on this folder (e.g. the demo's <workdir>/s3) and keep "
                            f"the artifacts there, in s3://{ARTIFACTS_BUCKET}/artifacts")
    return parser.parse_args(argv)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse_args(argv)
    # SIGTERM (e.g. from a supervisor) should stop the servers as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    with ExitStack() as stack:
        settings = {"artifacts_destination": args.artifacts_destination}
        if args.s3_root is not None:
            from infra.local_stack.s3 import DATA_DIR, LocalS3Server

            if not (args.s3_root / DATA_DIR).is_dir():
                print(f"warning: no S3 store data found in {args.s3_root} (no {DATA_DIR} folder): starting an empty "
                      "store; the demo's store is <workdir>/s3", file=sys.stderr, flush=True)
            s3 = stack.enter_context(LocalS3Server(root=args.s3_root))
            settings = s3_artifact_settings(s3)
            print(f"S3 server for the artifacts: {s3.endpoint_url} (data: {args.s3_root})", flush=True)
        server = stack.enter_context(LocalMlflowServer(args.root, port=args.port, **settings))
        print(f"MLflow tracking server ready: {server.tracking_uri}  (log: {server.log_path})", flush=True)
        print(f"export MLFLOW_TRACKING_URI={server.tracking_uri}", flush=True)
        try:
            while server.is_running():
                time.sleep(1.0)
            print(f"server exited; log tail:\n{log_tail(server.log_path)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("stopping", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
