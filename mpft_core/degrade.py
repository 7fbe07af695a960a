"""Degradation augmentation of training crops: random downscale, blur and JPEG, per sample (``AugmentConfig.degrade``).

Real photos reach a detector recompressed and resized; trained on pristine files only, it can learn the format
traces instead of the generator's, and flag the real photos that lost them. Degrading random training crops of
*both* classes the same way takes that shortcut away. Pure numpy/PIL (the primitives of ``mpft_core.perturb``), no
torch: the training loop converts its crop batch at the boundary.

    rng = degrade_rng(seed, epoch, rank)                 # one stream per worker and epoch, like the crops
    degraded = degrade_batch(crops_nhwc_uint8, config, rng)

The draws never see a label: a plan is a function of the random stream and the sample's position in the batch only,
so both classes get the same distribution of degradations. The stream is separate from the crops' (its own seed
tag), so switching degradations on changes no crop, and a restarted epoch repeats its degradations exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from mpft_core import perturb
from mpft_core.config import DegradeConfig

# Sets this stream apart from the crops' SeedSequence([seed, epoch, rank]) with the same seed, epoch and rank.
STREAM_TAG = 0x6465_6772  # "degr"

# The order a photo meets these on its way to a viewer: resized, softened, and re-encoded last, because the saved
# JPEG is what a detector receives; its 8x8 blocks and quantisation then stay intact instead of being smeared by a
# later blur or resize. Blur after the downscale's return to the crop size keeps σ in model-input pixels whatever
# the scale drawn.
ORDER = ("downscale", "blur", "jpeg")


@dataclass(frozen=True)
class DegradePlan:
    """What happens to one crop, applied in ``ORDER``; None skips that operation."""

    downscale: Optional[float] = None  # shrink factor in (0, 1)
    blur: Optional[float] = None  # Gaussian σ in pixels
    jpeg: Optional[int] = None  # JPEG quality, 1..100


def degrade_rng(seed: int, epoch: int, rank: int) -> np.random.Generator:
    """The random stream of one worker's degradations in one epoch (independent of its crop stream)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, rank, STREAM_TAG]))


def draw_plans(config: DegradeConfig, n: int, rng: np.random.Generator) -> list[DegradePlan]:
    """Plans for ``n`` consecutive samples. Every sample uses the same draws whatever the probabilities and the
    outcomes (a gate and a strength per operation), so changing one operation's settings never reshuffles another's
    decisions, and sample ``i`` of a batch always gets the ``i``-th draws."""
    gates = rng.random((n, len(ORDER)))
    strengths = rng.random((n, len(ORDER)))
    ops = [config.downscale, config.blur, config.jpeg]
    plans = []
    for gate, strength in zip(gates, strengths, strict=True):
        chosen = {name: _strength(name, op, u) for name, op, g, u in zip(ORDER, ops, gate, strength, strict=True)
                  if g < op.p}
        plans.append(DegradePlan(**chosen))
    return plans


def _strength(name: str, op, u: float):
    """The parameter for a uniform draw ``u`` in [0, 1): uniform over the op's range, whole numbers for JPEG."""
    if name == "jpeg":
        low, high = op.quality
        return min(high, low + int(u * (high - low + 1)))
    low, high = op.scale if name == "downscale" else op.sigma
    return float(low + u * (high - low))


def apply_plan(img: np.ndarray, plan: DegradePlan) -> np.ndarray:
    """One uint8 HxWx3 crop degraded as ``plan`` says (same shape and dtype); the input is never modified."""
    if plan.downscale is not None:
        img = shrink_and_restore(img, plan.downscale)
    if plan.blur is not None:
        img = perturb.blur(img, plan.blur)
    if plan.jpeg is not None:
        img = perturb.jpeg(img, plan.jpeg)
    return img


def shrink_and_restore(img: np.ndarray, scale: float) -> np.ndarray:
    """Shrink by ``scale`` (bicubic, antialiased like an image editor's or a platform's resizer) and scale back up to
    the original size, so the crop keeps the model's input size.

    Bicubic on the way back too: it is what editors and viewers use to enlarge, and it keeps the edges that survived
    the shrink, so this operation stands for lost resolution; bilinear would blur them further and overlap with the
    blur operation. Both classes go through the same interpolation, so its own traces tell them nothing apart."""
    h, w = img.shape[:2]
    small = perturb.downscale(img, max(1, round(min(h, w) * scale)))
    restored = Image.fromarray(small).resize((w, h), resample=Image.Resampling.BICUBIC)
    return np.asarray(restored, dtype=np.uint8).copy()


def degrade_batch(images: np.ndarray, config: DegradeConfig, rng: np.random.Generator) -> np.ndarray:
    """A uint8 NHWC batch with each image degraded by its own plan drawn from ``rng``; the batch itself (no copy, no
    draw) when the config disables every operation."""
    if not config.enabled or len(images) == 0:
        return images
    plans = draw_plans(config, len(images), rng)
    return np.stack([apply_plan(img, plan) for img, plan in zip(images, plans, strict=True)])
