"""Texture-Aware Masking: which patches get hidden, how many, and what the texture scores measure."""

from __future__ import annotations

import pytest
import torch

from mpft_core.config import MaskConfig
from mpft_core.tam import (
    TEXTURE_METHODS,
    compute_mask,
    dct_matrix,
    masked_patch_count,
    select_masked_patches,
    texture_scores,
)

PATCH = 8
GRID = 4  # 32x32 images -> 4x4 patches, like mpft-tiny-32


def half_noise_images(noisy_side: list[str], seed: int = 0) -> torch.Tensor:
    """[N, 3, 32, 32] images: one half uniform noise, the other half a flat colour."""
    gen = torch.Generator().manual_seed(seed)
    size = GRID * PATCH
    images = torch.full((len(noisy_side), 3, size, size), 0.4)
    for i, side in enumerate(noisy_side):
        cols = slice(0, size // 2) if side == "left" else slice(size // 2, size)
        images[i, :, :, cols] = torch.rand(3, size, size // 2, generator=gen)
    return images


def patch_indices_in_columns(columns) -> set[int]:
    return {row * GRID + col for row in range(GRID) for col in columns}


@pytest.mark.parametrize("method", TEXTURE_METHODS)
def test_tam_hides_exactly_the_noisy_half_of_each_image(method):
    images = half_noise_images(["left", "right"])
    mask = compute_mask(images, PATCH, MaskConfig(strategy="tam", texture=method, ratio=0.5))

    assert mask.dtype == torch.bool and mask.shape == (2, GRID * GRID)
    assert set(mask[0].nonzero().flatten().tolist()) == patch_indices_in_columns([0, 1])
    assert set(mask[1].nonzero().flatten().tolist()) == patch_indices_in_columns([2, 3])


@pytest.mark.parametrize("method", TEXTURE_METHODS)
def test_tam_at_lower_ratio_hides_only_noisy_patches(method):
    images = half_noise_images(["left"])
    mask = compute_mask(images, PATCH, MaskConfig(strategy="tam", texture=method, ratio=0.25))

    hidden = set(mask[0].nonzero().flatten().tolist())
    assert len(hidden) == 4
    assert hidden <= patch_indices_in_columns([0, 1])


def test_random_strategy_hides_the_same_count_but_ignores_texture():
    images = half_noise_images(["left"] * 64)
    generator = torch.Generator().manual_seed(1)
    mask = compute_mask(images, PATCH, MaskConfig(strategy="random", ratio=0.5), generator=generator)

    assert (mask.sum(dim=1) == 8).all()
    # Over 64 images a uniform choice hides flat patches too; TAM never would on these images.
    assert mask[:, sorted(patch_indices_in_columns([2, 3]))].any()
    assert not torch.equal(mask[0], mask[1])


def test_random_strategy_is_reproducible_with_a_generator():
    scores = torch.zeros(3, 16)
    first = select_masked_patches(scores, 0.5, "random", torch.Generator().manual_seed(7))
    second = select_masked_patches(scores, 0.5, "random", torch.Generator().manual_seed(7))
    assert torch.equal(first, second)


def test_none_strategy_hides_nothing():
    images = half_noise_images(["left", "right"])
    mask = compute_mask(images, PATCH, MaskConfig(strategy="none", ratio=0.5))
    assert mask.shape == (2, 16) and not mask.any()


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.75, 0.9])
def test_every_image_gets_the_same_number_of_hidden_patches(ratio):
    scores = torch.rand(5, 196, generator=torch.Generator().manual_seed(0))
    mask = select_masked_patches(scores, ratio, "tam")
    assert (mask.sum(dim=1) == masked_patch_count(196, ratio)).all()
    assert masked_patch_count(196, ratio) == int(ratio * 196 + 0.5)


def test_at_least_one_patch_stays_visible():
    assert masked_patch_count(4, 0.9) == 3


def test_diversity_sums_absolute_differences_in_four_directions():
    # Grey 2x2 patch [[0, 1], [0, 1]]: horizontal 1 + 1, vertical 0, diagonal |1 - 0| = 1, anti-diagonal |0 - 1| = 1.
    patch = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).expand(1, 3, 2, 2)
    assert texture_scores(patch, 2, "diversity").item() == pytest.approx(4.0)


def test_scores_use_luminance_so_green_texture_outweighs_blue():
    noise = torch.rand(32, 32, generator=torch.Generator().manual_seed(0))
    images = torch.zeros(2, 3, 32, 32)
    images[0, 1] = noise  # the same texture in the green channel...
    images[1, 2] = noise  # ...and in the blue channel
    for method in TEXTURE_METHODS:
        scores = texture_scores(images, PATCH, method)
        assert (scores[0] > scores[1]).all(), method
    # Diversity is linear in luma, so the ratio is exactly the ratio of the BT.601 weights.
    diversity = texture_scores(images, PATCH, "diversity")
    assert torch.allclose(diversity[0] / diversity[1], torch.full((16,), 0.587 / 0.114), rtol=1e-4)


def test_highfreq_separates_fine_checkerboard_from_smooth_ramp():
    ramp = torch.linspace(0, 1, 8).expand(8, 8)
    checker = (torch.arange(8).view(-1, 1) + torch.arange(8).view(1, -1)) % 2
    images = torch.stack([ramp, checker.float()]).unsqueeze(1).expand(2, 3, 8, 8)
    scores = texture_scores(images, 8, "highfreq")
    assert scores[1] > 100 * scores[0]


def test_dct_matrix_is_orthonormal():
    dct = dct_matrix(14, dtype=torch.float64)
    assert torch.allclose(dct @ dct.t(), torch.eye(14, dtype=torch.float64), atol=1e-12)


def test_pixels_beyond_the_last_full_patch_are_ignored():
    images = half_noise_images(["left"])
    padded = torch.cat([images, torch.rand(1, 3, 32, 5)], dim=3)  # 37 px wide: a 5 px strip outside the grid
    assert torch.equal(texture_scores(padded, PATCH), texture_scores(images, PATCH))


def test_bad_inputs_fail_loudly():
    with pytest.raises(ValueError, match="texture method"):
        texture_scores(torch.rand(1, 3, 16, 16), 8, "sharpness")
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        texture_scores(torch.rand(3, 16, 16), 8)
    with pytest.raises(ValueError, match="strategy"):
        select_masked_patches(torch.rand(1, 4), 0.5, "center")
