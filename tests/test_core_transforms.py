"""mpft_core/transforms.py crops: small images are tiled as if the whole image were repeated, yet only the returned
window is ever built, whatever the image's shape."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from mpft_core.transforms import eval_view, train_window

SHAPES = [(1, 1), (3, 4000), (4000, 3), (7, 5), (20, 50), (50, 20), (64, 64), (90, 70)]


def _tiled_whole(img: np.ndarray, size: int) -> np.ndarray:
    """The reference: the whole image repeated down and right until both sides are at least ``size``."""
    h, w = img.shape[:2]
    return np.pad(img, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="wrap")


def _reference_train_window(img, size, window, rng):
    tiled = _tiled_whole(img, size)
    h, w = tiled.shape[:2]
    view_h, view_w = min(h, window), min(w, window)
    top, left = int(rng.integers(0, h - view_h + 1)), int(rng.integers(0, w - view_w + 1))
    view = tiled[top:top + view_h, left:left + view_w]
    return (view[:, ::-1] if rng.random() < 0.5 else view), view_h, view_w


@pytest.mark.parametrize("shape", SHAPES)
def test_eval_view_is_the_centre_of_the_tiled_image(shape):
    img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    for size in (1, 16, 32, 64):
        tiled = _tiled_whole(img, size)
        top, left = (tiled.shape[0] - size) // 2, (tiled.shape[1] - size) // 2
        crop = eval_view(img, size)
        assert crop.flags.c_contiguous and crop.dtype == np.uint8
        assert np.array_equal(crop, tiled[top:top + size, left:left + size]), (shape, size)


@pytest.mark.parametrize("shape", SHAPES)
def test_train_window_is_a_window_of_the_tiled_image_drawn_as_before(shape):
    img = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    for seed in range(6):
        for size, window in ((16, 16), (16, 40), (32, 48)):
            out, view_h, view_w = train_window(img, size, window, np.random.default_rng(seed))
            expected, exp_h, exp_w = _reference_train_window(img, size, window, np.random.default_rng(seed))
            assert (view_h, view_w) == (exp_h, exp_w) and out.shape == (window, window, 3)
            assert np.array_equal(out[:view_h, :view_w], expected), (shape, seed, size, window)
            assert not out[view_h:].any() and not out[:, view_w:].any()


@pytest.mark.parametrize("shape", [(2, 2_000_000), (2_000_000, 2)])
def test_crops_of_an_extreme_aspect_ratio_allocate_only_the_window(shape):
    img = np.full((*shape, 3), 77, np.uint8)  # 12 MB; tiling it whole to 224 would take 1.3 GB
    tracemalloc.start()
    try:
        crop = eval_view(img, 224)
        window, _, _ = train_window(img, 224, 256, np.random.default_rng(0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert crop.shape == (224, 224, 3) and (crop == 77).all()
    assert (window[:224, :224] == 77).all()
    assert peak < 4 * 256 * 256 * 3, peak  # a few windows' worth, nothing proportional to the image
