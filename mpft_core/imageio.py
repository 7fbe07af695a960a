"""Bytes of any common image file -> RGB uint8 pixels, or an ``ImageDecodeError`` that says what is wrong.

Crawled corpora contain everything: truncated downloads, HTML error pages saved as .jpg, CMYK JPEGs, 16-bit PNGs,
transparent logos, animated GIFs, phone photos that are only upright after their EXIF orientation is applied, and
decompression bombs. ``decode_rgb`` turns each into the pixels a viewer would show, or raises ``ImageDecodeError``
(a ``ValueError``) with a one-line reason; it never resizes.

Choices (each one so the pixels match what a person looking at the file sees):
- EXIF orientation is applied, so width/height are the upright size (a 20x10 photo with orientation 6 is 10x20).
- Transparency (RGBA, LA, palette with a transparent colour) is composited onto white, as browsers and viewers show
  it. Dropping alpha instead would expose whatever colours happen to sit under fully transparent pixels (often
  black, sometimes garbage), which is an artefact no viewer shows.
- Animated images (GIF, APNG, WebP) and multi-page TIFFs: the first frame.
- CMYK and other colour modes: Pillow's conversion to RGB (no ICC colour management).
- 16-bit samples are reduced to their high byte (65535 -> 255), never clipped. 32-bit integer grey ("I") is treated as
  16-bit when it holds values above 255; float grey ("F") as 0..1 when its maximum is at most 1, else 0..255.
- Decompression bombs: the pixel count (width x height, read from the header before any pixel is decoded) must not
  exceed ``max_pixels``. Pillow's own guard stays on as a backstop: it rejects images above 2 x
  ``PIL.Image.MAX_IMAGE_PIXELS`` (= ``DEFAULT_MAX_PIXELS``) whatever ``max_pixels`` says; raise
  ``PIL.Image.MAX_IMAGE_PIXELS`` too if you need a higher limit.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's default hard limit (2 x Image.MAX_IMAGE_PIXELS): above it Image.open raises DecompressionBombError.
DEFAULT_MAX_PIXELS = 178_956_970
WHITE = (255, 255, 255)
_TRANSPARENT_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (the message says why: empty, unrecognised, truncated, too large, ...)."""


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file's bytes to an upright RGB uint8 array of shape (height, width, 3)."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    img = _open(data)
    try:
        _check_pixel_limit(img, max_pixels)
        _load_first_frame(img)
        img = _upright(img)
        return _to_rgb_array(img)
    finally:
        img.close()


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns from 1x its limit; our own, configurable check below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"exceeds pixel limit (Pillow's decompression-bomb guard): {err}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not a recognised image format (starts with {data[:12]!r})") from None
    except Exception as err:  # malformed headers raise all sorts (SyntaxError, struct.error, ...)
        raise ImageDecodeError(f"unreadable image header: {type(err).__name__}: {err}") from None


def _check_pixel_limit(img: Image.Image, max_pixels: int) -> None:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"exceeds pixel limit: {width}x{height} = {width * height} pixels > max_pixels={max_pixels} "
            "(possible decompression bomb)"
        )


def _load_first_frame(img: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.seek(0)
            img.load()
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"exceeds pixel limit (Pillow's decompression-bomb guard): {err}") from None
    except (OSError, EOFError) as err:
        # Pillow's wording for cut-off files is "image file is truncated" / "broken data stream".
        raise ImageDecodeError(f"truncated or corrupt {img.format or 'image'} data: {err}") from None
    except Exception as err:
        raise ImageDecodeError(f"cannot decode {img.format or 'image'}: {type(err).__name__}: {err}") from None


def _upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:  # a corrupt EXIF block should not cost the pixels: keep the stored orientation
        return img


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _TRANSPARENT_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _grey_to_rgb(np.asarray(img), mode)
    rgb = img if mode == "RGB" else img.convert("RGB")
    return np.array(rgb, dtype=np.uint8)  # a copy: the caller owns it after the image is closed


def _grey_to_rgb(grey: np.ndarray, mode: str) -> np.ndarray:
    if mode == "F":
        grey = grey.astype(np.float64)
        scale = 255.0 if np.nanmax(grey, initial=0.0) <= 1.0 else 1.0
        grey8 = np.clip(np.nan_to_num(grey * scale), 0, 255).astype(np.uint8)
    elif mode == "I" and grey.max(initial=0) <= 255:
        grey8 = np.clip(grey, 0, 255).astype(np.uint8)
    else:
        grey8 = (np.clip(grey.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    return np.repeat(grey8[:, :, None], 3, axis=2)
