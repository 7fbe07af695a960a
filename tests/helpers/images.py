"""Image fixtures: benchmark-shaped folder trees, a corpus of awkward files, and a learnable real-vs-fake toy task.

- ``real_photo_crops``: crops of the real photographs that ship with scikit-image and scikit-learn (no download).
- ``fake_images``: the synthetic "generated" class: smooth colour fields carrying a faint period-2 checkerboard, the
  kind of upsampling trace generators leave. A tiny ViT separates it from the photo crops within a few steps, so
  training tests can check that learning happens without real benchmark data.
- ``write_genimage_tree`` / ``write_ufd_tree``: the two benchmark layouts, returning {relative path: label};
  ``write_ufd_single_class``: a one-class UFD folder (the diffusion test sets and their real sets).
- ``write_bad_corpus``: one file per failure mode / odd format, returning {file name: expected to decode}.
Both classes are written in the same file format, so format is never the signal (docs/METHOD.md pitfall).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

GENIMAGE_LABELS = {"ai": 1, "nature": 0}
UFD_LABELS = {"1_fake": 1, "0_real": 0}

# The bad corpus is meant to be decoded with this pixel limit: only over_limit.png (300x300) exceeds it.
BAD_CORPUS_MAX_PIXELS = 50_000
# Upright (width, height) of the decodable files of the bad corpus, as decode_rgb must report them.
BAD_CORPUS_SIZES = {
    "ok_rgb.jpg": (24, 16),
    "cmyk.jpg": (20, 12),
    "gray16.png": (16, 8),
    "rgb16.png": (8, 6),
    "rgba.png": (12, 12),
    "grayscale.jpg": (16, 16),
    "palette.png": (10, 10),
    "bilevel.png": (9, 9),
    "animated.gif": (12, 10),
    "exif_rotated.jpg": (10, 20),  # stored 20x10 with orientation 6 (rotate 90° clockwise to view)
    "one_pixel.png": (1, 1),
    "very_wide.png": (4000, 3),
    "photo.webp": (16, 16),
    "UPPER_CASE.JPG": (16, 16),
}
BAD_CORPUS_FAILURES = ("truncated.jpg", "zero_bytes.jpg", "text_as.jpg", "over_limit.png", "corrupt_header.png")


# --------------------------------------------------------------------------------------------- pixel generators


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket(),
              skimage.data.stereo_motorcycle()[0]]
    photos += list(load_sample_images().images)  # china.jpg, flower.jpg
    return tuple(np.ascontiguousarray(p[:, :, :3], dtype=np.uint8) for p in photos)


def real_photo_crops(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` random ``size`` x ``size`` RGB uint8 crops of real photographs."""
    rng = np.random.default_rng(seed)
    photos = [p for p in _photos() if min(p.shape[:2]) >= size]
    if not photos:
        raise ValueError(f"no bundled photo is {size} px on both sides (the largest is 512x512)")
    crops = []
    for _ in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        h, w = photo.shape[:2]
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        crops.append(photo[top : top + size, left : left + size].copy())
    return crops


