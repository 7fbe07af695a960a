"""infra/loopback_only.sh: `make test` and `make demo` run where nothing they start is reachable from another host."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WRAPPER = Path(__file__).resolve().parents[1] / "infra" / "loopback_only.sh"


def _namespaces_allowed() -> bool:
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    return subprocess.run(["unshare", "--map-root-user", "--net", "true"], capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(not _namespaces_allowed(), reason="this host refuses user network namespaces")


def _run(args, env=None, keep_marker=False, **kwargs):
    # Without the marker, the wrapper starts a namespace of its own even when the suite already runs in one.
    env = {k: v for k, v in (env or os.environ).items() if keep_marker or k != "MPFT_LOOPBACK_ONLY"}
    return subprocess.run([str(WRAPPER), *args], env=env, capture_output=True, text=True, timeout=60, **kwargs)


@needs_namespaces
def test_the_command_sees_only_loopback_under_its_own_identity():
    probe = ("import os, socket; "
             "print([n for _, n in socket.if_nameindex()], os.getuid(), os.getgid(), os.environ['MPFT_LOOPBACK_ONLY'])")
    done = _run([sys.executable, "-c", probe])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == f"['lo'] {os.getuid()} {os.getgid()} 1"


@needs_namespaces
def test_a_server_bound_on_every_interface_inside_is_unreachable_from_outside():
    token = os.urandom(8).hex()
    server = (
        "import socket, sys, threading; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(); "
        "print(s.getsockname()[1], flush=True); "
        f"threading.Thread(target=lambda: [s.accept()[0].sendall(b'{token}') for _ in iter(int, 1)], daemon=True)"
        ".start(); sys.stdin.read()"
    )
    inside = subprocess.Popen(
        [str(WRAPPER), sys.executable, "-c", server], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k != "MPFT_LOOPBACK_ONLY"},
    )
    try:
        port = int(inside.stdout.readline())
        assert _answer_on(port) != token.encode()  # refused, or some other service of this host on that number
    finally:
        inside.stdin.close()
        inside.wait(timeout=30)
    assert inside.returncode == 0


def _answer_on(port: int) -> bytes | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            return conn.recv(64)
    except OSError:
        return None


@needs_namespaces
def test_an_inherited_marker_is_not_trusted_outside_a_loopback_only_namespace():
    probe = "import socket; print([n for _, n in socket.if_nameindex()])"
    done = _run([sys.executable, "-c", probe], env={**os.environ, "MPFT_LOOPBACK_ONLY": "1"}, keep_marker=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['lo']"


@needs_namespaces
def test_the_exit_status_is_the_commands():
    assert _run(["sh", "-c", "exit 7"]).returncode == 7


def test_without_unshare_it_warns_and_runs_the_command_in_the_host_network(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("id", "sh", "bash"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    done = _run(["sh", "-c", 'echo "marker=${MPFT_LOOPBACK_ONLY:-unset}"; exit 3'], env={"PATH": str(bin_dir)})
    assert done.returncode == 3
    assert done.stdout.strip() == "marker=unset"
    assert "running in the host network" in done.stderr


@pytest.mark.skipif(os.environ.get("MPFT_LOOPBACK_ONLY") != "1", reason="the suite was not started by `make test`")
def test_the_suite_itself_runs_where_only_loopback_exists():
    assert [name for _, name in socket.if_nameindex()] == ["lo"]
