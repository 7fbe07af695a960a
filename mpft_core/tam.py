"""Texture-Aware Masking (TAM): score every ViT patch by how textured it is, then hide the most textured ones.

Textured regions carry generator-specific fingerprints that do not transfer to unseen generators (docs/METHOD.md), so
during fine-tuning the top ``ratio`` fraction of patches by texture score is hidden. Everything here works on whole
batches at once: images are reshaped into a ``[N, P, p, p]`` stack of patches and scored with tensor ops, so the cost
is a few elementwise passes over the batch, negligible next to a ViT step.

Pixels are float NCHW in [0, 1]. Patch ``i`` is in raster order (row-major over the patch grid), the same order as
the ViT's patch tokens. Pixels beyond the last full patch row/column are ignored, like the ViT's strided conv does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .config import MaskConfig

# ITU-R BT.601 luma weights: texture is a luminance property, and one channel keeps scoring cheap.
BT601_WEIGHTS = (0.299, 0.587, 0.114)

TEXTURE_METHODS = ("diversity", "gradient", "variance", "highfreq")


def luminance(pixels: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` RGB -> ``[N, H, W]`` luma (BT.601)."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected float pixels [N, 3, H, W], got shape {tuple(pixels.shape)}")
    weights = torch.tensor(BT601_WEIGHTS, dtype=pixels.dtype, device=pixels.device)
    return torch.einsum("nchw,c->nhw", pixels, weights)


def split_into_patches(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[N, H, W]`` -> ``[N, P, p, p]`` non-overlapping patches in raster order."""
    n, h, w = image.shape
    rows, cols = h // patch_size, w // patch_size
    if rows == 0 or cols == 0:
        raise ValueError(f"image {h}x{w} is smaller than one {patch_size}px patch")
    image = image[:, : rows * patch_size, : cols * patch_size]
    patches = image.reshape(n, rows, patch_size, cols, patch_size).permute(0, 1, 3, 2, 4)
    return patches.reshape(n, rows * cols, patch_size, patch_size)


def neighbour_diversity(patches: torch.Tensor) -> torch.Tensor:
    """Sum of |differences| between neighbouring pixels in 4 directions, within each patch (PatchCraft-style)."""
    horizontal = (patches[..., :, 1:] - patches[..., :, :-1]).abs().sum(dim=(-2, -1))
    vertical = (patches[..., 1:, :] - patches[..., :-1, :]).abs().sum(dim=(-2, -1))
    diagonal = (patches[..., 1:, 1:] - patches[..., :-1, :-1]).abs().sum(dim=(-2, -1))
    anti_diagonal = (patches[..., 1:, :-1] - patches[..., :-1, 1:]).abs().sum(dim=(-2, -1))
    return horizontal + vertical + diagonal + anti_diagonal


def sobel_energy(patches: torch.Tensor) -> torch.Tensor:
    """Sum of squared Sobel gradient magnitude inside each patch ('valid' windows, so patches do not leak)."""
    n, p_count, size, _ = patches.shape
    if size < 3:
        raise ValueError("the 'gradient' texture score needs patches of at least 3x3 pixels")
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=patches.device)
    gx = gx.to(patches.dtype)
    kernels = torch.stack([gx, gx.t()]).unsqueeze(1)  # [2, 1, 3, 3]: d/dx and d/dy
    grads = F.conv2d(patches.reshape(n * p_count, 1, size, size), kernels)
    return grads.square().sum(dim=(1, 2, 3)).view(n, p_count)


def patch_variance(patches: torch.Tensor) -> torch.Tensor:
    return patches.flatten(-2).var(dim=-1, unbiased=False)


