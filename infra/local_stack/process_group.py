"""A server subprocess in its own process group: start it with a log file, wait until it is ready, stop all of it.

The local S3, MLflow and Ray servers all spawn children. Each runs in its own session (process group), so one signal
reaches every process it started, and stopping checks that no member of the group is left (killing only the parent
leaves the children serving).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

HOST = "127.0.0.1"


class PortReservation:
    """Ports held bound until the block ends, so every port picked inside it is distinct and was free at once.

        with PortReservation() as held:
            web, (admin, partner) = held.any(), held.pair(10000)
    """

    def __init__(self, host: str = HOST):
        self.host = host
        self._stack = ExitStack()

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def hold(self, port: int = 0, *, reuse_address: bool = False) -> Optional[int]:
        """Bind ``port`` (0: one the OS picks) and keep it; the port, or None if it is taken. ``reuse_address``
        ignores connections of a stopped server still in TIME_WAIT, as the server's own listener will."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, port))
        except OSError:
            sock.close()
            return None
        self._stack.enter_context(sock)
        return int(sock.getsockname()[1])

    def any(self) -> int:
        port = self.hold()
        if port is None:
            raise OSError("the OS found no free port")
        return port

    def pair(self, offset: int, attempts: int = 100) -> tuple[int, int]:
        """A free port ``p`` whose partner ``p + offset`` is free too; rejected candidates stay held meanwhile."""
        for _ in range(attempts):
            port = self.any()
            if port + offset <= 65535 and self.hold(port + offset) is not None:
                return port, port + offset
        raise RuntimeError(f"found no free port pair (p, p + {offset}) in {attempts} tries")


def reserve_free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct ports nothing listens on now; all sockets stay open until all are picked (no duplicates)."""
    with PortReservation(host) as held:
        return [held.any() for _ in range(count)]


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now (asked from the OS, so servers started side by side never collide)."""
    return reserve_free_ports(1, host)[0]


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


class GroupProcess:
    """``command`` started in a new session with stdout and stderr appended to ``log_path``."""

    def __init__(self, name: str, command: list[str], log_path: Path, *, env: Optional[dict] = None,
                 cwd: Optional[Path] = None):
        self.name = name
        self.command = command
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                start_new_session=True,  # own process group: one signal reaches everything it spawns
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> Optional[int]:
        return self.process.poll()

    def is_running(self) -> bool:
        return self.process.poll() is None

    def failure(self, what: str = "exited") -> str:
        code = self.process.poll()
        status = f"{what} with code {code}" if code is not None else what
        return f"{self.name} {status}; log tail ({self.log_path}):\n{log_tail(self.log_path)}"

    def wait_until(self, ready: Callable[[], bool], timeout: float, poll_seconds: float = 0.2) -> None:
        """Poll ``ready()`` until it is true; RuntimeError with the log tail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.exited() is not None:
                raise RuntimeError(self.failure("exited while starting"))
            if ready():
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(self.failure(f"was not ready within {timeout:.0f} s"))
            time.sleep(poll_seconds)

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)  # start_new_session made the process its group's leader
        except (ProcessLookupError, PermissionError):  # PermissionError: the id now belongs to another user
            pass

    def wait_group_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.process.poll()  # reap our direct child, or it stays a zombie member of the group
            try:
                os.killpg(self.process.pid, 0)
            except (ProcessLookupError, PermissionError):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def stop(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL what is left after ``grace_seconds``; RuntimeError if anything survives."""
        for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 5.0)):
            self.signal_group(sig)
            if self.wait_group_gone(wait):
                return
        raise RuntimeError(f"processes of the {self.name} group {self.process.pid} survived SIGKILL")
