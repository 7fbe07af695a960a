"""A real MLflow tracking server on 127.0.0.1 for tests, the demo and local use.

    with LocalMlflowServer(root=Path("/tmp/mlflow")) as server:
        mlflow.set_tracking_uri(server.tracking_uri)

    python -m infra.local_stack.mlflow_server --root ./mlflow-local --port 5000      # foreground, Ctrl-C stops

Runs runs/params/metrics/registry in ``<root>/mlflow.db`` (sqlite; the ``./mlruns`` file store is refused by MLflow 3
unless explicitly allowed) and proxies artifacts to ``<root>/artifacts`` or to a given destination such as
``s3://bucket/mlflow`` (pass the AWS credentials/endpoint in ``env``).

Why it is shaped this way:
* ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` and one worker: a local server needs neither job runners nor a pool of
  workers, which would multiply its processes and memory.
* The server spawns children, so it gets its own process group and ``stop`` signals the whole group, then checks
  that nothing of it is left (killing only the parent leaves the workers serving).
* Its start-up time varies; ``/health`` is polled instead of sleeping, and a server that dies while starting is
  reported with the tail of its log.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

LOG_FILE = "mlflow_server.log"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (asked from the OS, so servers started side by side never collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user reused the id: not ours any more
        return False
    return True


class LocalMlflowServer:
    """An ``mlflow server`` subprocess with a sqlite backend; context manager or explicit ``start()``/``stop()``.

    Attributes:
        root: directory holding the database, the local artifacts and the log file.
        port: the port it listens on (a free one is picked if not given).
        tracking_uri: ``http://127.0.0.1:<port>`` — hand this to ``jobs.tracking.set_tracking``.
        log_path: the server's combined stdout/stderr.
    """

    HOST = "127.0.0.1"

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
        self._process: Optional[subprocess.Popen] = None

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
        env = {**os.environ, **self.extra_env}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        return env

    def start(self) -> LocalMlflowServer:
        """Launch the server and block until ``/health`` answers; raises RuntimeError (with log tail) otherwise."""
        if self._process is not None:
            raise RuntimeError("server already started")
        self.root.mkdir(parents=True, exist_ok=True)
        if "://" not in self.artifacts_destination:
            Path(self.artifacts_destination).mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._environment(),
                cwd=self.root,  # anything the server writes relative to its cwd lands under root
                start_new_session=True,  # own process group: stop() can signal every worker at once
            )
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with code {self._process.returncode} while starting; "
                    f"log tail ({self.log_path}):\n{_tail(self.log_path)}"
                )
            if self.is_healthy():
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"mlflow server not healthy after {self.startup_timeout:.0f} s on {self.tracking_uri}; "
            f"log tail ({self.log_path}):\n{_tail(self.log_path)}"
        )

    def is_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM the whole process group, SIGKILL whatever is left after ``grace_seconds``, and verify it is gone.

        Raises RuntimeError if a process of the group still exists afterwards.
        """
        if self._process is None:
            return
        pgid = self._process.pid  # start_new_session made the server its group's leader
        self._signal_group(pgid, signal.SIGTERM)
        if not self._wait_group_gone(pgid, grace_seconds):
            self._signal_group(pgid, signal.SIGKILL)
            if not self._wait_group_gone(pgid, 5.0):
                raise RuntimeError(f"processes of mlflow server group {pgid} survived SIGKILL")
        self._process = None

    def _signal_group(self, pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    def _wait_group_gone(self, pgid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            # Reap our direct child; otherwise it lingers as a zombie that still counts as a group member.
            self._process.poll()
            if not _group_alive(pgid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

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
    parser.add_argument("--artifacts-destination", default=None, help="default: <root>/artifacts; or s3://...")
    return parser.parse_args(argv)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse_args(argv)
    server = LocalMlflowServer(args.root, port=args.port, artifacts_destination=args.artifacts_destination)
    # SIGTERM (e.g. from a supervisor) should stop the server group as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    with server:
        print(f"MLflow tracking server ready: {server.tracking_uri}  (log: {server.log_path})", flush=True)
        print(f"export MLFLOW_TRACKING_URI={server.tracking_uri}", flush=True)
        try:
            while server.is_running():
                time.sleep(1.0)
            print(f"server exited; log tail:\n{_tail(server.log_path)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("stopping", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
