"""A pre-trained stand-in backbone: a small open_clip ViT pre-trained here, on real photos only, as a weight file.

MPFT fine-tunes a *pre-trained* CLIP tower, but CLIP weights cannot be downloaded where this project is built and
tested, so every run otherwise starts from random weights. ``pretrain`` trains the vision tower of a small open_clip
model (default ``mpft-tiny-32``) from random init and ``save_standin`` writes the whole CLIP state dict with
``backbone.save_clip_weights``, so the file loads through the normal weights path
(``BackboneConfig(name=..., pretrained="/path/file.safetensors")``), strictly, and states its activation.

Objective: SimCLR-style contrastive learning (NT-Xent). Each step cuts ``batch_size`` windows (``region`` pixels a
side, native resolution) from random photos; each window gives two views (a random square sub-window resized to the
input size, a flip, brightness / contrast / saturation jitter, sometimes grey), and the loss asks the two views of
a window to be each other's nearest neighbour among all views of the batch. The loss is taken on the tower's pooled
output through a small projection head that is thrown away. Why contrastive and not masked-image modelling: the
detector's head reads exactly that pooled embedding, and a contrastive loss trains it directly; masked-image
modelling would need a pixel decoder and mostly trains the patch tokens. Views are fed exactly as the detector feeds
its crops: uint8 RGB, scaled to [0, 1], normalised with the tower's own preprocess mean and std. The smallest view is
an input-sized window at native resolution, the largest ``region`` pixels shrunk to the input, so the tower sees the
scales the detector will see (the detector never resizes) and a little coarser.

This is a stand-in, not CLIP: a tower of about 120 thousand parameters (``mpft-tiny-32``) trained for minutes on
a dozen photos, not on hundreds of millions of captioned images. It can show whether the ablation (TAM vs random
masking vs plain fine-tuning vs frozen probe) ranks differently from a pre-trained start than from random init, and
whether fine-tuning keeps or destroys features learnt beforehand; a frozen probe on it is at least a probe on
features that mean something. It cannot show how MPFT behaves with CLIP's features, and its numbers are no evidence
for or against the paper's. Its features are also trained to ignore colour shifts and mild resampling, which a
detector of generated images may not want to ignore.

Deterministic given ``PretrainConfig.seed``: the model is initialised under a seeded copy of torch's global RNG
(``torch.random.fork_rng``), crops and augmentations come from a seeded ``torch.Generator``, and torch runs with
``torch_threads`` threads (restored afterwards). The file's metadata (``PRETRAIN_METADATA_KEY``) records the config
and a hash of the photos, so a caller can tell whether an existing file was made with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

# The factory's private builders: the stand-in must be built (random init of the whole CLIP model) and read back
# exactly as `create_backbone` builds a tower, so it uses the same code rather than a copy.
from .backbone import (
    Architecture,
    _create_clip,
    _preprocess_of,
    register_shipped_configs,
    save_clip_weights,
    weights_metadata,
)
from .config import BackboneConfig, InputError, StrictModel
from .transforms import Preprocess, normalize, tiled_window

# safetensors metadata key under which a stand-in records what produced it (config and photo hash, JSON)
PRETRAIN_METADATA_KEY = "mpft.pretrain"
# ITU-R BT.601 luma weights: the grey a photo would have, for the saturation and greyscale augmentations
LUMA = (0.299, 0.587, 0.114)
# Seed of the held-out views: fixed, so that losses measured for different models are on the same views
HELDOUT_SEED = 12345
HELDOUT_BATCHES = 4


class PretrainConfig(StrictModel):
    """How the stand-in is pre-trained; the defaults take about 2-3 minutes for ``mpft-tiny-32`` on a 2-core CPU."""

    model: str = "mpft-tiny-32"  # an open_clip model name or a shipped config (mpft_core/configs)
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(128, ge=2)  # windows per step; each gives two views
    lr: float = Field(2e-3, gt=0.0)  # AdamW peak, after a linear warm-up, then cosine to 0
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.05, ge=0.0)
    temperature: float = Field(0.2, gt=0.0)  # NT-Xent softmax temperature on cosine similarities
    region: int = Field(64, ge=1)  # side of the native-resolution photo window both views are cut from
    min_view_area: float = Field(0.25, gt=0.0, le=1.0)  # smallest view, as a fraction of the window's area
    jitter: float = Field(0.4, ge=0.0, lt=1.0)  # brightness, contrast, saturation factors drawn in [1 - j, 1 + j]
    grayscale_p: float = Field(0.2, ge=0.0, le=1.0)
    projection_dim: int = Field(64, ge=1)  # output of the discarded projection head
    seed: int = 0
    # One thread: on 2 cores, two took longer even when idle (8.1 s vs 6.6 s, 40 steps of 128) and stalled ~35x when
    # another process was busy. Part of the config because float sums can differ with the thread count.
    torch_threads: int = Field(1, ge=1)


@dataclass
class Standin:
    """A (pre-)trained stand-in: the whole open_clip CLIP model (its ``visual`` is what was trained), the projection
    head the loss used (discarded when saved), and what the weight file records."""

    model: nn.Module
    head: nn.Module
    architecture: Architecture
    preprocess: Preprocess
    provenance: dict
    losses: list[float] = field(default_factory=list)  # training loss per step
    heldout_losses: dict[str, float] = field(default_factory=dict)  # {"initial", "trained"} if measured


def provenance(cfg: PretrainConfig, photos: Sequence[np.ndarray]) -> dict:
    """What a weight file made from ``photos`` with ``cfg`` records: the config and a hash of the photos."""
    return {"config": cfg.to_dict(), "photos": len(photos), "photos_sha256": photos_digest(photos)}


def photos_digest(photos: Sequence[np.ndarray]) -> str:
    """sha256 over every photo's shape, dtype and pixels, in order."""
    digest = hashlib.sha256()
    for photo in photos:
        pixels = np.ascontiguousarray(photo)
        digest.update(json.dumps([list(pixels.shape), str(pixels.dtype)]).encode())
        digest.update(pixels.tobytes())
    return digest.hexdigest()


