"""Detector behaviour: masking in training only, drop vs fill, trainable policies, shipped configs, optimiser."""

from __future__ import annotations

import pytest
import torch

from mpft_core.backbone import create_backbone, input_size, shipped_config_names
from mpft_core.config import BackboneConfig, DetectorConfig, MaskConfig, OptimConfig
from mpft_core.detector import MPFTDetector, build_detector, encode_visible_patches, fill_masked_patches
from mpft_core.optim import make_optimizer, make_scheduler, train_step
from mpft_core.tam import select_masked_patches


def tiny_config(name: str = "mpft-tiny-32", **overrides) -> DetectorConfig:
    mask = overrides.pop("mask", {})
    return DetectorConfig(
        backbone=BackboneConfig(name=name, pretrained=None), mask=MaskConfig(**mask), **overrides
    )


def random_images(detector: MPFTDetector, n: int = 2, seed: int = 0) -> torch.Tensor:
    size = detector.preprocess.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def transformer_input_lengths(detector: MPFTDetector) -> tuple[list[int], object]:
    lengths: list[int] = []
    handle = detector.visual.transformer.register_forward_hook(
        lambda module, inputs, output: lengths.append(inputs[0].shape[1])
    )
    return lengths, handle


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", shipped_config_names())
def test_every_shipped_config_trains_forward_and_backward_on_cpu(name):
    detector = build_detector(tiny_config(name, mask={"ratio": 0.5, "mode": "drop"}))
    x = random_images(detector)

    detector.train()
    logits = detector(x)
    logits.sum().backward()

    assert logits.shape == (2,)
    assert torch.isfinite(logits).all()
    assert all(p.grad is not None for p in detector.parameters() if p.requires_grad)
    assert detector.grid_size * detector.patch_size == detector.preprocess.image_size
    assert input_size(detector.config.backbone) == detector.preprocess.image_size


@pytest.mark.parametrize(("name", "size"), [("ViT-L-14", 224), ("ViT-L-14-336", 336), ("mpft-tiny-32", 32)])
def test_input_size_is_read_without_building_the_model(name, size):
    assert input_size(BackboneConfig(name=name)) == size


def test_shipped_configs_include_the_documented_ones():
    assert {"mpft-tiny-32", "mpft-tiny-224", "mpft-small-224"} <= set(shipped_config_names())


def test_drop_mode_feeds_fewer_tokens_to_the_transformer():
    detector = build_detector(tiny_config(mask={"strategy": "tam", "ratio": 0.5, "mode": "drop"}))
    lengths, handle = transformer_input_lengths(detector)
    x = random_images(detector, n=3)

    detector.train()
    train_logits = detector(x)
    detector.eval()
    detector(x)
    handle.remove()

    assert train_logits.shape == (3,)
    # 16 patches + class token in eval; half the patches dropped in training.
    assert lengths == [1 + 8, 1 + 16]


def test_fill_mode_keeps_every_token():
    detector = build_detector(tiny_config(mask={"strategy": "tam", "ratio": 0.5, "mode": "fill"}))
    lengths, handle = transformer_input_lengths(detector)
    detector.train()
    detector(random_images(detector))
    handle.remove()
    assert lengths == [1 + 16]


@pytest.mark.parametrize("name", ["mpft-tiny-32", "mpft-tiny-224"])
def test_drop_path_with_nothing_masked_equals_the_towers_own_forward(name):
    detector = build_detector(tiny_config(name)).eval()
    x = random_images(detector, n=3)
    nothing = torch.zeros(3, detector.grid_size**2, dtype=torch.bool)

    with torch.no_grad():
        assert torch.equal(encode_visible_patches(detector.visual, x, nothing), detector.visual(x))


def test_masked_patch_content_cannot_influence_the_output():
    detector = build_detector(tiny_config()).eval()
    x = random_images(detector, n=2)
    mask = select_masked_patches(torch.rand(2, 16), 0.5, "tam")
    # Change the pixels of the hidden patches only.
    scrambled = x + 5.0 * fill_masked_patches(torch.ones_like(x), ~mask, detector.patch_size).mul(
        torch.randn_like(x)
    )
    assert not torch.equal(scrambled, x)

    with torch.no_grad():
        dropped = encode_visible_patches(detector.visual, x, mask)
        dropped_scrambled = encode_visible_patches(detector.visual, scrambled, mask)
        filled = detector.visual(fill_masked_patches(x, mask, detector.patch_size))
        filled_scrambled = detector.visual(fill_masked_patches(scrambled, mask, detector.patch_size))

    assert torch.allclose(dropped, dropped_scrambled, atol=1e-6)
    assert torch.equal(filled, filled_scrambled)


