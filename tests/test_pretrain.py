"""The pre-trained stand-in backbone (mpft_core/pretrain.py, `mpft pretrain-standin`): its file loads through the
normal weights path with the trained tower, pre-training lowers the contrastive loss on photos it never saw, the same
seed gives the same file, and the command neither redoes a file made with the same settings nor silently replaces
one made with other settings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from jobs import cli
from jobs.sample_corpus import HELDOUT_PHOTOS, TRAIN_PHOTOS, load_photo
from mpft_core.backbone import WEIGHTS_ACTIVATION_KEY, weights_metadata
from mpft_core.config import BackboneConfig, DetectorConfig
from mpft_core.detector import build_detector
from mpft_core.pretrain import (
    PretrainConfig,
    build_initial,
    heldout_loss,
    pretrain,
    provenance,
    recorded_provenance,
    save_standin,
)

# Enough steps for the held-out loss to fall clearly (by 0.56 to 0.68 nats over seeds 0-2), few enough for seconds.
QUICK = PretrainConfig(steps=60, batch_size=32, warmup_steps=5)
# The drop in held-out loss (nats) that training must reach; chance level at batch 32 is ln(63) = 4.14.
MIN_HELDOUT_DROP = 0.2


@pytest.fixture(scope="module")
def photos():
    return [load_photo(name) for name in TRAIN_PHOTOS]


@pytest.fixture(scope="module")
def trained(photos):
    return pretrain(photos, QUICK)


def test_the_weight_file_loads_through_the_normal_weights_path_with_the_trained_tower(trained, photos, tmp_path):
    path = tmp_path / "standin.safetensors"
    save_standin(trained, path)

    # No backbone.activation given: loading works only because the file states it.
    detector = build_detector(DetectorConfig(backbone=BackboneConfig(name=QUICK.model, pretrained=str(path))))

    assert weights_metadata(path)[WEIGHTS_ACTIVATION_KEY] == trained.architecture.activation == "gelu"
    assert detector.config.backbone.activation == "gelu"
    assert detector.preprocess == trained.preprocess
    loaded, learnt = detector.visual.state_dict(), trained.model.visual.state_dict()
    assert loaded.keys() == learnt.keys()
    assert all(torch.equal(loaded[name], learnt[name]) for name in loaded)
    initial = build_initial(QUICK, photos).model.visual.state_dict()
    moved = [name for name in loaded if not torch.equal(loaded[name], initial[name])]
    assert moved == list(loaded)  # every tensor of the tower was trained, none left at random init
    assert recorded_provenance(path) == provenance(QUICK, photos)


def test_pretraining_lowers_the_contrastive_loss_on_photos_it_never_saw(trained, photos):
    heldout = [load_photo(name) for name in HELDOUT_PHOTOS]
    # The same views for both models (heldout_loss draws them from its own fixed seed), several batches averaged.
    before = heldout_loss(build_initial(QUICK, photos), heldout, QUICK, batches=6)
    after = heldout_loss(trained, heldout, QUICK, batches=6)
    assert after < before - MIN_HELDOUT_DROP, (before, after)


def test_the_same_seed_gives_the_same_weights_and_another_seed_others(photos, tmp_path):
    tiny = PretrainConfig(steps=3, batch_size=8, warmup_steps=1)
    files = {}
    for name, cfg in {"first": tiny, "again": tiny, "seed 1": tiny.model_copy(update={"seed": 1})}.items():
        files[name] = tmp_path / f"{name}.safetensors"
        save_standin(pretrain(photos, cfg), files[name])
    first, again, other = (load_file(files[name]) for name in ("first", "again", "seed 1"))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["visual.conv1.weight"], other["visual.conv1.weight"])
    # The bytes may differ: safetensors writes the metadata in hash-map order. What they say may not.
    assert weights_metadata(files["first"]) == weights_metadata(files["again"])


def test_the_command_keeps_a_file_made_with_the_same_settings_and_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "weights" / "standin.safetensors"
    command = ["pretrain-standin", "--out", str(out), "--steps", "2"]
    assert cli.main(command) == 0
    printed = capsys.readouterr().out
    summary = json.loads(next(line for line in printed.splitlines() if line.startswith("{")))
    assert (summary["path"], summary["steps"]) == (str(out), 2)
    assert f"method.detector.backbone.pretrained: {out.resolve()}" in printed
    made = out.read_bytes(), out.stat().st_mtime_ns

    assert cli.main(command) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out.read_bytes(), out.stat().st_mtime_ns) == made

    with pytest.raises(SystemExit) as refused:
        cli.main(["pretrain-standin", "--out", str(out), "--steps", "3"])
    assert refused.value.code == 2
    assert "steps: 2 there, 3 here" in capsys.readouterr().err
    assert (out.read_bytes(), out.stat().st_mtime_ns) == made

    assert cli.main(["pretrain-standin", "--out", str(out), "--steps", "1", "--force"]) == 0
    assert recorded_provenance(out)["config"]["steps"] == 1
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary file left behind


def test_the_command_refuses_to_replace_a_file_it_did_not_make(tmp_path, capsys):
    out = tmp_path / "other.safetensors"
    out.write_bytes(b"someone else's weights")
    with pytest.raises(SystemExit) as refused:
        cli.main(["pretrain-standin", "--out", str(out)])
    assert refused.value.code == 2
    assert "was not made by `mpft pretrain-standin`" in capsys.readouterr().err
    assert out.read_bytes() == b"someone else's weights"


def test_the_command_has_help_through_the_mpft_cli(capsys):
    with pytest.raises(SystemExit) as shown:
        cli.main(["pretrain-standin", "--help"])
    assert shown.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--out", "--model", "--steps", "--seed", "--force"))
