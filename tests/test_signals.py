"""SIGTERM stops `mpft demo` like Ctrl-C: the S3 server, the MLflow server and Ray all go with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.processes import descendants, still_running

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")


def wait_for_line(proc: subprocess.Popen, prefix: str) -> list[str]:
    """The lines ``proc`` printed up to and including the first that starts with ``prefix``."""
    printed = []
    for line in proc.stdout:
        printed.append(line)
        if line.startswith(prefix):
            return printed
    raise AssertionError(f"exited before printing {prefix!r}:\n{''.join(printed)[-3000:]}")


def gone_within(processes, timeout_s: float) -> list:
    """The ``processes`` still running after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    left = [p for p in processes if still_running(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if still_running(p)]
    return left


def assert_sigterm_stops_everything(proc: subprocess.Popen, started: list, stderr_path: Path, timeout_s: float):
    """SIGTERM to ``proc``: it exits 143 saying so, and every process it ``started`` is gone soon after."""
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=timeout_s)
    stderr = stderr_path.read_text()

    assert code == 143, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr
    assert gone_within(started, 30) == []


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(420)
def test_sigterm_mid_training_stops_every_server_and_ray_process_the_demo_started(tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    stderr_path = tmp_path / "stderr.txt"  # a file, not a pipe: the demo's log lines must never block it
    with open(stderr_path, "w") as stderr_file:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "demo", "--quick", "--workdir",
                                 str(tmp_path / "demo")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=stderr_file, text=True, start_new_session=True)
    try:
        wait_for_line(proc, "[demo] corpus done")  # servers up, Ray up, training starting
        started = descendants(proc.pid)
        names = {p.name for p in started}
        assert "raylet" in names and "weed" in names, names

        assert_sigterm_stops_everything(proc, started, stderr_path, timeout_s=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_sigterm_mid_scoring_stops_ray_and_releases_the_output(tmp_path):
    from PIL import Image

    from pipelines.scoring import OUTPUT_LEASE
    from tests.helpers.images import fake_images
    from tests.helpers.models import tiny_checkpoint

    crawl = tmp_path / "crawl"
    crawl.mkdir()
    for i, pixels in enumerate(fake_images(400, 48, seed=1)):  # enough that the job is still scoring at SIGTERM
        Image.fromarray(pixels).save(crawl / f"{i:04d}.png")
    checkpoint = tiny_checkpoint(tmp_path / "model", threshold=0.5, seed=0)
    out = tmp_path / "scores"
    env = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr_file:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "score", "--model", str(checkpoint), "--input",
                                 str(crawl), "--output", str(out), "--batch-size", "4", "--num-actors", "1"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr_file,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / OUTPUT_LEASE).exists() and "raylet" in {p.name for p in descendants(proc.pid)}):
            assert proc.poll() is None and time.monotonic() < deadline, stderr_path.read_text()[-3000:]
            time.sleep(0.2)
        started = descendants(proc.pid)

        assert_sigterm_stops_everything(proc, started, stderr_path, timeout_s=120)
        assert not (out / OUTPUT_LEASE).exists()  # released: a rerun need not wait for it to expire
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
