"""Image degradations for evaluation: robustness (GenImage Table 5: JPEG q65/q30, Gaussian blur σ3/σ5, downscale to
112/64 px) and format alignment (every image of both classes re-encoded the same way).

Each function takes and returns a uint8 HxWx3 array of the *whole decoded image*: the degradation is applied before
the usual tile + center crop, as it would be to a file found in the wild (a JPEG-compressed crop is not the same as a
crop of a JPEG-compressed image). Pure numpy/PIL, deterministic, no torch.

    perturbations = parse_perturb_specs(["jpeg=65,30", "blur=3,5", "downscale=112,64"])
    degraded = perturbations[0].apply(img)      # jpeg q65
    [aligned] = parse_align_specs(["resize=256+jpeg=96"])
    aligned.name                                # "aligned-resize256-jpeg96"

Why alignment: benchmarks such as GenImage store real photos as JPEG and generated images as PNG, so a detector can
score well by recognising the file format; re-scored with both classes JPEG-compressed at quality 96 (DDA, NeurIPS
2025), detectors that looked near-perfect fell to chance. An aligned condition re-encodes every image, real or
generated, by the same steps, so what is left to separate them is not the container.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Union

import numpy as np
from PIL import Image, ImageFilter

from mpft_core.imageio import DEFAULT_MAX_PIXELS

# Robustness degradations (--perturb) and format-alignment steps (--align): JPEG is both, the one way to re-encode.
PERTURB_KINDS = ("jpeg", "blur", "downscale")
ALIGN_KINDS = ("resize", "jpeg")
MAX_BLUR_SIGMA = 100.0
MAX_RESIZE_SIDE = 4096  # an alignment scale, not an upscaler: beyond this it would only cost memory
CLEAN = "clean"  # the condition name of the images as they are
ALIGNED_PREFIX = "aligned-"


def _check_image(img: np.ndarray) -> None:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {img.shape} {img.dtype}")


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Re-encode as JPEG at ``quality`` (1-100, libjpeg scale) and decode again."""
    _check_image(img)
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    buffer = io.BytesIO()
    # 4:2:0 chroma subsampling is what cameras and web pipelines use, and what PIL does by default below q95.
    Image.fromarray(img).save(buffer, format="JPEG", quality=int(quality), subsampling="4:2:0")
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.uint8).copy()


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation ``sigma`` pixels (PIL's GaussianBlur radius is the σ)."""
    _check_image(img)
    if not float(sigma) > 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    blurred = Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=float(sigma)))
    return np.asarray(blurred, dtype=np.uint8).copy()


def downscale(img: np.ndarray, size: int) -> np.ndarray:
    """Shrink so the shorter side is ``size`` pixels (aspect kept, bicubic); images already that small pass unchanged.

    Only ever shrinks: the point is to lose the high-frequency traces, and upsampling a small image would add
    interpolation artefacts the protocol does not ask for. The scorer then tiles the small image up to the model size.
    """
    _check_image(img)
    if int(size) < 1:
        raise ValueError(f"downscale size must be >= 1, got {size}")
    h, w = img.shape[:2]
    shorter = min(h, w)
    if shorter <= size:
        return img
    scale = size / shorter
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    # Pin the shorter side to exactly `size` (rounding of the scale could miss it by one pixel).
    if h <= w:
        new_h = int(size)
    else:
        new_w = int(size)
    resized = Image.fromarray(img).resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8).copy()


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is ``size`` pixels (aspect kept, bicubic), shrinking or enlarging.

    Unlike ``downscale`` this also enlarges: as an alignment step it gives both classes one common scale, so the
    image size (GenImage's fakes are 512 or 256 px, its real photos anything) no longer tells them apart.
    """
    _check_image(img)
    _check_resize_side(size)
    h, w = img.shape[:2]
    if min(h, w) == size:
        return img
    if h <= w:
        new_h, new_w = int(size), max(1, round(w * size / h))
    else:
        new_h, new_w = max(1, round(h * size / w)), int(size)
    if new_h * new_w > DEFAULT_MAX_PIXELS:  # a panorama enlarged to a common scale: an error row, not gigabytes
        raise ValueError(f"resizing {w}x{h} to shorter side {size} would give {new_w}x{new_h} pixels, over the "
                         f"{DEFAULT_MAX_PIXELS:,}-pixel limit")
    resized = Image.fromarray(img).resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8).copy()


def _check_resize_side(size) -> None:
    if not 1 <= int(size) <= MAX_RESIZE_SIDE:
        raise ValueError(f"resize size must be in 1..{MAX_RESIZE_SIDE}, got {size}")


def _check_strength(kind: str, value) -> None:
    """ValueError unless ``value`` is a valid strength for ``kind``; arithmetic only (nothing is rendered)."""
    if kind == "jpeg" and not 1 <= value <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {value}")
    if kind == "blur" and not 0.1 <= value <= MAX_BLUR_SIGMA:  # below 0.1 px a Gaussian changes no 8-bit pixel
        raise ValueError(f"blur sigma must be in 0.1..{MAX_BLUR_SIGMA:g}, got {value}")
    if kind == "blur" and round(value, 2) != value:  # so that two sigmas never share a condition name
        raise ValueError(f"blur sigma takes at most two decimals, got {value}")
    if kind == "downscale" and value < 1:
        raise ValueError(f"downscale size must be >= 1, got {value}")
    if kind == "resize":
        _check_resize_side(value)


_FUNCTIONS = {"jpeg": jpeg, "blur": blur, "downscale": downscale, "resize": resize}
_WHOLE_NUMBER_KINDS = ("jpeg", "downscale", "resize")


@dataclass(frozen=True)
class Perturbation:
    """One degradation at one strength, e.g. ``Perturbation("jpeg", 65)``; plain data so Ray can ship it."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in _FUNCTIONS:
            raise ValueError(f"unknown perturbation {self.kind!r}; choose one of {', '.join(_FUNCTIONS)}")
        # Validate the strength now (on the driver) rather than in the first worker batch.
        _check_strength(self.kind, self._argument())

    def _argument(self):
        return float(self.value) if self.kind == "blur" else int(self.value)

    @property
    def name(self) -> str:
        """Short label used in tables and metric names: ``jpeg65``, ``blur3``, ``downscale112``."""
        value = self._argument()
        text = f"{value:g}" if isinstance(value, float) else str(value)
        return f"{self.kind}{text}"

    def apply(self, img: np.ndarray) -> np.ndarray:
        return _FUNCTIONS[self.kind](img, self._argument())


def parse_perturb_specs(specs: Iterable[str], kinds: tuple[str, ...] = PERTURB_KINDS) -> list[Perturbation]:
    """``["jpeg=65,30", "blur=3,5"]`` -> ``[jpeg65, jpeg30, blur3, blur5]`` in the order given, duplicates dropped;
    ``kinds``: the kinds accepted (the robustness degradations unless told otherwise).

    Raises:
        ValueError: malformed spec, unknown kind, or an out-of-range strength (the message names the spec).
    """
    out: list[Perturbation] = []
    for spec in specs:
        kind, sep, values = spec.partition("=")
        kind = kind.strip().lower()
        if not sep or not values.strip():
            raise ValueError(f"bad perturbation spec {spec!r}: expected kind=v1[,v2...], e.g. jpeg=65,30")
        if kind not in kinds:
            raise ValueError(f"bad perturbation spec {spec!r}: unknown kind {kind!r}; choose one of {', '.join(kinds)}")
        for raw in values.split(","):
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"bad perturbation spec {spec!r}: {raw!r} is not a number") from None
            if kind in _WHOLE_NUMBER_KINDS and not value.is_integer():
                raise ValueError(f"bad perturbation spec {spec!r}: {kind} takes whole numbers, got {raw!r}")
            try:
                perturbation = Perturbation(kind, value)
            except ValueError as err:
                raise ValueError(f"bad perturbation spec {spec!r}: {err}") from None
            if perturbation not in out:
                out.append(perturbation)
    return out


