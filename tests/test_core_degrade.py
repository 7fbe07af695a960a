"""Degradation augmentation of training crops (mpft_core/degrade.py, ``AugmentConfig.degrade``): both classes are
degraded alike, each operation does what it says on a real photo, the draws repeat per (seed, epoch, rank) without
touching the crops, a disabled config leaves pixels alone, and bad settings are refused with their location."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from skimage.data import astronaut

from mpft_core.config import DegradeConfig, MethodConfig
from mpft_core.degrade import DegradePlan, apply_plan, degrade_batch, degrade_rng, draw_plans

# Every operation half the time: the setting where a label-dependent draw would show most.
HALF = DegradeConfig.from_dict({"downscale": {"p": 0.5, "scale": [0.4, 0.8]}, "blur": {"p": 0.5, "sigma": [0.5, 3]},
                                "jpeg": {"p": 0.5, "quality": [30, 90]}})
ALWAYS = DegradeConfig.from_dict({"downscale": {"p": 1.0}, "blur": {"p": 1.0}, "jpeg": {"p": 1.0}})


def _photo_crops(n: int, size: int = 96) -> np.ndarray:
    """``n`` different uint8 crops of a real photograph, NHWC."""
    photo = astronaut()
    corners = np.random.default_rng(1).integers(0, photo.shape[0] - size, (n, 2))
    return np.stack([photo[top:top + size, left:left + size] for top, left in corners])


def _high_frequency_energy(img: np.ndarray) -> float:
    """Mean absolute difference between neighbouring pixels: what blur and resampling take away."""
    x = img.astype(np.float64)
    return float(np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean())


def _training_batch(labels: list[int], window: int = 112) -> dict:
    """A batch as ``pipelines.training.epoch_batches`` yields it: windows, labels, picture extents."""
    import torch

    images = torch.from_numpy(_photo_crops(len(labels), window))
    n = len(labels)
    return {"image": images, "label": torch.tensor(labels, dtype=torch.float32),
            "view_height": torch.full((n,), window), "view_width": torch.full((n,), window)}


# ------------------------------------------------------------------------------------------- (a), (b) label-blind


def test_the_same_stream_gives_the_same_plans():
    assert draw_plans(HALF, 32, degrade_rng(3, 1, 0)) == draw_plans(HALF, 32, degrade_rng(3, 1, 0))


def test_the_training_crops_are_degraded_the_same_whatever_the_labels():
    from mpft_core.transforms import crop_generator
    from pipelines.training import training_crops

    labels = [0, 1] * 4

    def degraded(batch_labels):
        return training_crops(_training_batch(batch_labels), 64, crop_generator(0, 2, 1), degrade=ALWAYS,
                              degrade_stream=degrade_rng(0, 2, 1))

    original, swapped, all_real = degraded(labels), degraded([1 - y for y in labels]), degraded([0] * 8)
    assert original.shape == (8, 64, 64, 3)
    assert bool((original == swapped).all()) and bool((original == all_real).all())


def test_both_classes_get_the_same_degradations_in_frequency_and_strength():
    """4000 samples in batches of 32, classes alternating as they would in a shuffled balanced batch."""
    rng = degrade_rng(0, 0, 0)
    plans = [plan for _ in range(125) for plan in draw_plans(HALF, 32, rng)]
    by_class = {label: plans[label::2] for label in (0, 1)}

    for op in ("downscale", "blur", "jpeg"):
        frequency = {label: np.mean([getattr(p, op) is not None for p in ps]) for label, ps in by_class.items()}
        assert abs(frequency[0] - frequency[1]) < 0.04, (op, frequency)
        assert abs(frequency[0] - 0.5) < 0.04, (op, frequency)
        strength = {label: np.mean([getattr(p, op) for p in ps if getattr(p, op) is not None])
                    for label, ps in by_class.items()}
        low, high = {"downscale": (0.4, 0.8), "blur": (0.5, 3.0), "jpeg": (30, 90)}[op]
        # The mean of a uniform draw over [low, high], equal between classes to ~3 standard errors.
        assert abs(strength[0] - strength[1]) < 0.06 * (high - low), (op, strength)
        assert abs(strength[0] - (low + high) / 2) < 0.05 * (high - low), (op, strength)
    qualities = {p.jpeg for p in plans if p.jpeg is not None}
    assert qualities == set(range(30, 91)), "every quality of the range, both ends included, and nothing else"


def test_labelled_training_batches_change_as_often_and_as_much_in_both_classes():
    """Through the training path itself: 40 shuffled, balanced batches of 32 labelled crops; how often a crop is
    changed by the degradations and by how much must not depend on its label."""
    from mpft_core.transforms import crop_generator
    from pipelines.training import training_crops

    rng = np.random.default_rng(5)
    stream = degrade_rng(0, 0, 0)
    changed, change = {0: [], 1: []}, {0: [], 1: []}
    for step in range(40):
        labels = rng.permutation([0, 1] * 16).tolist()
        batch = _training_batch(labels, window=64)
        plain = training_crops(batch, 48, crop_generator(0, step, 0)).numpy().astype(int)
        degraded = training_crops(batch, 48, crop_generator(0, step, 0), degrade=HALF,
                                  degrade_stream=stream).numpy().astype(int)
        for label, before, after in zip(labels, plain, degraded, strict=True):
            changed[label].append(bool((before != after).any()))
            change[label].append(float(np.abs(before - after).mean()))

    share = {label: np.mean(values) for label, values in changed.items()}
    mean_change = {label: np.mean(values) for label, values in change.items()}
    assert abs(share[0] - 0.875) < 0.05 and abs(share[1] - 0.875) < 0.05, share  # 1 - 0.5 ** 3 are degraded
    assert abs(mean_change[0] - mean_change[1]) < 0.15 * mean_change[0], mean_change


# ------------------------------------------------------------------------------------------- (c) each op on a photo


def test_jpeg_changes_pixels_and_keeps_shape_and_dtype():
    crop = _photo_crops(1)[0]
    out = apply_plan(crop, DegradePlan(jpeg=40))
    assert out.shape == crop.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - crop).mean() > 1.0


def test_blur_and_downscale_lower_the_high_frequency_energy_and_keep_the_shape():
    crop = _photo_crops(1)[0]
    before = _high_frequency_energy(crop)
    for plan in (DegradePlan(blur=1.5), DegradePlan(downscale=0.5)):
        out = apply_plan(crop, plan)
        assert out.shape == crop.shape and out.dtype == np.uint8, plan
        assert _high_frequency_energy(out) < 0.8 * before, plan
    # A stronger shrink loses more detail.
    assert (_high_frequency_energy(apply_plan(crop, DegradePlan(downscale=0.25)))
            < _high_frequency_energy(apply_plan(crop, DegradePlan(downscale=0.75))))


def test_a_plan_never_modifies_its_input():
    crops = _photo_crops(4)
    kept = crops.copy()
    degrade_batch(crops, ALWAYS, degrade_rng(0, 0, 0))
    assert np.array_equal(crops, kept)


# ------------------------------------------------------------------------------------------- (d) seeding


def test_the_same_seed_epoch_and_rank_repeat_exactly_and_another_epoch_or_rank_does_not():
    crops = _photo_crops(16)

    def run(seed, epoch, rank):
        return degrade_batch(crops, HALF, degrade_rng(seed, epoch, rank))

    assert np.array_equal(run(0, 3, 1), run(0, 3, 1)), "a restarted epoch must repeat its degradations"
    assert not np.array_equal(run(0, 3, 1), run(0, 4, 1))
    assert not np.array_equal(run(0, 3, 1), run(0, 3, 0))


def test_turning_degradations_on_changes_no_crop():
    import torch

    from mpft_core.transforms import crop_generator
    from pipelines.training import training_crops

    plain, degraded = crop_generator(5, 0, 0), crop_generator(5, 0, 0)
    for _ in range(3):
        training_crops(_training_batch([0, 1, 0, 1]), 64, plain)
        training_crops(_training_batch([0, 1, 0, 1]), 64, degraded, degrade=ALWAYS,
                       degrade_stream=degrade_rng(5, 0, 0))
    # The crop stream is where it would be without degradations, so every later crop is the same too.
    assert torch.equal(plain.get_state(), degraded.get_state())


# ------------------------------------------------------------------------------------------- (e) disabled


def test_the_default_config_is_off_and_leaves_the_pixels_untouched():
    import torch

    from mpft_core.transforms import crop_generator, random_crops
    from pipelines.training import training_crops

    off = MethodConfig().augment.degrade
    assert not off.enabled
    zero_p = DegradeConfig.from_dict({"jpeg": {"p": 0, "quality": [5, 10]}, "blur": {"p": 0, "sigma": [4, 5]}})
    crops = _photo_crops(4)
    rng = degrade_rng(0, 0, 0)
    state = rng.bit_generator.state
    for config in (off, zero_p):
        assert degrade_batch(crops, config, rng) is crops
    assert rng.bit_generator.state == state, "a disabled config draws nothing"

    batch = _training_batch([0, 1, 0, 1])
    expected = random_crops(batch["image"], 64, crop_generator(0, 0, 0), heights=batch["view_height"],
                            widths=batch["view_width"])
    for config in (None, off, zero_p):
        got = training_crops(batch, 64, crop_generator(0, 0, 0), degrade=config, degrade_stream=degrade_rng(0, 0, 0))
        assert torch.equal(got, expected)


# ------------------------------------------------------------------------------------------- (f) config


def test_the_resolved_config_round_trips_through_a_plain_dict():
    method = MethodConfig.from_dict({"augment": {"degrade": HALF.to_dict()}})
    assert method.augment.degrade == HALF
    assert MethodConfig.from_dict(method.to_dict()) == method
    assert method.to_dict()["augment"]["degrade"]["jpeg"] == {"p": 0.5, "quality": [30, 90]}


@pytest.mark.parametrize(("degrade", "where", "says"), [
    ({"jpeg": {"quality": [90, 30]}}, ("jpeg", "quality"), "lo <= hi"),
    ({"blur": {"sigma": [3.0, 1.0]}}, ("blur", "sigma"), "lo <= hi"),
    ({"downscale": {"scale": [0.8, 0.4]}}, ("downscale", "scale"), "lo <= hi"),
    ({"jpeg": {"quality": [0, 50]}}, ("jpeg", "quality", 0), "greater than or equal to 1"),
    ({"jpeg": {"quality": [50, 101]}}, ("jpeg", "quality", 1), "less than or equal to 100"),
    ({"jpeg": {"quality": [50.5, 80]}}, ("jpeg", "quality", 0), "integer"),
    ({"blur": {"sigma": [0, 1]}}, ("blur", "sigma", 0), "greater than 0"),
    ({"downscale": {"scale": [0.5, 1.0]}}, ("downscale", "scale", 1), "less than 1"),
    ({"downscale": {"scale": [0.0, 0.5]}}, ("downscale", "scale", 0), "greater than 0"),
    ({"jpeg": {"quality": [50]}}, ("jpeg", "quality", 1), "required"),
    ({"blur": {"p": 1.5}}, ("blur", "p"), "less than or equal to 1"),
    ({"jpeg": {"p": 0.5, "qualty": [50, 80]}}, ("jpeg", "qualty"), "Extra inputs"),
    ({"sharpen": {"p": 0.5}}, ("sharpen",), "Extra inputs"),
])
def test_bad_settings_are_refused_with_their_location(degrade, where, says):
    with pytest.raises(ValidationError) as caught:
        MethodConfig.from_dict({"augment": {"degrade": degrade}})
    [problem] = caught.value.errors()
    assert problem["loc"] == ("augment", "degrade", *where)
    assert says in problem["msg"]
