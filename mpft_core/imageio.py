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
- Greyscale deeper than 8 bits (16-bit "I;16", 32-bit "I") is scaled by its real range: the image's maximum rounded
  up to a whole number of bits (at least 8), so 12-bit data in a 16-bit PNG (0..4095) spans 0..255 like full 16-bit
  data (0..65535) does; the reduction is a right shift by (bits - 8), never a clip. A dark 16-bit image whose
  maximum stays below 4096 is therefore brightened as if it were 12-bit: the file does not say which it is (PNG's
  sBIT chunk would, but Pillow does not read it, and per the PNG spec sBIT data is stored already scaled to 16 bits).
  Colour deeper than 8 bits (48-bit PNG or TIFF) is reduced by Pillow itself to its high byte before we see it.
  Float grey ("F") is read as 0..1 when its maximum is at most 1, else 0..255.

Hostile files (each refusal is an ``ImageDecodeError`` with a message that never quotes the file's bytes):
- Only ``ALLOWED_FORMATS`` are opened (raster formats Pillow decodes in-process). Anything else Pillow knows, such as
  EPS (which it hands to Ghostscript), is "unsupported format EPS"; bytes no format claims are "not a recognised
  image format".
- Size: a file over ``max_bytes`` (default ``DEFAULT_MAX_BYTES``, 256 MiB) is refused before it is parsed.
- Decompression bombs: the pixel count (width x height, read from the header before any pixel is decoded) must not
  exceed ``max_pixels``. Pillow's own guard stays on as a backstop: it rejects images above 2 x
  ``PIL.Image.MAX_IMAGE_PIXELS`` (= ``DEFAULT_MAX_PIXELS``) whatever ``max_pixels`` says; raise
  ``PIL.Image.MAX_IMAGE_PIXELS`` too if you need a higher limit. The pixel limit is what bounds a decode's memory:
  at peak about 8 bytes per pixel for an opaque image and 15 for a transparent one (Pillow's buffers plus the RGB
  array returned; measured with Pillow 13), so up to ~2.7 GB at the default limit. Extreme aspect ratios
  (50,000,000 x 2) are not refused: they decode like any image within the limit, and the crops in
  ``mpft_core.transforms`` tile only the window they return, never the whole image.
- Time: decoding stops with "decode time limit" once it has run ``max_seconds`` (default ``DEFAULT_MAX_SECONDS``).
  The clock is checked between steps and each time the decoder asks for more of the file (every 64 KiB for PNG,
  JPEG, GIF and BMP), so it is a cooperative limit, not a hard one: a single call into C (one WebP frame, a whole
  TIFF handed to libtiff) is not interrupted, but its work is bounded by the byte and pixel limits. Signals
  (SIGALRM) would interrupt more but only work in a process's main thread and would steal the alarm of whoever
  else uses it (pytest-timeout, a serving framework), so they are not used.
"""

from __future__ import annotations

import io
import time
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's default hard limit (2 x Image.MAX_IMAGE_PIXELS): above it Image.open raises DecompressionBombError.
DEFAULT_MAX_PIXELS = 178_956_970
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_SECONDS = 30.0
# Raster formats decoded in-process by Pillow and common in image corpora. Phone cameras' multi-picture JPEGs (Pillow's
# "MPO") open through the JPEG entry, so they need no entry of their own.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
WHITE = (255, 255, 255)
_TRANSPARENT_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_DEEP_GREY_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_SNIFF_BYTES = 16  # what Pillow's format checks look at (Image.open reads the same prefix)


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (the message says why: empty, unrecognised, truncated, too large, ...)."""


class _Deadline:
    """The moment a decode must give up by; ``check`` raises once it has passed."""

    def __init__(self, max_seconds: float):
        self.max_seconds = max_seconds
        self._end = time.monotonic() + max_seconds

    def check(self) -> None:
        if time.monotonic() >= self._end:
            raise ImageDecodeError(f"decode time limit: gave up after max_seconds={self.max_seconds:g}")


class _TimedBytes(io.BytesIO):
    """The file as Pillow reads it: every read first checks the deadline, so a slow decode stops between chunks."""

    def __init__(self, data: bytes, deadline: _Deadline):
        super().__init__(data)
        self._deadline = deadline

    def read(self, size: int | None = -1) -> bytes:
        self._deadline.check()
        return super().read(size)


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, max_bytes: int = DEFAULT_MAX_BYTES,
               max_seconds: float = DEFAULT_MAX_SECONDS) -> np.ndarray:
    """Decode an image file's bytes to an upright RGB uint8 array of shape (height, width, 3).

    Refuses (``ImageDecodeError``) files over ``max_bytes``, images over ``max_pixels``, formats outside
    ``ALLOWED_FORMATS``, and decodes still running after ``max_seconds`` (see the module docstring for how hard
    each limit is)."""
    _check_byte_limit(data, max_bytes)
    deadline = _Deadline(max_seconds)
    img = _open(data, deadline)
    try:
        _check_pixel_limit(img, max_pixels)
        _load_first_frame(img)
        deadline.check()
        img = _upright(img)
        deadline.check()
        return _to_rgb_array(img)
    finally:
        img.close()


