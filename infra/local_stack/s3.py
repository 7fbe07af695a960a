"""A real S3-compatible server on 127.0.0.1 (moto in server mode) for tests, the demo and local use.

    with LocalS3Server() as server:
        server.create_bucket("data")
        server.upload_dir("./genimage", "s3://data/genimage")
        cfg = server.storage_config()            # hand to pipelines.storage / sources / ingest
        subprocess.run([...], env={**os.environ, **server.env()})   # or give a subprocess the AWS_* variables

    python -m infra.local_stack.s3 --bucket data --upload ./genimage --prefix genimage   # foreground, Ctrl-C stops

Why a subprocess and not moto's in-process mock: Ray workers are other processes and PyArrow's S3 client is C++, so
neither sees an in-process mock; a real HTTP endpoint works for all of them.

Credentials: moto accepts any key. The access key is a fixed dummy; the secret key is a fresh random string per
server, so a test that looks for the secret in logs and outputs cannot pass by accident.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs

from infra.local_stack.mlflow_server import free_port
from pipelines import storage
from pipelines.storage import StorageConfig

ACCESS_KEY = "mpft-local-access-key"
REGION = "us-east-1"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):  # PermissionError: the id was reused by another user's process
        return False
    return True


class LocalS3Server:
    """``python -m moto.server`` as a subprocess in its own process group; context manager or ``start()``/``stop()``.

    Attributes: ``endpoint_url`` (``http://127.0.0.1:<port>``), ``access_key``, ``secret_key``, ``region``,
    ``log_path`` (the server's stdout/stderr).
    """

    HOST = "127.0.0.1"

    def __init__(self, port: Optional[int] = None, startup_timeout: float = 30.0, log_dir: Optional[Path] = None):
        self.port = port or free_port(self.HOST)
        self.endpoint_url = f"http://{self.HOST}:{self.port}"
        self.access_key = ACCESS_KEY
        self.secret_key = "mpft-local-" + secrets.token_urlsafe(24)
        self.region = REGION
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_dir or tempfile.gettempdir()) / f"moto-s3-{self.port}.log"
        self._keep_log = log_dir is not None  # a temp-dir log is only for diagnosing a failed start; removed on stop
        self._process: Optional[subprocess.Popen] = None

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        # This interpreter's moto, so the server matches the installed client libraries.
        return [sys.executable, "-m", "moto.server", "-H", self.HOST, "-p", str(self.port)]

    def start(self) -> LocalS3Server:
        """Launch the server and block until it answers HTTP; raises RuntimeError (with the log tail) otherwise."""
        if self._process is not None:
            raise RuntimeError("server already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: stop() signals everything it spawned at once
            )
        try:
            self._wait_until_answering()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self._process.returncode} while starting; "
                                   f"log tail ({self.log_path}):\n{self.log_tail()}")
            if self.is_answering():
                return
            time.sleep(0.2)
        raise RuntimeError(f"moto server did not answer on {self.endpoint_url} within {self.startup_timeout:.0f} s; "
                           f"log tail ({self.log_path}):\n{self.log_tail()}")

    def is_answering(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=2) as response:
                return response.status < 500
        except urllib.error.HTTPError as err:  # any HTTP answer means the server is up
            return err.code < 500
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace_seconds``; RuntimeError if any survives."""
        if self._process is None:
            return
        pgid = self._process.pid  # start_new_session made the server its group's leader
        for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
            if self._wait_group_gone(pgid, wait):
                self._process = None
                if not self._keep_log:
                    self.log_path.unlink(missing_ok=True)
                return
        raise RuntimeError(f"processes of moto server group {pgid} survived SIGKILL")

    def _wait_group_gone(self, pgid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._process.poll()  # reap our child, or its zombie keeps the group alive
            if not _group_alive(pgid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- using it -----------------------------------------------------------------------------------------------
    def storage_config(self) -> StorageConfig:
        return StorageConfig(endpoint_url=self.endpoint_url, region=self.region, access_key=self.access_key,
                             secret_key=self.secret_key)

    def env(self) -> dict:
        """AWS_* variables that point boto3, the AWS CLI, s3fs and ``pipelines.storage`` at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def create_bucket(self, name: str) -> None:
        storage.create_bucket(f"s3://{name}", self.storage_config())

    def upload_dir(self, local_dir, dest_uri: str) -> int:
        """Copy every file under ``local_dir`` to ``dest_uri`` (``s3://bucket/prefix``); returns the number copied."""
        local_dir = Path(local_dir).resolve()
        if not local_dir.is_dir():
            raise NotADirectoryError(local_dir)
        n_files = sum(1 for p in local_dir.rglob("*") if p.is_file())
        fs, dest = storage.resolve(dest_uri, self.storage_config())
        pafs.copy_files(str(local_dir), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        return n_files


# --- command line -------------------------------------------------------------------------------------------------
def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run a local S3 server (moto) in the foreground; Ctrl-C stops it.")
    parser.add_argument("--bucket", required=True, help="bucket to create")
    parser.add_argument("--upload", type=Path, default=None, help="local folder to copy into the bucket")
    parser.add_argument("--prefix", default="", help="key prefix for the uploaded files")
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    return parser.parse_args(argv)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse_args(argv)
    # SIGTERM (a supervisor, `kill`) stops the server group as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        with LocalS3Server(port=args.port) as server:
            server.create_bucket(args.bucket)
            target = storage.join(f"s3://{args.bucket}", args.prefix)
            if args.upload is not None:
                count = server.upload_dir(args.upload, target)
                print(f"uploaded {count} files to {target}", flush=True)
            print(f"S3 server ready: {server.endpoint_url}  bucket: s3://{args.bucket}  (log: {server.log_path})")
            # A throwaway key of a local server (moto accepts any key); printed so the user can export it.
            for name, value in server.env().items():
                print(f"export {name}={value}")
            sys.stdout.flush()
            while server.is_running():
                time.sleep(0.5)
            print(f"server exited; log tail:\n{server.log_tail()}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