def fake_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` synthetic "generated" RGB uint8 images: smooth colour fields + a period-2 checkerboard trace."""
    rng = np.random.default_rng(seed + 1_000_003)  # never the same stream as real_photo_crops(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    checker = np.where((yy + xx) % 2 == 0, 1.0, -1.0)[:, :, None]
    images = []
    for _ in range(n):
        grid = rng.uniform(30, 225, size=(4, 4, 3))
        smooth = np.asarray(Image.fromarray(grid.astype(np.uint8)).resize((size, size), Image.BILINEAR), np.float64)
        pixels = smooth + 14.0 * checker + rng.normal(0, 2.0, size=smooth.shape)
        images.append(np.clip(pixels, 0, 255).astype(np.uint8))
    return images


# ----------------------------------------------------------------------------------------------- file writers


def _save(pixels: np.ndarray, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    is_jpeg = fmt.lower() in ("jpg", "jpeg")
    options = {"quality": 95} if is_jpeg else {}
    Image.fromarray(pixels).save(path, format="JPEG" if is_jpeg else fmt.upper(), **options)


def _write_class(root: Path, rel_dir: str, label: int, n: int, size: int, seed: int, fmt: str,
                 out: dict[str, int]) -> None:
    pixels = fake_images(n, size, seed) if label == 1 else real_photo_crops(n, size, seed)
    for i, arr in enumerate(pixels):
        rel = f"{rel_dir}/{i:04d}.{fmt}"
        _save(arr, root / rel, fmt)
        out[rel] = label


def write_genimage_tree(root: Path, subsets: Sequence[str] = ("sdv14", "midjourney"), n_per_class: int = 2,
                        size: int = 32, splits: Sequence[str] = ("train", "val"), fmt: str = "png",
                        seed: int = 0) -> dict[str, int]:
    """``<root>/<subset>/{train,val}/{ai,nature}/NNNN.<fmt>``; returns {path relative to root: label}."""
    root = Path(root)
    written: dict[str, int] = {}
    for s_i, subset in enumerate(subsets):
        for p_i, split in enumerate(splits):
            for folder, label in GENIMAGE_LABELS.items():
                _write_class(root, f"{subset}/{split}/{folder}", label, n_per_class, size,
                             seed=seed + 100 * s_i + 10 * p_i + label, fmt=fmt, out=written)
    return written


def write_ufd_tree(root: Path, subsets: Optional[Mapping[str, Optional[Sequence[str]]]] = None,
                   n_per_class: int = 2, size: int = 32, fmt: str = "png", seed: int = 0) -> dict[str, int]:
    """``<root>/<subset>/[<class>/]{0_real,1_fake}/NNNN.<fmt>``; ``subsets`` maps a subset to its object classes
    (None: no class level). Default: progan with classes car and cat, biggan without classes."""
    root = Path(root)
    subsets = {"progan": ("car", "cat"), "biggan": None} if subsets is None else subsets
    written: dict[str, int] = {}
    for s_i, (subset, classes) in enumerate(subsets.items()):
        for c_i, cls in enumerate(classes or [None]):
            base = f"{subset}/{cls}" if cls else subset
            for folder, label in UFD_LABELS.items():
                _write_class(root, f"{base}/{folder}", label, n_per_class, size,
                             seed=seed + 100 * s_i + 10 * c_i + label, fmt=fmt, out=written)
    return written


def write_ufd_single_class(root: Path, subset: str, label: int, n: int = 2, size: int = 32, fmt: str = "png",
                           seed: int = 0) -> dict[str, int]:
    """``<root>/<subset>/{0_real|1_fake}/NNNN.<fmt>``: a UFD test set of one class only, like UFD's diffusion sets
    (``guided/1_fake``, ...) and the real sets they are paired with (``imagenet/0_real``, ``laion/0_real``)."""
    folder = next(name for name, value in UFD_LABELS.items() if value == label)
    written: dict[str, int] = {}
    _write_class(Path(root), f"{subset}/{folder}", label, n, size, seed=seed, fmt=fmt, out=written)
    return written


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_rgb16(pixels: np.ndarray) -> bytes:
    """A 48-bit (16 bits per channel) RGB PNG; Pillow cannot write these itself."""
    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # bit depth 16, colour type 2 (RGB)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _bad_corpus_files() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    noise = lambda h, w: rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)  # noqa: E731
    jpeg_64 = _encode(Image.fromarray(noise(64, 64)), "JPEG", quality=90)

    rgba = np.zeros((12, 12, 4), np.uint8)
    rgba[:, :6] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent black
    frames = [Image.new("RGB", (12, 10), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)

    rotated = Image.fromarray(noise(10, 20))  # stored 20 wide x 10 high
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    gray16 = (np.arange(16 * 8, dtype=np.uint16).reshape(8, 16) * 500).astype(np.uint16)

    return {
        "ok_rgb.jpg": _encode(Image.fromarray(noise(16, 24)), "JPEG"),
        "truncated.jpg": jpeg_64[: len(jpeg_64) // 2],
        "zero_bytes.jpg": b"",
        "text_as.jpg": b"<html><body>404 Not Found</body></html>\n",
        "over_limit.png": _encode(Image.new("RGB", (300, 300), (90, 90, 90)), "PNG"),
        "corrupt_header.png": b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 200, dtype=np.uint8)),
        "cmyk.jpg": _encode(Image.new("CMYK", (20, 12), (0, 255, 255, 0)), "JPEG"),
        "gray16.png": _encode(Image.fromarray(gray16), "PNG"),
        "rgb16.png": png_rgb16(np.full((6, 8, 3), (65535, 32768, 0), np.uint16)),
        "rgba.png": _encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "grayscale.jpg": _encode(Image.fromarray(noise(16, 16)[:, :, 0], "L"), "JPEG"),
        "palette.png": _encode(Image.fromarray(noise(10, 10)).convert("P"), "PNG"),
        "bilevel.png": _encode(Image.fromarray(noise(9, 9)[:, :, 0] > 127), "PNG"),
        "animated.gif": animated.getvalue(),
        "exif_rotated.jpg": _encode(rotated, "JPEG", exif=exif),
        "one_pixel.png": _encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"),
        "very_wide.png": _encode(Image.fromarray(noise(3, 4000)), "PNG"),
        "photo.webp": _encode(Image.fromarray(noise(16, 16)), "WEBP"),
        "UPPER_CASE.JPG": _encode(Image.fromarray(noise(16, 16)), "JPEG"),
    }


def write_bad_corpus(root: Path) -> dict[str, bool]:
    """One file per awkward case in ``root``; returns {file name: decodes with max_pixels=BAD_CORPUS_MAX_PIXELS}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, data in _bad_corpus_files().items():
        (root / name).write_bytes(data)
        expected[name] = name in BAD_CORPUS_SIZES
    assert set(expected) == set(BAD_CORPUS_SIZES) | set(BAD_CORPUS_FAILURES)
    return expected
