"""Every shipped example config validates against the job schemas (a renamed field must fail here, not on a GPU)."""

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
