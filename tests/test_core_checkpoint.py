"""Checkpoints (safetensors + JSON only) and backbone weight sources (local file, s3:// via resolver, tags)."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from mpft_core.backbone import (
    create_backbone,
    register_shipped_configs,
    resolve_architecture,
    save_clip_weights,
    tower_activation,
)
from mpft_core.checkpoint import load_checkpoint, save_checkpoint
from mpft_core.checkpoint_format import read_checkpoint_meta
from mpft_core.config import BackboneConfig, DetectorConfig, MaskConfig, OptimConfig
from mpft_core.detector import build_detector
from mpft_core.optim import make_optimizer, train_step
from mpft_core.transforms import Preprocess


def tiny_detector(**overrides):
    cfg = DetectorConfig(
        backbone=BackboneConfig(name="mpft-tiny-32", pretrained="openai-like-tag-recorded-only", activation="gelu"),
        mask=MaskConfig(strategy="tam", ratio=0.5, mode="drop"),
        **overrides,
    )
    # Record a weight source but build with random init: the loader must never try to fetch it.
    detector = build_detector(cfg.model_copy(update={"backbone": BackboneConfig(name="mpft-tiny-32", pretrained=None)}))
    detector.config = cfg
    return detector


def trained_tiny_detector():
    torch.manual_seed(0)
    detector = tiny_detector(trainable="last-k", last_k=1)
    optimizer = make_optimizer(detector, OptimConfig(backbone_lr=1e-3))
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    for _ in range(2):
        train_step(detector, images, [0, 1, 0, 1], optimizer)
    return detector


def test_round_trip_reproduces_logits_bit_for_bit(tmp_path):
    detector = trained_tiny_detector()
    detector.threshold = 0.73
    detector.real_threshold = 0.41
    detector.preprocess = Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = detector.eval()(x)

    directory = save_checkpoint(detector, tmp_path / "ckpt", extra={"step": 2, "val_acc": 0.5})
    restored = load_checkpoint(directory)

    with torch.no_grad():
        assert torch.equal(restored(x), expected)
    assert not restored.training
    assert (restored.threshold, restored.real_threshold) == (0.73, 0.41)
    assert restored.preprocess == detector.preprocess
    assert restored.config == detector.config  # including the recorded pretrained source
    assert {n for n, p in restored.named_parameters() if p.requires_grad} == {
        n for n, p in detector.named_parameters() if p.requires_grad
    }


def test_checkpoint_directory_holds_only_safetensors_and_json(tmp_path):
    directory = save_checkpoint(tiny_detector(), tmp_path / "ckpt", extra={"manifest_sha256": "abc"})
    assert sorted(p.name for p in directory.iterdir()) == ["model.safetensors", "mpft.json"]

    meta = read_checkpoint_meta(directory)
    assert meta["extra"] == {"manifest_sha256": "abc"}
    assert meta["detector"]["backbone"]["pretrained"] == "openai-like-tag-recorded-only"
    assert meta["preprocess"]["image_size"] == 32
    assert meta["threshold"] == 0.5
    assert meta["real_threshold"] == 0.5  # never set: no uncertain band


def test_a_detector_whose_real_threshold_was_never_set_keeps_no_uncertain_band(tmp_path):
    detector = tiny_detector()
    detector.threshold = 0.62
    restored = load_checkpoint(save_checkpoint(detector, tmp_path / "ckpt"))
    assert restored.real_threshold == restored.threshold == 0.62


def _rewrite_meta(directory, **changes) -> None:
    """Edit ``mpft.json`` in place; a value of None removes that key (a file written by an older version)."""
    meta = read_checkpoint_meta(directory)
    for key, value in changes.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    (directory / "mpft.json").write_text(json.dumps(meta))


def test_a_checkpoint_written_without_real_threshold_loads_with_no_uncertain_band(tmp_path):
    detector = tiny_detector()
    detector.threshold, detector.real_threshold = 0.66, 0.3
    directory = save_checkpoint(detector, tmp_path / "ckpt")
    _rewrite_meta(directory, real_threshold=None)

    restored = load_checkpoint(directory)
    assert restored.real_threshold == restored.threshold == 0.66


@pytest.mark.parametrize("read", [load_checkpoint, read_checkpoint_meta], ids=["load", "description only"])
def test_a_checkpoint_whose_real_threshold_is_above_its_threshold_is_refused_before_any_weights_load(tmp_path, read):
    directory = save_checkpoint(tiny_detector(), tmp_path / "ckpt")
    _rewrite_meta(directory, threshold=0.4, real_threshold=0.6)
    with pytest.raises(ValueError, match="real_threshold 0.6 is above threshold 0.4"):
        read(directory)


def test_moving_a_loaded_detector_s_threshold_never_inverts_its_band_or_breaks_its_checkpoint(tmp_path):
    from mpft_core.scoring import verdicts

    detector = tiny_detector()
    detector.threshold, detector.real_threshold = 0.7, 0.4
    banded = load_checkpoint(save_checkpoint(detector, tmp_path / "banded"))
    banded.threshold = 0.3  # below the recorded real_threshold: the band closes
    assert banded.real_threshold == 0.3
    assert verdicts([0.29, 0.3], [None, None], banded.threshold, banded.real_threshold) == ["real", "generated"]
    assert load_checkpoint(save_checkpoint(banded, tmp_path / "moved")).real_threshold == 0.3

    unbanded = load_checkpoint(save_checkpoint(tiny_detector(), tmp_path / "plain"))
    unbanded.threshold = 0.8  # no band was recorded: none opens
    assert unbanded.real_threshold == 0.8


def test_loader_accepts_the_safetensors_file_path(tmp_path):
    detector = tiny_detector()
    directory = save_checkpoint(detector, tmp_path / "ckpt")
    restored = load_checkpoint(directory / "model.safetensors")
    pairs = zip(restored.state_dict().values(), detector.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_loader_refuses_a_pickle_file(tmp_path):
    pickle_path = tmp_path / "model.pt"
    torch.save(tiny_detector().state_dict(), pickle_path)
    with pytest.raises(ValueError, match="refusing"):
        load_checkpoint(pickle_path)


def test_loader_refuses_a_pickle_disguised_as_safetensors(tmp_path):
    directory = save_checkpoint(tiny_detector(), tmp_path / "ckpt")
    torch.save(tiny_detector().state_dict(), directory / "model.safetensors")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_checkpoint(directory)


def test_loader_refuses_a_directory_without_description(tmp_path):
    directory = save_checkpoint(tiny_detector(), tmp_path / "ckpt")
    (directory / "mpft.json").unlink()
    with pytest.raises(ValueError, match="mpft.json"):
        load_checkpoint(directory)


def test_loader_refuses_weights_of_another_architecture(tmp_path):
    directory = save_checkpoint(tiny_detector(), tmp_path / "ckpt")
    meta = json.loads((directory / "mpft.json").read_text())
    meta["architecture"]["vision_cfg"]["width"] = 96
    (directory / "mpft.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_checkpoint(directory)


def test_loader_refuses_a_description_whose_model_names_disagree(tmp_path):
    directory = save_checkpoint(tiny_detector(), tmp_path / "ckpt")
    meta = json.loads((directory / "mpft.json").read_text())
    meta["detector"]["backbone"]["name"] = "mpft-tiny-224"
    (directory / "mpft.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="inconsistent"):
        load_checkpoint(directory)


def test_unserialisable_extra_fails_before_writing(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tiny_detector(), tmp_path / "ckpt", extra={"tensor": torch.zeros(1)})
    assert not any((tmp_path / "ckpt").iterdir())


# --- backbone weight sources ------------------------------------------------------------------------------------


@pytest.fixture
def open_clip_weights(tmp_path):
    """An open_clip-style CLIP state dict (both towers) for mpft-tiny-32, as safetensors."""
    register_shipped_configs()
    torch.manual_seed(123)
    model = open_clip.create_model("mpft-tiny-32", pretrained=None)
    path = tmp_path / "clip-tiny.safetensors"
    save_clip_weights(model, path, "gelu")
    return path, {k.removeprefix("visual."): v for k, v in model.state_dict().items() if k.startswith("visual.")}


def assert_same_weights(visual, expected: dict):
    state = visual.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_local_safetensors_file_loads_the_vision_weights(open_clip_weights):
    path, expected = open_clip_weights
    torch.manual_seed(999)  # a different seed: a random init would not match
    visual, preprocess, _ = create_backbone(BackboneConfig(name="mpft-tiny-32", pretrained=str(path)))
    assert_same_weights(visual, expected)
    assert preprocess.image_size == 32


def test_s3_weights_need_a_resolver(open_clip_weights):
    with pytest.raises(ValueError, match="resolve_uri"):
        create_backbone(BackboneConfig(name="mpft-tiny-32", pretrained="s3://models/clip-tiny.safetensors"))


def test_s3_weights_load_through_the_resolver(open_clip_weights):
    path, expected = open_clip_weights
    asked = []

    def fake_resolver(uri):
        asked.append(uri)
        return path

    visual, _, _ = create_backbone(
        BackboneConfig(name="mpft-tiny-32", pretrained="s3://models/clip-tiny.safetensors"), resolve_uri=fake_resolver
    )
    assert asked == ["s3://models/clip-tiny.safetensors"]
    assert_same_weights(visual, expected)


def test_pickled_backbone_weights_are_refused(tmp_path):
    path = tmp_path / "clip.pt"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="safetensors"):
        create_backbone(BackboneConfig(name="mpft-tiny-32", pretrained=str(path)))


def test_unknown_tag_or_missing_file_is_a_clear_error():
    with pytest.raises(ValueError, match="neither an existing file nor an open_clip pretrained tag"):
        create_backbone(BackboneConfig(name="mpft-tiny-32", pretrained="/no/such/weights.safetensors"))


def test_preprocess_comes_from_the_open_clip_tag(monkeypatch):
    # A tag with non-CLIP normalisation; open_clip's download is stubbed (no network) with random-init weights.
    tag = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "hf_hub": "none/none", "quick_gelu": True}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, t: tag if t == "fake-tag" else {})
    monkeypatch.setattr("open_clip.factory.get_pretrained_cfg", lambda name, t: tag)
    monkeypatch.setattr("open_clip.factory.download_pretrained", lambda cfg, cache_dir=None: None)

    visual, preprocess, architecture = create_backbone(BackboneConfig(name="mpft-tiny-32", pretrained="fake-tag"))

    assert preprocess == Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    # The tag was trained with QuickGELU, so the tower must use it even though the config does not say so.
    assert type(visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert architecture.activation == "quick_gelu"


# ------------------------------------------------------------------------------- the activation weights do not carry


def test_openai_tags_resolve_to_quick_gelu_and_a_contradicting_config_is_refused():
    tag_cfg = open_clip.get_pretrained_cfg("ViT-L-14", "openai")
    openai = BackboneConfig(name="ViT-L-14", pretrained="openai")
    assert resolve_architecture(openai, tag_cfg=tag_cfg).activation == "quick_gelu"
    with pytest.raises(ValueError, match="trained with 'quick_gelu'"):
        resolve_architecture(openai.model_copy(update={"activation": "gelu"}), tag_cfg=tag_cfg)
    # Random init follows the architecture's own config (GELU for the plain ViT-L-14).
    assert resolve_architecture(BackboneConfig(name="ViT-L-14", pretrained=None)).activation == "gelu"


def test_a_weight_file_that_does_not_state_its_activation_must_be_told(tmp_path):
    register_shipped_configs()
    model = open_clip.create_model("mpft-tiny-32", pretrained=None, force_quick_gelu=True)
    path = tmp_path / "converted-elsewhere.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))  # no metadata

    with pytest.raises(ValueError, match="does not say which activation"):
        create_backbone(BackboneConfig(name="mpft-tiny-32", pretrained=str(path)))
    told = create_backbone(BackboneConfig(name="mpft-tiny-32", pretrained=str(path), activation="quick_gelu"))
    assert tower_activation(told.visual) == "quick_gelu"


def test_a_weight_file_states_its_activation_and_a_contradicting_config_is_refused(tmp_path):
    register_shipped_configs()
    model = open_clip.create_model("mpft-tiny-32", pretrained=None, force_quick_gelu=True)
    path = tmp_path / "openai-like.safetensors"
    save_clip_weights(model, path, "quick_gelu")

    detector = build_detector(DetectorConfig(backbone=BackboneConfig(name="mpft-tiny-32", pretrained=str(path))))
    assert tower_activation(detector.visual) == "quick_gelu"
    assert detector.config.backbone.activation == "quick_gelu"  # the saved config says it explicitly
    with pytest.raises(ValueError, match="trained with 'quick_gelu'"):
        build_detector(DetectorConfig(backbone=BackboneConfig(name="mpft-tiny-32", pretrained=str(path),
                                                              activation="gelu")))


def test_a_quick_gelu_checkpoint_reloads_as_the_same_function(tmp_path):
    register_shipped_configs()
    torch.manual_seed(5)
    model = open_clip.create_model("mpft-tiny-32", pretrained=None, force_quick_gelu=True)
    path = tmp_path / "openai-like.safetensors"
    save_clip_weights(model, path, "quick_gelu")
    detector = build_detector(DetectorConfig(backbone=BackboneConfig(name="mpft-tiny-32", pretrained=str(path))))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = detector.eval()(x)

    restored = load_checkpoint(save_checkpoint(detector, tmp_path / "ckpt"))

    assert tower_activation(restored.visual) == "quick_gelu"
    with torch.no_grad():
        assert torch.equal(restored(x), expected)
    # The control: the same tensors in a GELU tower compute something else, so a lost activation would show.
    gelu = build_detector(DetectorConfig(backbone=BackboneConfig(name="mpft-tiny-32", pretrained=None)))
    gelu.load_state_dict(detector.state_dict())
    with torch.no_grad():
        assert not torch.allclose(gelu.eval()(x), expected)


def test_a_format_1_checkpoint_is_rebuilt_with_the_activation_its_training_used(tmp_path):
    detector = tiny_detector()
    directory = save_checkpoint(detector, tmp_path / "ckpt")
    meta = json.loads((directory / "mpft.json").read_text())
    meta["format_version"] = 1
    del meta["architecture"]
    meta["detector"]["backbone"] = {"name": "mpft-tiny-32", "pretrained": None}
    (directory / "mpft.json").write_text(json.dumps(meta))

    restored = load_checkpoint(directory)
    assert tower_activation(restored.visual) == "gelu"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(restored(x), detector.eval()(x))


def test_a_wrapped_detector_saves_under_plain_names(tmp_path):
    detector = tiny_detector()
    directory = save_checkpoint(torch.nn.DataParallel(detector), tmp_path / "ckpt")  # as DDP would wrap it
    restored = load_checkpoint(directory)
    assert restored.state_dict().keys() == detector.state_dict().keys()


def test_export_weights_writes_a_file_that_states_its_activation(tmp_path):
    from jobs.cli import main

    register_shipped_configs()
    model = open_clip.create_model("mpft-tiny-32", pretrained=None, force_quick_gelu=True)
    unstated = tmp_path / "converted-elsewhere.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(unstated))
    out = tmp_path / "stated.safetensors"

    assert main(["export-weights", "--model", "mpft-tiny-32", "--pretrained", str(unstated),
                 "--activation", "quick_gelu", "--output", str(out)]) == 0

    visual = create_backbone(BackboneConfig(name="mpft-tiny-32", pretrained=str(out))).visual  # no activation given
    assert tower_activation(visual) == "quick_gelu"
    assert_same_weights(visual, {k.removeprefix("visual."): v for k, v in model.state_dict().items()
                                 if k.startswith("visual.")})


def format_1_meta(name: str, pretrained) -> dict:
    return {"format": "mpft-detector", "format_version": 1, "threshold": 0.5, "extra": {},
            "preprocess": {"image_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3},
            "detector": {"backbone": {"name": name, "pretrained": pretrained}}}


@pytest.mark.parametrize("name, pretrained, activation", [
    ("ViT-L-14", "openai", "quick_gelu"),             # the tag was trained with QuickGELU
    ("ViT-B-32-quickgelu", None, "quick_gelu"),       # the architecture config names it
    ("ViT-B-32-quickgelu", "/weights/file.safetensors", "quick_gelu"),
    ("ViT-L-14", "/weights/file.safetensors", "gelu"),  # what format-1 training built from a file
])
def test_format_1_checkpoints_rebuild_the_activation_their_training_built(name, pretrained, activation):
    from mpft_core.checkpoint import recorded_architecture

    assert recorded_architecture(format_1_meta(name, pretrained)).activation == activation


def test_the_recorded_vision_config_holds_every_field_not_only_the_json(tmp_path):
    from open_clip.model import CLIPVisionCfg

    meta = json.loads((save_checkpoint(tiny_detector(), tmp_path / "ckpt") / "mpft.json").read_text())
    assert set(meta["architecture"]["vision_cfg"]) == set(CLIPVisionCfg.__dataclass_fields__)
    assert meta["architecture"]["vision_cfg"]["pool_type"] == "tok"


def test_an_exported_tag_keeps_the_tag_s_input_normalisation(monkeypatch, tmp_path):
    from mpft_core.backbone import export_clip_weights

    tag = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "hf_hub": "none/none"}  # a LAION-like tag, GELU
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, t: tag if t == "fake-tag" else {})
    monkeypatch.setattr("open_clip.factory.get_pretrained_cfg", lambda name, t: tag)
    monkeypatch.setattr("open_clip.factory.download_pretrained", lambda cfg, cache_dir=None: None)
    out = tmp_path / "exported.safetensors"
    export_clip_weights(BackboneConfig(name="mpft-tiny-32", pretrained="fake-tag"), out)
    monkeypatch.undo()

    backbone = create_backbone(BackboneConfig(name="mpft-tiny-32", pretrained=str(out)))
    assert backbone.preprocess == Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert backbone.architecture.activation == "gelu"


def test_a_resume_follows_the_run_s_config_on_the_recorded_tower(tmp_path):
    directory = save_checkpoint(tiny_detector(), tmp_path / "ckpt")
    run_config = DetectorConfig(backbone=BackboneConfig(name="mpft-tiny-32", pretrained=None),
                                mask=MaskConfig(strategy="random", ratio=0.25), trainable="probe")

    resumed = load_checkpoint(directory, config=run_config)
    assert resumed.config.mask == run_config.mask and resumed.config.trainable == "probe"
    assert resumed.config.backbone.activation == "gelu"
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    with pytest.raises(ValueError, match="holds a 'mpft-tiny-32' tower"):
        load_checkpoint(directory, config=DetectorConfig(backbone=BackboneConfig(name="mpft-tiny-224")))


def test_optimizer_state_is_only_restored_onto_a_model_already_on_its_device(tmp_path):
    from mpft_core.config import MethodConfig
    from mpft_core.distributed import restore_training_state, save_training_checkpoint, setup_training

    method = MethodConfig(detector=DetectorConfig(backbone=BackboneConfig(name="mpft-tiny-32", pretrained=None)))
    setup = setup_training(method, torch.device("cpu"), total_steps=4)
    train_step(setup.model, torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8), [0, 1, 0, 1],
               setup.optimizer, scheduler=setup.scheduler)
    setup.global_step = 1
    directory = save_training_checkpoint(setup, tmp_path / "ckpt", epoch=0)

    resumed = setup_training(method, torch.device("cpu"), total_steps=4, resume_from=directory)
    assert (resumed.start_epoch, resumed.global_step, resumed.resumed) == (1, 1, True)
    saved = setup.optimizer.state_dict()["state"]
    assert all(torch.equal(resumed.optimizer.state_dict()["state"][i][k], v)
               for i, state in saved.items() for k, v in state.items())
    resumed.device = torch.device("meta")  # as if the detector had not been moved to its device yet
    with pytest.raises(RuntimeError, match="before restoring"):
        restore_training_state(resumed, directory)


# ---------------------------------------------------------------------------------------------------- no leftovers


def test_a_save_that_fails_midway_leaves_no_hidden_half_written_file(tmp_path):
    from mpft_core.checkpoint import _atomic_write

    def write_then_run_out_of_space(tmp):
        tmp.write_bytes(b"half a tensor")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        _atomic_write(tmp_path / "model.safetensors", write_then_run_out_of_space)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_s_description_is_read_without_importing_torch_or_open_clip(tmp_path):
    """Drivers (a scoring job shipping the model to its actors) read it before any detector exists: importing torch
    and open_clip for that cost seconds before the first row."""
    import subprocess
    import sys

    directory = save_checkpoint(tiny_detector(), tmp_path / "ckpt")
    code = ("import sys; from mpft_core.checkpoint_format import read_checkpoint_meta; "
            f"meta = read_checkpoint_meta({str(directory)!r}); "
            "print(meta['format'], 'torch' in sys.modules, 'open_clip' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["mpft-detector", "False", "False"]