def dct_matrix(size: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D`` so that ``D @ x @ D.T`` is the 2-D DCT of a ``size x size`` block."""
    k = torch.arange(size, dtype=torch.float64, device=device).unsqueeze(1)
    n = torch.arange(size, dtype=torch.float64, device=device).unsqueeze(0)
    basis = torch.cos(math.pi * (2 * n + 1) * k / (2 * size))
    scale = torch.full((size, 1), math.sqrt(2.0 / size), dtype=torch.float64, device=device)
    scale[0] = math.sqrt(1.0 / size)
    return (scale * basis).to(dtype)


def dct_high_band_energy(patches: torch.Tensor) -> torch.Tensor:
    """Energy of each patch's DCT coefficients outside the low-frequency top-left quarter (AIDE-style)."""
    size = patches.shape[-1]
    dct = dct_matrix(size, dtype=patches.dtype, device=patches.device)
    coefficients = dct @ patches @ dct.t()
    low = max(1, size // 2)
    frequency = torch.arange(size, device=patches.device)
    high_band = (frequency.view(-1, 1) >= low) | (frequency.view(1, -1) >= low)
    return (coefficients.square() * high_band).sum(dim=(-2, -1))


_SCORERS = {
    "diversity": neighbour_diversity,
    "gradient": sobel_energy,
    "variance": patch_variance,
    "highfreq": dct_high_band_energy,
}


def texture_scores(pixels: torch.Tensor, patch_size: int, method: str = "diversity") -> torch.Tensor:
    """Texture score of every patch: ``[N, 3, H, W]`` pixels in [0, 1] -> ``[N, P]`` (higher = more textured)."""
    if method not in _SCORERS:
        raise ValueError(f"unknown texture method {method!r}; choose one of {TEXTURE_METHODS}")
    patches = split_into_patches(luminance(pixels.float()), patch_size)
    return _SCORERS[method](patches)


def masked_patch_count(num_patches: int, ratio: float) -> int:
    """How many of ``num_patches`` to hide: ``ratio * P`` rounded half up, keeping at least one patch visible."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    count = math.floor(ratio * num_patches + 0.5)
    # An image with every patch hidden carries no signal, and `drop` mode would leave only the class token.
    return min(count, num_patches - 1)


def select_masked_patches(
    scores: torch.Tensor, ratio: float, strategy: str = "tam", generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Choose the patches to hide; returns a bool ``[N, P]`` mask (True = hidden).

    Every image gets the same number of hidden patches (``masked_patch_count``), which `drop` mode relies on to
    keep the batch rectangular.

    Args:
        scores: ``[N, P]`` texture scores (only the shape is used by ``random`` and ``none``).
        ratio: fraction of patches to hide.
        strategy: ``tam`` (highest scores), ``random`` (uniformly at random, same count), ``none`` (nothing).
        generator: RNG for ``random``; the global RNG when None.
    """
    if scores.ndim != 2:
        raise ValueError(f"expected scores [N, P], got shape {tuple(scores.shape)}")
    n, p = scores.shape
    mask = torch.zeros(n, p, dtype=torch.bool, device=scores.device)
    if strategy == "none":
        return mask
    if strategy == "tam":
        ranking = scores
    elif strategy == "random":
        rng_device = generator.device if generator is not None else scores.device
        ranking = torch.rand(n, p, generator=generator, device=rng_device).to(scores.device)
    else:
        raise ValueError(f"unknown mask strategy {strategy!r}; choose tam, random or none")
    count = masked_patch_count(p, ratio)
    if count == 0:
        return mask
    hidden = ranking.topk(count, dim=1).indices
    return mask.scatter_(1, hidden, True)


@torch.no_grad()
def compute_mask(
    pixels01: torch.Tensor, patch_size: int, mask_cfg: MaskConfig, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """The training mask for a batch of [0, 1] pixels, as configured by ``mask_cfg``; bool ``[N, P]``."""
    n, _, h, w = pixels01.shape
    num_patches = (h // patch_size) * (w // patch_size)
    if mask_cfg.strategy == "tam":
        scores = texture_scores(pixels01, patch_size, mask_cfg.texture)
    else:
        # random/none never look at the pixels: skip the scoring pass.
        scores = pixels01.new_zeros(n, num_patches)
    return select_masked_patches(scores, mask_cfg.ratio, mask_cfg.strategy, generator)
