"""Degradations for the robustness table: they must degrade in the documented way and parse the CLI specs."""

from __future__ import annotations

import numpy as np
import pytest

from mpft_core.perturb import Perturbation, blur, downscale, jpeg, parse_perturb_specs


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
                                  "downscale=-3", "sharpen=2"])
def test_parse_specs_rejects_bad_specs_naming_them(spec):
    with pytest.raises(ValueError, match="bad perturbation spec"):
        parse_perturb_specs([spec])


def test_apply_matches_the_plain_function():
    img = _textured()
    assert np.array_equal(Perturbation("jpeg", 30).apply(img), jpeg(img, 30))