def test_fill_sets_hidden_patches_to_the_normalisation_mean():
    x = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 5] = True  # row 1, column 1 -> pixels [8:16, 8:16]
    filled = fill_masked_patches(x, mask, 8)

    assert (filled[0, :, 8:16, 8:16] == 0).all()
    untouched = torch.ones_like(x, dtype=torch.bool)
    untouched[0, :, 8:16, 8:16] = False
    assert torch.equal(filled[untouched], x[untouched])


@pytest.mark.parametrize("mode", ["fill", "drop"])
def test_masking_only_happens_in_training(mode):
    detector = build_detector(tiny_config(dropout=0.0, mask={"strategy": "tam", "ratio": 0.5, "mode": mode}))
    x = random_images(detector)

    with torch.no_grad():
        detector.eval()
        eval_logits = detector(x)
        unmasked = detector.head(detector.embed(x)).squeeze(-1)
        detector.train()
        train_logits = detector(x)

    assert torch.equal(eval_logits, unmasked)
    assert not torch.allclose(train_logits, eval_logits)


def test_training_without_masking_or_dropout_equals_eval():
    detector = build_detector(tiny_config(dropout=0.0, mask={"strategy": "none"}))
    x = random_images(detector)
    with torch.no_grad():
        train_logits = detector.train()(x)
        eval_logits = detector.eval()(x)
    # Not bit-exact: in eval mode torch's MultiheadAttention takes its fused fast path (float rounding only).
    assert torch.allclose(train_logits, eval_logits, rtol=1e-5, atol=1e-6)


def trainable_names(detector: MPFTDetector) -> set[str]:
    return {name for name, p in detector.named_parameters() if p.requires_grad}


def test_full_policy_trains_everything():
    detector = build_detector(tiny_config(trainable="full"))
    assert trainable_names(detector) == {name for name, _ in detector.named_parameters()}


def test_probe_policy_trains_only_the_head():
    detector = build_detector(tiny_config(trainable="probe"))
    assert trainable_names(detector) == {"head.weight", "head.bias"}


def test_last_k_policy_trains_top_blocks_final_norm_projection_and_head():
    detector = build_detector(tiny_config(trainable="last-k", last_k=1))  # tiny towers have blocks 0 and 1
    names = trainable_names(detector)

    assert {"head.weight", "head.bias", "visual.proj", "visual.ln_post.weight", "visual.ln_post.bias"} <= names
    assert any(n.startswith("visual.transformer.resblocks.1.") for n in names)
    assert not any(n.startswith("visual.transformer.resblocks.0.") for n in names)
    frozen = {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight"}
    assert not frozen & names
    block1 = {n for n, _ in detector.named_parameters() if n.startswith("visual.transformer.resblocks.1.")}
    assert names == block1 | {"head.weight", "head.bias", "visual.proj", "visual.ln_post.weight", "visual.ln_post.bias"}


def test_last_k_larger_than_the_tower_is_rejected():
    with pytest.raises(ValueError, match="last_k=3"):
        build_detector(tiny_config(trainable="last-k", last_k=3))


def test_probe_training_leaves_the_backbone_untouched():
    detector = build_detector(tiny_config(trainable="probe"))
    before = {k: v.clone() for k, v in detector.visual.state_dict().items()}
    optimizer = make_optimizer(detector, OptimConfig())
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    train_step(detector, images, [0, 1, 0, 1], optimizer)
    after = detector.visual.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_score_uint8_returns_probabilities_and_keeps_the_mode():
    detector = build_detector(tiny_config())
    detector.train()
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)

    probs = detector.score_uint8(images)

    assert probs.shape == (3,)
    assert ((probs >= 0) & (probs <= 1)).all()
    assert detector.training
    assert torch.allclose(probs, detector.score_uint8(images))  # eval: no masking, no dropout


