"""Shipped examples work: every config validates against the job schemas, the quickstart script runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.config import load_train_config
from pipelines.subset_names import canonical_subset

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_train_config_validates(path):
    cfg = load_train_config(path)
    assert cfg.name and cfg.train and cfg.val


def test_the_paper_protocol_config_trains_vit_l14_openai_on_sd14_only():
    cfg = load_train_config(next(p for p in EXAMPLES if p.name == "genimage-vitl14-sdv14.yaml"))
    assert (cfg.method.detector.backbone.name, cfg.method.detector.backbone.pretrained) == ("ViT-L-14", "openai")
    assert [canonical_subset(name) for s in cfg.train for name in s.subsets] == ["sdv14"]
    assert cfg.method.detector.mask.strategy == "tam"


def test_the_paper_protocol_validates_on_a_part_carved_from_the_training_split():
    """GenImage's val folders are the protocol's test sets: checkpoints and the threshold must not be chosen there."""
    cfg = load_train_config(next(p for p in EXAMPLES if p.name == "genimage-vitl14-sdv14.yaml"))
    [train], [val] = cfg.train, cfg.val

    assert val.split == train.split == "train"
    assert (val.uri, val.layout, val.subsets) == (train.uri, train.layout, train.subsets)
    assert train.carve is not None and val.carve is not None
    assert train.carve.fraction == val.carve.fraction
    assert (train.carve.keep, val.carve.keep) == ("rest", "carved")


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
