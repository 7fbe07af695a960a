"""The local Ray cluster finds its processes by its marker variable or its temp dir, and kills only those."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.local_stack.ray_cluster import (
    CLUSTER_MARKER_VAR,
    LocalRayCluster,
    NodeExitedDuringStartup,
    kill_processes_of,
    live_processes_of,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")

SLEEP = "import time; time.sleep(60)"


def _start(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLEEP, *args], env={**os.environ, **(env or {})})


def test_processes_are_found_by_marker_or_temp_dir_argument_and_killed_and_a_sibling_dir_is_left_alone(tmp_path):
    root = str(tmp_path / "rc")
    marked = _start(env={CLUSTER_MARKER_VAR: root})
    naming_root = _start(f"--temp-dir={root}/h")
    sibling = _start(f"--temp-dir={root}2/h", env={CLUSTER_MARKER_VAR: root + "2"})
    started = [marked, naming_root, sibling]
    try:
        deadline = time.monotonic() + 10
        while len(live_processes_of(root)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # until both children have exec'd the interpreter with their arguments

        assert live_processes_of(root) == sorted([marked.pid, naming_root.pid])
        assert kill_processes_of(root) == []
        assert marked.wait(timeout=5) == naming_root.wait(timeout=5) == -9
        assert sibling.poll() is None and live_processes_of(root + "2") == [sibling.pid]
    finally:
        for process in started:
            process.kill()
            process.wait()


class _HeadThatDiesOnStart(LocalRayCluster):
    """A cluster whose head node exits at once, noting the GCS port of each attempt."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.gcs_ports: list[int] = []

    def head_command(self) -> list[str]:
        self.gcs_ports.append(self._ports["gcs"])
        return [sys.executable, "-c", "import sys; print('raylet did not register'); sys.exit(1)"]


def test_a_node_that_dies_while_starting_gets_one_more_try_on_fresh_ports_then_the_error():
    cluster = _HeadThatDiesOnStart(startup_timeout=30)

    with pytest.raises(NodeExitedDuringStartup, match="head node exited with code 1"):
        cluster.start()

    assert len(cluster.gcs_ports) == 2 and cluster.gcs_ports[0] != cluster.gcs_ports[1]
    assert not Path(cluster.temp_root).exists() and cluster.leftover_processes() == []
