"""Degradations and alignments for the evaluation tables: they must transform in the documented way and parse the
CLI specs and the gate's condition names."""

from __future__ import annotations

import numpy as np
import pytest

from mpft_core.perturb import (
    Alignment,
    Perturbation,
    blur,
    condition_from_name,
    downscale,
    jpeg,
    parse_align_specs,
    parse_perturb_specs,
    resize,
)


def _textured(h=96, w=128, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _high_frequency_energy(img: np.ndarray) -> float:
    x = img.astype(np.float64)
    return float(np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean())


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())


def test_jpeg_keeps_shape_and_loses_more_at_lower_quality():
    img = _textured()
    q65, q30 = jpeg(img, 65), jpeg(img, 30)
    assert q65.shape == img.shape and q65.dtype == np.uint8
    assert 0 < _mse(img, q65) < _mse(img, q30)


def test_blur_removes_high_frequencies_more_with_larger_sigma():
    img = _textured()
    energy = [_high_frequency_energy(x) for x in (img, blur(img, 3), blur(img, 5))]
    assert energy[0] > energy[1] > energy[2]
    assert blur(img, 3).shape == img.shape


def test_blur_leaves_a_flat_image_flat():
    flat = np.full((40, 50, 3), 77, dtype=np.uint8)
    assert np.array_equal(blur(flat, 5), flat)


@pytest.mark.parametrize("shape, size, expected", [((96, 128, 3), 64, (64, 85)), ((300, 120, 3), 112, (280, 112))])
def test_downscale_sets_the_shorter_side_and_keeps_aspect(shape, size, expected):
    out = downscale(_textured(*shape[:2]), size)
    assert out.shape[:2] == expected


def test_downscale_never_upsamples():
    small = _textured(50, 60)
    assert downscale(small, 64) is small


def test_parse_specs_expands_values_in_order():
    parsed = parse_perturb_specs(["jpeg=65,30", "blur=3,5", "downscale=112,64"])
    assert [p.name for p in parsed] == ["jpeg65", "jpeg30", "blur3", "blur5", "downscale112", "downscale64"]
    assert parsed[2] == Perturbation("blur", 3.0)


def test_parse_specs_accepts_fractional_blur_and_drops_duplicates():
    assert [p.name for p in parse_perturb_specs(["blur=1.5", "BLUR=1.5"])] == ["blur1.5"]


@pytest.mark.parametrize("spec", ["jpeg", "jpeg=", "jpeg=abc", "jpeg=0", "jpeg=101", "jpeg=65.5", "blur=0",
                                  "blur=0.00001", "blur=1000", "blur=0.125", "downscale=-3", "sharpen=2", "resize=256"])
def test_parse_specs_rejects_bad_specs_naming_them(spec):
    with pytest.raises(ValueError, match="bad perturbation spec"):
        parse_perturb_specs([spec])


def test_apply_matches_the_plain_function():
    img = _textured()
    assert np.array_equal(Perturbation("jpeg", 30).apply(img), jpeg(img, 30))


@pytest.mark.parametrize("shape, size, expected", [((96, 128, 3), 64, (64, 85)), ((50, 60, 3), 100, (100, 120)),
                                                   ((300, 120, 3), 112, (280, 112))])
def test_resize_brings_the_shorter_side_to_the_size_shrinking_or_enlarging(shape, size, expected):
    out = resize(_textured(*shape[:2]), size)
    assert out.shape == (*expected, 3) and out.dtype == np.uint8


def test_an_alignment_applies_its_steps_in_the_order_written():
    img = _textured(60, 80)
    [aligned] = parse_align_specs(["resize=40+jpeg=90"])
    assert aligned.name == "aligned-resize40-jpeg90"
    assert np.array_equal(aligned.apply(img), jpeg(resize(img, 40), 90))
    assert not np.array_equal(aligned.apply(img), resize(jpeg(img, 90), 40))


def test_two_images_of_different_formats_and_sizes_come_out_of_an_alignment_alike():
    """The point of alignment: a PNG-sized 'fake' and a JPEG-compressed, odd-sized 'real' both end up as JPEG q96
    at one scale, so neither the container nor the size separates them any more."""
    from skimage.data import astronaut

    photo = astronaut()
    as_jpeg_photo = jpeg(resize(photo, 333), 75)   # a real photo: JPEG, some camera size
    as_png_fake = resize(photo, 256)               # a generated image: lossless, 256 px
    [aligned] = parse_align_specs(["resize=128+jpeg=96"])
    a, b = aligned.apply(as_jpeg_photo), aligned.apply(as_png_fake)
    assert a.shape == b.shape == (128, 128, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 3


@pytest.mark.parametrize("spec", ["jpeg=96,75", "jpeg=96+", "resize=0+jpeg=96", "sharpen=2", "jpeg", "blur=3",
                                  "downscale=64+jpeg=96", "resize=60000"])
def test_bad_alignment_specs_are_refused_naming_them(spec):
    with pytest.raises(ValueError, match="bad alignment spec"):
        parse_align_specs([spec])


@pytest.mark.parametrize("condition", [Perturbation("jpeg", 65), Perturbation("blur", 1.5),
                                       Perturbation("downscale", 112),
                                       Alignment((Perturbation("jpeg", 96),)),
                                       Alignment((Perturbation("resize", 256), Perturbation("jpeg", 96)))])
def test_every_condition_name_reads_back_as_its_condition(condition):
    assert condition_from_name(condition.name) == condition


@pytest.mark.parametrize("name", ["clean", "jpg65", "aligned-", "aligned-jpeg96-", "jpeg", "jpeg065", "blur3.0",
                                  "resize256", "aligned-blur3"])
def test_names_no_condition_gives_are_refused(name):
    with pytest.raises(ValueError, match="condition"):
        condition_from_name(name)


def test_a_resize_that_would_enlarge_a_panorama_past_the_pixel_limit_is_an_error_not_gigabytes():
    panorama = np.zeros((10, 20_000, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="over the .*pixel limit"):
        resize(panorama, 4096)
