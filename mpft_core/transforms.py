"""Pixel transforms: tile small images, crop to the model size, flip, normalise.

There is deliberately no resize anywhere: resampling wipes out the low-level traces generators leave (docs/METHOD.md).
Tiling never builds more than the crop: the window is chosen first, then only its rows and columns are repeated, so a
crop costs the same memory whatever the image's shape (``tiled_window``).
Per-image functions work on numpy uint8 HWC arrays (decode side, CPU tasks); ``random_crops`` (the training loop's
per-epoch crop of the decoded windows) and ``normalize`` work on a torch batch right before the model, so the data
pipeline can ship compact uint8.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

# torch is imported inside the tensor functions only: the decode stage (numpy crops in Ray Data CPU tasks)
# then never loads torch, which costs ~3 s and ~300 MB per worker process.
if TYPE_CHECKING:
    import torch

# open_clip's OPENAI_DATASET_MEAN/STD; the model's own preprocess cfg overrides these when it has one.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocess:
    """Everything needed to turn decoded pixels into model input; stored in every checkpoint."""

    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(image_size=int(d["image_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]))


def tiled_window(img: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """The ``height`` x ``width`` region at (``top``, ``left``) of the image repeated endlessly down and right
    (wrap-around tiling), as a new contiguous array.

    Only the region is built: a side shorter than the region repeats just the rows or columns it needs, so a
    50,000,000 x 2 image costs one window, not the whole image tiled up to the window's height.
    """
    h, w = img.shape[:2]
    rows, cols = _span(top, height, h), _span(left, width, w)
    # A slice first (a view), then the repeated indices: no intermediate wider or taller than the window, and the
    # common case, a window inside the image, is a plain slice instead of a gather of every pixel.
    if isinstance(rows, slice):
        return np.array(img[rows][:, cols], order="C")
    if isinstance(cols, slice):
        return np.array(img[:, cols][rows], order="C")
    return img[np.ix_(rows, cols)]


def _span(start: int, length: int, size: int) -> slice | np.ndarray:
    """Indices ``start .. start + length`` along an axis of ``size``, wrapping around: a slice when no wrap is
    needed."""
    if start + length <= size:
        return slice(start, start + length)
    return (start + np.arange(length)) % size


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The centre ``size`` x ``size`` crop of the image, tiled first where a side is shorter than ``size``."""
    h, w = img.shape[:2]
    return tiled_window(img, max(0, h - size) // 2, max(0, w - size) // 2, size, size)


def train_window(img: np.ndarray, size: int, window: int, rng: np.random.Generator,
                 flip_prob: float = 0.5) -> tuple[np.ndarray, int, int]:
    """Training-time view of one image, cut once when it is decoded: a random crop of up to ``window`` pixels a
    side (randomly flipped), placed top-left in a ``window`` x ``window`` array padded with zeros.

    Returns (array, picture height, picture width). Images smaller than ``size`` are tiled up to ``size`` first, as
    in evaluation; an image between ``size`` and ``window`` is kept whole rather than tiled, so the per-epoch crops
    of ``random_crops`` (limited to the picture) never straddle a tiling seam that evaluation would not show.
    Only the chosen view is tiled (``tiled_window``), never the whole image.
    """
    if window < size:
        raise ValueError(f"window {window} is smaller than the crop size {size}")
    # The extent of the image once tiled up to ``size``: offsets are drawn in it, as if it had been built.
    h, w = max(img.shape[0], size), max(img.shape[1], size)
    view_h, view_w = min(h, window), min(w, window)
    top = int(rng.integers(0, h - view_h + 1))
    left = int(rng.integers(0, w - view_w + 1))
    view = tiled_window(img, top, left, view_h, view_w)
    if rng.random() < flip_prob:
        view = view[:, ::-1]
    out = np.zeros((window, window, img.shape[2]), dtype=img.dtype)
    out[:view_h, :view_w] = view
    return out, view_h, view_w


def eval_view(img: np.ndarray, size: int) -> np.ndarray:
    """Evaluation/scoring view: deterministic center crop."""
    return center_crop(img, size)


def random_crops(batch: torch.Tensor, size: int, generator: torch.Generator, *, heights=None, widths=None,
                 flip_prob: float = 0.5) -> torch.Tensor:
    """A random ``size`` x ``size`` crop, flipped horizontally with ``flip_prob``, of every image of a uint8 NHWC
    batch: the training loop's per-epoch view of the windows ``train_window`` decoded. ``heights`` / ``widths``
    (per image, default the whole array) bound the picture, top-left; crops stay inside it. Offsets are drawn
    from ``generator`` (a CPU generator, see ``crop_generator``)."""
    import torch

    n, h, w = batch.shape[:3]
    heights = torch.full((n,), h) if heights is None else torch.as_tensor(heights).cpu()
    widths = torch.full((n,), w) if widths is None else torch.as_tensor(widths).cpu()
    if bool((heights < size).any() or (widths < size).any() or (heights > h).any() or (widths > w).any()):
        raise ValueError(f"cannot crop {size}x{size} from pictures of {heights.tolist()} x {widths.tolist()} "
                         f"in {h}x{w} arrays")
    # Uniform offsets in [0, extent - size] for each image, from one draw per image and axis.
    tops = (torch.rand(n, generator=generator) * (heights - size + 1)).long().tolist()
    lefts = (torch.rand(n, generator=generator) * (widths - size + 1)).long().tolist()
    flips = (torch.rand(n, generator=generator) < flip_prob).tolist()
    corners = enumerate(zip(tops, lefts, strict=True))
    crops = [batch[i, top : top + size, left : left + size] for i, (top, left) in corners]
    return torch.stack([c.flip(1) if flip else c for c, flip in zip(crops, flips, strict=True)])


def crop_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The random stream of one worker's crops in one epoch: new crops every epoch, the same ones when a restarted
    run repeats that epoch."""
    import torch

    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NHWC (as shipped by the pipeline) -> float32 NCHW normalised for the model."""
    import torch

    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected a uint8 NHWC batch with 3 channels, got {tuple(batch.shape)} {batch.dtype}")
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of ``normalize`` back to [0, 1] RGB (float NCHW); used by TAM and by mask visualisations."""
    import torch

    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x * s + m
