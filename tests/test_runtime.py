"""Stopping a private Ray instance leaves no process behind (pipelines/runtime.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipelines.processes import read_process
from pipelines.runtime import end_survivors

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")


def test_a_process_alive_after_the_grace_period_is_killed_and_others_are_left_alone():
    stuck = subprocess.Popen(["sleep", "60"])
    quick = subprocess.Popen(["sleep", "0.3"])
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        noted = [read_process(p.pid) for p in (stuck, quick)]
        # The bystander's pid as if it had been reused since it was noted: a different start time.
        reused = read_process(bystander.pid)._replace(started=read_process(bystander.pid).started - 1)

        start = time.monotonic()
        killed = end_survivors(noted + [reused], grace_s=1.5)

        assert killed == [stuck.pid]
        assert stuck.wait(timeout=5) == -9 and quick.wait(timeout=5) == 0
        assert time.monotonic() - start >= 1.5  # the stuck one got its grace period
        assert bystander.poll() is None  # not the process that was noted: untouched
    finally:
        for p in (stuck, quick, bystander):
            p.kill()
            p.wait()


PRIVATE_INSTANCE = """
import os, ray
from pipelines.processes import read_process
from pipelines.runtime import init_ray, local_ray_worker_processes, shutdown_ray

init_ray(num_cpus=1)

@ray.remote(num_cpus=0.25)
class Actor:
    def pid(self):
        return os.getpid()

actor_pid = ray.get(Actor.remote().pid.remote())
noted = {p.pid for p in local_ray_worker_processes()}
shutdown_ray(grace_s=10)
print("NOTED", actor_pid in noted, "ALIVE", read_process(actor_pid) is not None, "LEFT", len([
    p for p in noted if read_process(p) is not None]))
"""


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_private_instance_notes_its_workers_and_none_survives_its_shutdown():
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(PRIVATE_INSTANCE)], cwd=REPO, capture_output=True,
                          text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NOTED True ALIVE False LEFT 0" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