def recorded_provenance(path: str | os.PathLike[str]) -> Optional[dict]:
    """The provenance a stand-in weight file records; None for a weight file that records none. ValueError if
    ``path`` is not a safetensors file."""
    stated = weights_metadata(path).get(PRETRAIN_METADATA_KEY)
    return None if stated is None else json.loads(stated)


def build_initial(cfg: PretrainConfig, photos: Sequence[np.ndarray]) -> Standin:
    """The untrained stand-in: the whole CLIP model for ``cfg.model``, randomly initialised exactly as
    ``create_backbone`` would build it, plus a fresh projection head; the same for the same seed."""
    _check_model_name(cfg.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, architecture, _ = _create_clip(BackboneConfig(name=cfg.model, pretrained=None), None, None)
        preprocess = _preprocess_of(model.visual)
        width = int(model.visual.output_dim)
        head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, cfg.projection_dim))
    if cfg.region < preprocess.image_size:
        raise InputError(f"region {cfg.region} is smaller than {cfg.model!r}'s input ({preprocess.image_size} px)")
    return Standin(model, head, architecture, preprocess, provenance(cfg, photos))


def pretrain(photos: Sequence[np.ndarray], cfg: PretrainConfig, *,
             heldout_photos: Optional[Sequence[np.ndarray]] = None,
             on_progress: Optional[Callable[[int, float], None]] = None, progress_every: int = 50) -> Standin:
    """Pre-train the vision tower of ``cfg.model`` contrastively on crops of ``photos`` (uint8 RGB ``[H, W, 3]``).

    ``heldout_photos``: if given, the contrastive loss on their views is measured before and after training
    (``Standin.heldout_losses``). ``on_progress(step, mean loss since the last call)`` is called every
    ``progress_every`` steps and after the last one.

    Raises:
        InputError: photos that are not uint8 RGB arrays, an unknown model, a ``region`` smaller than its input.
    """
    if progress_every < 1:
        raise ValueError(f"progress_every must be at least 1, got {progress_every}")
    _check_photos(photos, "photos")
    if heldout_photos is not None:
        _check_photos(heldout_photos, "heldout_photos")
    with torch_threads(cfg.torch_threads):
        standin = build_initial(cfg, photos)
        if heldout_photos is not None:
            standin.heldout_losses["initial"] = heldout_loss(standin, heldout_photos, cfg)
        _train(standin, photos, cfg, on_progress, progress_every)
        if heldout_photos is not None:
            standin.heldout_losses["trained"] = heldout_loss(standin, heldout_photos, cfg)
    return standin


