"""Why an image was scored as it was: occlusion maps over the ViT patch grid, and an RGB overlay of them.

For one model view (the uint8 crop the scorer scores: ``mpft_core.transforms.eval_view``, never resized), every group
of ``group`` x ``group`` neighbouring patches is hidden in turn, the image is scored again, and the group's
attribution is the change it caused::

    attribution(group) = score(whole view) - score(view with that group hidden)

Positive: those patches push the score toward "generated" (hiding them lowers it); negative: toward "real". By
default scores are probabilities of "generated", as ``MPFTDetector.score_uint8`` gives them, so the map's unit is the
score's. A confident score (0.999) barely moves in probability whatever is hidden (the sigmoid is flat there), so
``units="logit"`` measures the change in the head's logit instead, which does not saturate.

How patches are hidden: the way the detector's own training hid them, through the same functions its Texture-Aware
Masking uses (``mpft_core.detector``), called at inference since ``forward`` only masks in training mode:

* ``drop``: the hidden patch tokens are removed after the positional embedding (``encode_visible_patches``), so the
  tower sees fewer tokens, none of them invented. This is the default for a detector trained with ``drop`` and for
  one trained without masking (no kind of hiding is familiar to it, and dropping adds no made-up content).
* ``fill``: the hidden patches' pixels are set to the normalisation mean (``fill_masked_patches``), the "hidden"
  that a ``fill``-trained detector learned during fine-tuning; dropping tokens would be new to it, so a grey patch is
  the in-distribution way to hide one there.

The variants are batched: one forward pass scores up to ``batch_size`` occluded copies. ``drop`` needs the same
number of hidden tokens per batch, so groups are batched by size (edge groups of a grid that ``group`` does not
divide are smaller). Deterministic: no randomness is involved, the detector runs in eval mode (dropout off) and torch's
deterministic algorithms are switched on for the call, so the same view and detector give the same map.

Pure library code (torch and numpy only); the command is ``jobs/explain.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch

from .config import InputError
from .detector import MPFTDetector, encode_visible_patches, fill_masked_patches
from .transforms import normalize

HideMode = Literal["drop", "fill"]
HIDE_CHOICES = ("trained", "drop", "fill")
UNITS = ("score", "logit")

# Diverging colours of the overlay: toward "generated" is red, toward "real" blue (the usual warm = alarm).
GENERATED_COLOUR = (230, 30, 30)
REAL_COLOUR = (30, 90, 230)


@dataclass(frozen=True)
class Attribution:
    """One view's explanation.

    Attributes:
        score: probability of "generated" of the whole view.
        heat: float32 ``[rows, cols]`` over the patch grid: ``score - score with the patch's group hidden`` (every
            patch of a group carries the group's value), in ``units``.
        group: patches per group side; hide: how patches were hidden (``drop`` or ``fill``).
        units: ``score`` (probability) or ``logit``.
    """

    score: float
    heat: np.ndarray
    group: int
    hide: HideMode
    units: str = "score"


def hide_mode_for(detector: MPFTDetector, requested: str = "trained") -> HideMode:
    """``drop`` or ``fill``: ``requested`` itself, or for ``trained`` the mode the detector was fine-tuned with when
    it was fine-tuned with masking, else ``drop`` (see the module docstring)."""
    if requested not in HIDE_CHOICES:
        raise InputError(f"unknown way to hide patches {requested!r}; choose one of {', '.join(HIDE_CHOICES)}")
    if requested != "trained":
        return requested  # type: ignore[return-value]
    mask_cfg = detector.config.mask
    trained_with_masking = mask_cfg.strategy != "none" and mask_cfg.ratio > 0
    return mask_cfg.mode if trained_with_masking else "drop"


def group_masks(rows: int, cols: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(bool ``[G, rows * cols]`` masks, one per group, True = hidden, patches in raster order like the ViT's tokens;
    int ``[rows, cols]`` the group index of every patch). Groups tile the grid from the top-left; at the right and
    bottom edges of a grid that ``group`` does not divide they are smaller.

    Raises:
        InputError: ``group`` < 1, or so large that one group hides the whole grid (nothing would be left to score).
    """
    if group < 1:
        raise InputError(f"the patch group side must be at least 1, got {group}")
    if group >= rows and group >= cols:
        raise InputError(f"a group of {group}x{group} patches hides the whole {rows}x{cols} patch grid; "
                         f"choose a group smaller than {max(rows, cols)}")
    group_rows, group_cols = -(-rows // group), -(-cols // group)
    cell_of_patch = (np.arange(rows)[:, None] // group) * group_cols + (np.arange(cols)[None, :] // group)
    masks = cell_of_patch.reshape(1, -1) == np.arange(group_rows * group_cols)[:, None]
    return masks, cell_of_patch


@contextmanager
def deterministic_inference(detector: MPFTDetector) -> Iterator[None]:
    """Eval mode, no autograd, and torch's deterministic algorithms for the block; everything restored after.

    ``warn_only``: an op without a deterministic kernel warns rather than fails (none of a ViT's on CPU; on CUDA,
    cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` for full determinism, which only the process's start can set).
    """
    was_training = detector.training
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    previous_benchmark = torch.backends.cudnn.benchmark
    detector.eval()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous_benchmark
        detector.train(was_training)


def logits_with_hidden_patches(detector: MPFTDetector, x: torch.Tensor, masks: torch.Tensor,
                               hide: HideMode) -> torch.Tensor:
    """The head's logit of one normalised view ``x`` ``[1, 3, S, S]`` under each bool mask ``[M, P]`` (True =
    hidden), as float32 ``[M]`` on the CPU; for ``drop`` every mask must hide the same number of patches."""
    copies = x.expand(masks.shape[0], -1, -1, -1)
    if hide == "drop":
        features = encode_visible_patches(detector.visual, copies, masks)
    else:
        features = detector.embed(fill_masked_patches(copies, masks, detector.patch_size))
    # Eval mode: the head's dropout is the identity, so this is forward's head step exactly.
    return detector.head(detector.dropout(features)).squeeze(-1).float().cpu()


def attribute(detector: MPFTDetector, view: np.ndarray, group: int = 2, *, hide: str = "trained",
              units: str = "score", batch_size: int = 64) -> Attribution:
    """Occlusion attribution of one uint8 view ``[S, S, 3]`` (the scorer's crop): see the module docstring.

    ``batch_size``: occluded copies per forward pass (memory: that many images through the tower at once).
    """
    view = np.asarray(view)
    size = detector.preprocess.image_size
    if view.shape != (size, size, 3) or view.dtype != np.uint8:
        raise InputError(f"expected the model view, uint8 [{size}, {size}, 3], got {view.dtype} {view.shape}; "
                         "crop with mpft_core.transforms.eval_view")
    if units not in UNITS:
        raise InputError(f"unknown attribution units {units!r}; choose one of {', '.join(UNITS)}")
    mode = hide_mode_for(detector, hide)
    rows = cols = detector.grid_size
    masks, cell_of_patch = group_masks(rows, cols, group)
    occluded = np.empty(len(masks), dtype=np.float32)
    with deterministic_inference(detector):
        prep = detector.preprocess
        x = normalize(torch.from_numpy(view[None].copy()).to(detector.device), prep.mean, prep.std)
        # score_uint8's own steps (forward in eval mode, sigmoid in float32), keeping the logit.
        full = detector(x).float().cpu()
        for indices in _batches_of_equal_size(masks, batch_size):
            batch_masks = torch.from_numpy(masks[indices]).to(detector.device)
            occluded[indices] = logits_with_hidden_patches(detector, x, batch_masks, mode).numpy()
    score = float(torch.sigmoid(full)[0])
    if units == "logit":
        change = float(full[0]) - occluded
    else:
        change = score - torch.sigmoid(torch.from_numpy(occluded)).numpy()
    heat = change[cell_of_patch].astype(np.float32)
    return Attribution(score=score, heat=heat, group=group, hide=mode, units=units)


def _batches_of_equal_size(masks: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Indices of ``masks`` in batches of at most ``batch_size`` masks that all hide the same number of patches, in a
    fixed order (so the same masks always meet in the same batches, and float sums come out the same)."""
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    hidden = masks.sum(axis=1)
    for count in np.unique(hidden):
        same = np.flatnonzero(hidden == count)
        for start in range(0, len(same), batch_size):
            yield same[start:start + batch_size]


def occlusion_map(detector: MPFTDetector, pixels: np.ndarray, group: int = 2, *, hide: str = "trained",
                  units: str = "score", batch_size: int = 64) -> np.ndarray:
    """float32 ``[rows, cols]`` attribution over the patch grid of a uint8 view ``[S, S, 3]`` (``attribute``'s
    ``heat``): positive where the patches push the score toward "generated"."""
    return attribute(detector, pixels, group, hide=hide, units=units, batch_size=batch_size).heat


def heat_to_pixels(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """float ``[height, width]``: each patch's value over its pixels (nearest, no smoothing: a patch is what was
    hidden); pixels beyond the last whole patch, which the ViT never sees, get 0."""
    rows, cols = heat.shape
    patch_h, patch_w = height // rows, width // cols
    if patch_h == 0 or patch_w == 0:
        raise InputError(f"a {rows}x{cols} map does not fit a {height}x{width} image")
    pixels = np.zeros((height, width), dtype=np.float32)
    pixels[:rows * patch_h, :cols * patch_w] = np.repeat(np.repeat(heat, patch_h, axis=0), patch_w, axis=1)
    return pixels


def overlay(image: np.ndarray, heat: np.ndarray, *, scale: Optional[float] = None,
            alpha: float = 0.6) -> np.ndarray:
    """The view ``image`` (uint8 ``[H, W, 3]``) tinted by ``heat`` over its patch grid: red where a patch pushes the
    score toward "generated", blue toward "real", stronger the larger the attribution, untouched where it is 0.

    ``scale``: the attribution shown at full strength ``alpha`` (default: the map's largest magnitude, so every map
    uses the whole range; pass one value to compare several maps by eye).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32))
    scale = float(np.abs(heat).max()) if scale is None else float(scale)
    if scale <= 0:
        return image.copy()
    strength = np.clip(heat_to_pixels(heat, image.shape[0], image.shape[1]) / scale, -1.0, 1.0)
    colour = np.where(strength[..., None] >= 0, np.array(GENERATED_COLOUR, np.float32),
                      np.array(REAL_COLOUR, np.float32))
    weight = alpha * np.abs(strength)[..., None]
    blended = image.astype(np.float32) * (1.0 - weight) + colour * weight
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
