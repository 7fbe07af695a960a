"""Image degradations for robustness evaluation (GenImage Table 5: JPEG q65/q30, Gaussian blur σ3/σ5, downscale to
112/64 px).

Each function takes and returns a uint8 HxWx3 array of the *whole decoded image*: the degradation is applied before
the usual tile + center crop, as it would be to a file found in the wild (a JPEG-compressed crop is not the same as a
crop of a JPEG-compressed image). Pure numpy/PIL, deterministic, no torch.

    perturbations = parse_perturb_specs(["jpeg=65,30", "blur=3,5", "downscale=112,64"])
    degraded = perturbations[0].apply(img)      # jpeg q65
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

KINDS = ("jpeg", "blur", "downscale")


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


_FUNCTIONS = {"jpeg": jpeg, "blur": blur, "downscale": downscale}


@dataclass(frozen=True)
class Perturbation:
    """One degradation at one strength, e.g. ``Perturbation("jpeg", 65)``; plain data so Ray can ship it."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in _FUNCTIONS:
            raise ValueError(f"unknown perturbation {self.kind!r}; choose one of {', '.join(KINDS)}")
        # Validate the strength now (on the driver) rather than in the first worker batch.
        _FUNCTIONS[self.kind](np.zeros((2, 2, 3), dtype=np.uint8), self._argument())

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


def parse_perturb_specs(specs: Iterable[str]) -> list[Perturbation]:
    """``["jpeg=65,30", "blur=3,5"]`` -> ``[jpeg65, jpeg30, blur3, blur5]`` in the order given, duplicates dropped.

    Raises:
        ValueError: malformed spec, unknown kind, or an out-of-range strength (the message names the spec).
    """
    out: list[Perturbation] = []
    for spec in specs:
        kind, sep, values = spec.partition("=")
        kind = kind.strip().lower()
        if not sep or not values.strip():
            raise ValueError(f"bad perturbation spec {spec!r}: expected kind=v1[,v2...], e.g. jpeg=65,30")
        for raw in values.split(","):
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"bad perturbation spec {spec!r}: {raw!r} is not a number") from None
            if kind in ("jpeg", "downscale") and not value.is_integer():
                raise ValueError(f"bad perturbation spec {spec!r}: {kind} takes whole numbers, got {raw!r}")
            try:
                perturbation = Perturbation(kind, value)
            except ValueError as err:
                raise ValueError(f"bad perturbation spec {spec!r}: {err}") from None
            if perturbation not in out:
                out.append(perturbation)
    return out