def _train(standin: Standin, photos: Sequence[np.ndarray], cfg: PretrainConfig,
           on_progress: Optional[Callable[[int, float], None]], progress_every: int) -> None:
    """``cfg.steps`` AdamW steps of the tower and head on fresh views; leaves both in eval mode."""
    visual, head = standin.model.visual, standin.head
    visual.train()
    head.train()
    optimizer = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    generator = torch.Generator().manual_seed(cfg.seed)
    since_report: list[float] = []
    for step in range(1, cfg.steps + 1):
        first, second = view_pair(photos, cfg, standin.preprocess, generator)
        loss = contrastive_loss(standin, first, second, cfg.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        standin.losses.append(float(loss.detach()))
        since_report.append(standin.losses[-1])
        if on_progress is not None and (step % progress_every == 0 or step == cfg.steps):
            on_progress(step, sum(since_report) / len(since_report))
            since_report.clear()
    visual.eval()
    head.eval()


def lr_factor(step: int, cfg: PretrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimiser step ``step`` (0-based): linear warm-up, then cosine to 0."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def heldout_loss(standin: Standin, photos: Sequence[np.ndarray], cfg: PretrainConfig, *,
                 batches: int = HELDOUT_BATCHES, seed: int = HELDOUT_SEED) -> float:
    """Mean contrastive loss of ``standin`` (tower + head, no gradients) on ``batches`` batches of views of
    ``photos``, drawn from ``seed`` alone: every model is measured on the same views."""
    _check_photos(photos, "photos")
    generator = torch.Generator().manual_seed(seed)
    modules = (standin.model.visual, standin.head)
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            losses = [contrastive_loss(standin, *view_pair(photos, cfg, standin.preprocess, generator),
                                       cfg.temperature) for _ in range(batches)]
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    return float(torch.stack(losses).mean())


def contrastive_loss(standin: Standin, first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of two uint8 NHWC batches of views (row i of each: two views of one window), through the tower's
    pooled output and the projection head, inputs normalised as the detector normalises them."""
    mean, std = standin.preprocess.mean, standin.preprocess.std
    pooled = pooled_embedding(standin.model.visual, normalize(torch.cat([first, second]), mean, std))
    return nt_xent(standin.head(pooled), temperature)


def pooled_embedding(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tower's pooled image embedding ``[N, D]``: what the detector's head reads."""
    out = visual(x)
    return out[0] if isinstance(out, tuple) else out  # towers built with output_tokens return (pooled, tokens)


def nt_xent(projections: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy: ``projections`` holds ``2n`` rows, row i and row i + n two
    views of one window; each row must pick its partner among the other ``2n - 1`` by cosine similarity."""
    n = projections.shape[0] // 2
    z = F.normalize(projections, dim=1)
    similarity = (z @ z.T) / temperature
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    similarity = similarity.masked_fill(self_pairs, float("-inf"))
    partners = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, partners)


def view_pair(photos: Sequence[np.ndarray], cfg: PretrainConfig, preprocess: Preprocess,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uint8 NHWC batches of augmented views, row i of each cut from the same random photo window."""
    windows = photo_windows(photos, cfg.batch_size, cfg.region, generator)
    return (augmented_views(windows, preprocess.image_size, cfg, generator),
            augmented_views(windows, preprocess.image_size, cfg, generator))


def photo_windows(photos: Sequence[np.ndarray], n: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random ``side`` x ``side`` windows at native resolution, each from a random photo, as float
    ``[n, 3, side, side]`` in [0, 1]. A photo smaller than ``side`` is tiled, as the detector's input is."""
    which = torch.randint(len(photos), (n,), generator=generator).tolist()
    corners = torch.rand(n, 2, generator=generator).tolist()
    windows = []
    for index, (row, col) in zip(which, corners, strict=True):
        photo = photos[index]
        height, width = max(photo.shape[0], side), max(photo.shape[1], side)
        top, left = int(row * (height - side + 1)), int(col * (width - side + 1))
        windows.append(tiled_window(photo, top, left, side, side))
    return torch.from_numpy(np.stack(windows)).permute(0, 3, 1, 2).float().div_(255.0)


def augmented_views(windows: torch.Tensor, size: int, cfg: PretrainConfig, generator: torch.Generator) -> torch.Tensor:
    """One view of every window as uint8 NHWC ``[n, size, size, 3]``: a random square sub-window (whole pixels,
    ``min_view_area`` to all of the window) resampled to ``size``, flipped half the time, colour-jittered, grey
    with ``grayscale_p``; rounded to uint8, as a decoded crop is."""
    views = _resized_crops(windows, size, cfg.min_view_area, generator)
    views = _colour_jitter(views, cfg.jitter, generator)
    grey = torch.rand(views.shape[0], generator=generator) < cfg.grayscale_p
    views = torch.where(grey.view(-1, 1, 1, 1), _luma(views).expand_as(views), views)
    return views.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _resized_crops(windows: torch.Tensor, size: int, min_area: float, generator: torch.Generator) -> torch.Tensor:
    """Bilinear resampling of one square sub-window per window, one batched ``grid_sample``. Sides and corners are
    whole pixels, so a sub-window of exactly ``size`` pixels is copied unchanged (no interpolation)."""
    n, _, region, _ = windows.shape
    smallest = min(region, max(1, math.ceil(region * math.sqrt(min_area))))
    sides = smallest + _uniform_integers(torch.full((n,), region - smallest), generator)
    tops = _uniform_integers(region - sides, generator)
    lefts = _uniform_integers(region - sides, generator)
    flips = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    # affine_grid (align_corners=False) maps output coordinate u in [-1, 1] to input (s/R) u + (2 corner + s)/R - 1:
    # output pixel i then samples input pixel corner + (i + 0.5) s / size - 0.5.
    scale = sides.float() / region
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale * flips
    theta[:, 1, 1] = scale
    theta[:, 0, 2] = (2 * lefts + sides).float() / region - 1
    theta[:, 1, 2] = (2 * tops + sides).float() / region - 1
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return F.grid_sample(windows, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _uniform_integers(highest: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One integer drawn uniformly from ``0 .. highest[i]`` (ends included) per element."""
    draws = (torch.rand(highest.shape, generator=generator) * (highest + 1)).long()
    return torch.minimum(draws, highest)  # a float32 draw just below 1 can round up to highest + 1


def _colour_jitter(views: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, then contrast (around the image's mean grey), then saturation (around each pixel's grey), each
    factor drawn per image in [1 - strength, 1 + strength]; clamped to [0, 1] after each, as torchvision does."""
    n = views.shape[0]
    brightness, contrast, saturation = (1.0 + strength * (2.0 * torch.rand(3, n, 1, 1, 1, generator=generator) - 1.0))
    views = (views * brightness).clamp_(0.0, 1.0)
    mean_grey = _luma(views).mean(dim=(1, 2, 3), keepdim=True)
    views = ((views - mean_grey) * contrast + mean_grey).clamp_(0.0, 1.0)
    grey = _luma(views)
    return ((views - grey) * saturation + grey).clamp_(0.0, 1.0)


def _luma(views: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(LUMA, dtype=views.dtype).view(1, 3, 1, 1)
    return (views * weights).sum(dim=1, keepdim=True)


def save_standin(standin: Standin, path: str | os.PathLike[str]) -> None:
    """Write the stand-in's whole CLIP state dict (``save_clip_weights``: states activation and normalisation) plus
    its provenance to ``path``, atomically: a temporary file in the same folder, then a rename, so a reader never
    sees half a file and an interrupted run leaves the old file in place."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    extra = {PRETRAIN_METADATA_KEY: json.dumps(standin.provenance, sort_keys=True)}
    try:
        save_clip_weights(standin.model, temporary, standin.architecture.activation, standin.preprocess,
                          extra_metadata=extra)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch threads (the result of a float sum can depend on it), then restore."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_model_name(name: str) -> None:
    register_shipped_configs()
    if open_clip.get_model_config(name.replace("/", "-")) is None:
        raise InputError(f"unknown open_clip model {name!r}; e.g. mpft-tiny-32, mpft-tiny-224, mpft-small-224")


def _check_photos(photos: Sequence[np.ndarray], what: str) -> None:
    if len(photos) == 0:
        raise InputError(f"{what}: no photos given")
    for i, photo in enumerate(photos):
        if not (isinstance(photo, np.ndarray) and photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3):
            shape = getattr(photo, "shape", None)
            raise InputError(f"{what}[{i}] must be a uint8 RGB array [H, W, 3], got {type(photo).__name__} {shape}")
