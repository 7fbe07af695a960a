"""What Ray Data prints: by default its progress bars and per-dataset lines go to ray-data.log, not the console, on
the driver and in Ray workers (where Ray Train runs the validation pass); `verbose` leaves Ray's own behaviour."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]

# A dataset run on the driver and one run inside a Ray task, as Ray Train's workers run theirs; a warning logged in
# the task shows that its console output does reach the driver. Prints the folder of Ray Data's log files last.
SCRIPT = """
import logging, sys, time
import ray
from pipelines.runtime import init_ray, shutdown_ray
init_ray(num_cpus=2, verbose={verbose})
import ray.data
from ray.data._internal.logging import get_log_directory

ds = ray.data.range(64, override_num_blocks=4).map_batches(lambda batch: batch, num_cpus=0.5)
ds.take_all()

@ray.remote(num_cpus=0.5)
def in_a_worker(ds):
    rows = len(ds.take_all())
    logging.getLogger("ray.data").warning("warning from a worker")
    return rows

assert ray.get(in_a_worker.remote(ds)) == 64
time.sleep(3)  # worker output reaches the driver asynchronously
print(get_log_directory(), flush=True)
shutdown_ray()
"""


def run_script(verbose: bool) -> tuple[str, Path]:
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(verbose=verbose)], cwd=REPO, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr, Path(done.stdout.strip().splitlines()[-1])


def test_ray_data_progress_and_execution_lines_go_to_its_log_file():
    console, log_dir = run_script(verbose=False)

    assert "warning from a worker" in console  # warnings still reach the console, from workers too
    for noise in ("execution finished", "Starting execution", "Running Dataset", "Progress bars disabled"):
        assert noise not in console, noise
    assert (log_dir / "ray-data.log").read_text().count("execution finished") >= 2  # the driver's and the task's


def test_verbose_leaves_ray_data_its_console_output():
    console, _ = run_script(verbose=True)

    assert console.count("execution finished") >= 2 and "warning from a worker" in console