def _check_byte_limit(data: bytes, max_bytes: int) -> None:
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if len(data) > max_bytes:
        raise ImageDecodeError(f"file too large: {len(data)} bytes > max_bytes={max_bytes}")


def _open(data: bytes, deadline: _Deadline) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns from 1x its limit; our own, configurable check below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(_TimedBytes(data, deadline), formats=ALLOWED_FORMATS)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError:
        raise ImageDecodeError("exceeds pixel limit (Pillow's decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(_unopened_reason(data)) from None
    except Exception as err:  # malformed headers raise all sorts (SyntaxError, struct.error, ...)
        # Pillow's own wording can quote the file's bytes (a chunk name, a marker), so only the error's type is kept.
        raise ImageDecodeError(f"unreadable image header ({type(err).__name__})") from None


def _unopened_reason(data: bytes) -> str:
    """Why no allowed format opened the file: another format Pillow recognises, or none at all."""
    known = sniff_format(data)
    if known is None or known in ALLOWED_FORMATS:  # an allowed format's signature whose header did not parse
        return "not a recognised image format"
    return f"unsupported format {known} (allowed: {', '.join(ALLOWED_FORMATS)})"


def sniff_format(data: bytes) -> str | None:
    """The name of the first Pillow format whose signature check accepts the file's first bytes, or None.

    Only the signature checks run (no plugin parses anything), so naming a format is safe for any format."""
    Image.init()
    prefix = data[:_SNIFF_BYTES]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            verdict = accept(prefix) if accept is not None else False
        except Exception:  # a signature check that trips over a short prefix is a "no"
            continue
        if verdict and not isinstance(verdict, str):  # a str is Pillow's "looks like it, but cannot read it"
            return name
    return None


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
    kind = img.format or "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.seek(0)
            img.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError:
        raise ImageDecodeError("exceeds pixel limit (Pillow's decompression-bomb guard)") from None
    except (OSError, EOFError) as err:
        # Pillow's wording for cut-off files is "image file is truncated" / "broken data stream".
        raise ImageDecodeError(f"truncated or corrupt {kind} data ({type(err).__name__})") from None
    except Exception as err:  # again only the type: e.g. "broken PNG file (chunk b'...')" quotes the file
        raise ImageDecodeError(f"cannot decode {kind} data ({type(err).__name__})") from None


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
        return _composite_on_white(img)
    if mode in _DEEP_GREY_MODES:
        return _grey_to_rgb(deep_grey_to_uint8(np.asarray(img)))
    if mode == "F":
        return _grey_to_rgb(float_grey_to_uint8(np.asarray(img)))
    rgb = img if mode == "RGB" else img.convert("RGB")
    return np.array(rgb, dtype=np.uint8)  # a copy: the caller owns it after the image is closed


def _composite_on_white(img: Image.Image) -> np.ndarray:
    rgba = img if img.mode == "RGBA" else img.convert("RGBA")  # no copy when it already is: memory scales with pixels
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)


def significant_bits(grey: np.ndarray) -> int:
    """Bits the samples actually use: the maximum rounded up to a whole bit count, at least 8."""
    peak = int(grey.max(initial=0))
    return max(8, peak.bit_length())


def deep_grey_to_uint8(grey: np.ndarray) -> np.ndarray:
    """Integer grey of more than 8 bits -> uint8, scaled by the bits the image uses (negative values become 0)."""
    if grey.dtype.kind == "i":
        grey = np.maximum(grey, 0)
    shift = significant_bits(grey) - 8
    return (grey >> shift).astype(np.uint8)


def float_grey_to_uint8(grey: np.ndarray) -> np.ndarray:
    grey = np.nan_to_num(grey.astype(np.float32))
    scale = 255.0 if grey.max(initial=0.0) <= 1.0 else 1.0
    return np.clip(grey * scale, 0, 255).astype(np.uint8)


def _grey_to_rgb(grey8: np.ndarray) -> np.ndarray:
    return np.repeat(grey8[:, :, None], 3, axis=2)
