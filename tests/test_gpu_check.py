"""`make gpu-check` on the CPU: the same script, steps and functions as on a GPU machine, with a tiny model and gloo.

This keeps the GPU check from rotting between the rare runs on a GPU machine; on the CPU it also proves the Ray-free
training functions (two-process DDP, checkpoint from the wrapped model, failure + resume) do what the check says.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(600)


@pytest.mark.slow
def test_gpu_check_passes_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu",
                           "--batch-size", "4", "--steps-per-epoch", "2", "--throughput-repeats", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=580, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    steps = results["steps"]
    assert set(steps) == {"ddp_three_epochs", "failure_and_resume", "checkpoint_reload", "scoring_kernel",
                          "throughput"}
    assert all(step["ok"] for step in steps.values())
    assert steps["ddp_three_epochs"]["replicas_agree_per_epoch"] == [True, True, True]
    assert steps["failure_and_resume"]["start_epoch"] == 2
    # On the CPU the resumed run is deterministic: it must land exactly where the uninterrupted one did.
    assert steps["failure_and_resume"]["distance_to_uninterrupted"] == 0.0
    assert steps["failure_and_resume"]["optimizer_restored"] is True
    assert steps["checkpoint_reload"]["max_abs_diff"] == 0.0


def test_gpu_check_says_so_when_there_is_no_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