def test_wrong_input_size_gets_a_clear_error():
    detector = build_detector(tiny_config())
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
        detector(torch.randn(1, 3, 64, 64))


def test_non_vit_towers_are_rejected(tmp_path):
    import json

    import open_clip

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "test-tiny-resnet.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    with pytest.raises(ValueError, match="VisionTransformer"):
        create_backbone(BackboneConfig(name="test-tiny-resnet", pretrained=None))


def test_unknown_model_name_is_rejected():
    with pytest.raises(ValueError, match="unknown open_clip model"):
        create_backbone(BackboneConfig(name="ViT-Z-99", pretrained=None))


# --- optimiser --------------------------------------------------------------------------------------------------


def test_optimizer_uses_the_method_learning_rates_per_group():
    full = make_optimizer(build_detector(tiny_config(trainable="full")), OptimConfig())
    last_k = make_optimizer(build_detector(tiny_config(trainable="last-k", last_k=1)), OptimConfig())
    probe = make_optimizer(build_detector(tiny_config(trainable="probe")), OptimConfig(head_lr=2e-3))

    assert {g["name"]: g["lr"] for g in full.param_groups} == {"backbone": 1e-5, "head": 1e-3}
    assert {g["name"]: g["lr"] for g in last_k.param_groups} == {"backbone": 5e-5, "head": 1e-3}
    assert {g["name"]: g["lr"] for g in probe.param_groups} == {"head": 2e-3}
    assert all(g["weight_decay"] == 0.0 for g in full.param_groups)


def test_optimizer_only_holds_trainable_parameters():
    detector = build_detector(tiny_config(trainable="last-k", last_k=1))
    optimizer = make_optimizer(detector, OptimConfig())
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in detector.parameters() if p.requires_grad}


def lr_trace(schedule: str, steps: int, **cfg) -> list[float]:
    detector = build_detector(tiny_config(trainable="probe"))
    optim_cfg = OptimConfig(schedule=schedule, head_lr=1.0, **cfg)
    optimizer = make_optimizer(detector, optim_cfg)
    scheduler = make_scheduler(optimizer, optim_cfg, total_steps=steps)
    trace = []
    for _ in range(steps):
        trace.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    trace.append(optimizer.param_groups[0]["lr"])
    return trace


def test_cosine_schedule_decays_from_base_lr_to_zero():
    trace = lr_trace("cosine", 10)
    assert trace[0] == pytest.approx(1.0)
    assert trace[5] == pytest.approx(0.5)
    assert trace[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(trace, trace[1:], strict=False))


def test_step_schedule_multiplies_by_gamma_once_per_epoch():
    trace = lr_trace("step", 9, epochs=3, step_gamma=0.5)
    assert trace[:3] == [1.0] * 3
    assert trace[3:6] == [0.5] * 3
    assert trace[6:9] == [0.25] * 3


def test_constant_schedule_keeps_the_lr():
    assert lr_trace("constant", 5) == [1.0] * 6


def test_train_steps_fit_a_fixed_batch():
    detector = build_detector(tiny_config(dropout=0.0, mask={"strategy": "none"}))
    optim_cfg = OptimConfig(backbone_lr=1e-3, head_lr=1e-2, schedule="constant")
    optimizer = make_optimizer(detector, optim_cfg)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=gen)
    labels = torch.tensor([0, 1] * 4)

    losses = [train_step(detector, images, labels, optimizer) for _ in range(15)]

    assert losses[-1] < 0.5 * losses[0]


def test_train_step_accepts_a_wrapped_detector():
    detector = build_detector(tiny_config(trainable="probe"))
    before = detector.head.weight.detach().clone()
    wrapped = torch.nn.DataParallel(detector)  # same `.module` interface as DistributedDataParallel
    optimizer = make_optimizer(wrapped, OptimConfig())
    train_step(wrapped, torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8), [0, 1], optimizer)
    assert not torch.equal(detector.head.weight, before)


def test_train_step_rejects_mismatched_labels():
    detector = build_detector(tiny_config())
    optimizer = make_optimizer(detector, OptimConfig())
    with pytest.raises(ValueError, match="labels"):
        train_step(detector, torch.zeros(2, 32, 32, 3, dtype=torch.uint8), [1, 0, 1], optimizer)
