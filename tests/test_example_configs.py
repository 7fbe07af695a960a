"""Shipped examples work: every config validates against the job schemas, the quickstart script runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.config import load_train_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_train_config_validates(path):
    cfg = load_train_config(path)
    assert cfg.name and cfg.train and cfg.val


def test_the_paper_protocol_config_trains_vit_l14_openai_on_sd14_only():
    cfg = load_train_config(next(p for p in EXAMPLES if p.name == "genimage-vitl14-sdv14.yaml"))
    assert (cfg.method.detector.backbone.name, cfg.method.detector.backbone.pretrained) == ("ViT-L-14", "openai")
    assert [s.subsets for s in cfg.train] == [["stable_diffusion_v_1_4"]]
    assert cfg.method.detector.mask.strategy == "tam"


def test_quickstart_script_runs_on_mpft_core_alone():
    """The foundation issue's notebook-style script: build, mask, train ten steps, save and reload."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "examples/quickstart.py"], cwd=repo, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # It must not have pulled in the platform: the core library stands alone.
    probe = subprocess.run([sys.executable, "-c", "import runpy, sys; runpy.run_path('examples/quickstart.py'); "
                            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))"],
                           cwd=repo, capture_output=True, text=True, timeout=240)
    assert probe.stdout.strip().splitlines()[-1] == "[]"