@dataclass(frozen=True)
class Alignment:
    """Format alignment: every image of both classes goes through ``steps`` in order (e.g. resize, then JPEG),
    as if both had been saved the same way. Plain data so Ray can ship it; used like a ``Perturbation``."""

    steps: tuple[Perturbation, ...]

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("an alignment needs at least one step")

    @property
    def name(self) -> str:
        """``aligned-jpeg96``, ``aligned-resize256-jpeg96``: the condition's label in tables, metric names and the
        promotion gate's rules."""
        return ALIGNED_PREFIX + "-".join(step.name for step in self.steps)

    def apply(self, img: np.ndarray) -> np.ndarray:
        for step in self.steps:
            img = step.apply(img)
        return img


# One evaluation condition besides the clean images.
Condition = Union[Perturbation, Alignment]


def parse_align_specs(specs: Iterable[str]) -> list[Alignment]:
    """``["jpeg=96", "resize=256+jpeg=96"]`` -> two alignments; the steps of one are joined by ``+`` and applied
    in the order written, each ``kind=value`` with a single value.

    Raises:
        ValueError: malformed spec, unknown kind, several values in one step, or an out-of-range strength.
    """
    out: list[Alignment] = []
    for spec in specs:
        steps = []
        for step_spec in spec.split("+"):
            if "," in step_spec:
                raise ValueError(f"bad alignment spec {spec!r}: one value per step (give several specs for several "
                                 "alignments, e.g. --align jpeg=96 jpeg=75)")
            try:
                steps.extend(parse_perturb_specs([step_spec], kinds=ALIGN_KINDS))
            except ValueError as err:
                raise ValueError(f"bad alignment spec {spec!r}: {err}") from None
        alignment = Alignment(tuple(steps))
        if alignment not in out:
            out.append(alignment)
    return out


def condition_from_name(name: str) -> Condition:
    """The perturbation or alignment a table's condition name stands for (``jpeg65``, ``aligned-resize256-jpeg96``):
    how the promotion gate's per-condition rules say which condition to evaluate.

    Raises:
        ValueError: a name no perturbation or alignment gives (the message lists the forms).
    """
    aligned = name.startswith(ALIGNED_PREFIX)
    parts = name[len(ALIGNED_PREFIX):].split("-") if aligned else [name]
    kinds = ALIGN_KINDS if aligned else PERTURB_KINDS
    steps = []
    for part in parts:
        kind = next((k for k in kinds if part.startswith(k)), None)
        try:
            if kind is None:
                raise ValueError("unknown kind")
            steps.extend(parse_perturb_specs([f"{kind}={part[len(kind):]}"], kinds=kinds))
        except ValueError:
            raise ValueError(f"unknown evaluation condition {name!r}: expected a perturbation such as jpeg65, blur3, "
                             "downscale112, or an alignment such as aligned-jpeg96, aligned-resize256-jpeg96") from None
    condition = Alignment(tuple(steps)) if aligned else steps[0]
    if condition.name != name:  # "jpeg065" or "blur3.0": say the canonical spelling rather than guess
        raise ValueError(f"evaluation condition {name!r} is spelt {condition.name!r}")
    return condition
