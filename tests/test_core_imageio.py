"""mpft_core/imageio.py against hostile and unusual files: formats outside the allow-list, deep greyscale, files too
large or too slow to decode, and error messages that must not quote the file."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from mpft_core.imageio import ALLOWED_FORMATS, ImageDecodeError, decode_rgb

SECRET = b"hunter2-token"  # stands for whatever private text a hostile or mislabelled file may carry

EPS_FILE = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%" + SECRET + b"\n"
            b"newpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_rgb(pixels: np.ndarray, idat_size: int) -> bytes:
    """An 8-bit RGB PNG whose compressed data is split into IDAT chunks of ``idat_size`` bytes."""
    h, w, _ = pixels.shape
    stream = zlib.compress(b"".join(b"\x00" + pixels[y].tobytes() for y in range(h)), 1)
    idats = b"".join(_chunk(b"IDAT", stream[i:i + idat_size]) for i in range(0, len(stream), idat_size))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + idats
            + _chunk(b"IEND", b""))


def _png_with_a_broken_chunk_after_the_pixels_start() -> bytes:
    """A PNG whose first IDAT holds half the pixel stream and whose next chunk header is not a chunk name:
    Pillow's own error for it quotes those bytes ("broken PNG file (chunk b'...')")."""
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    whole = _png_rgb(pixels, idat_size=1 << 20)
    stream = zlib.compress(b"".join(b"\x00" + pixels[y].tobytes() for y in range(16)), 1)
    start = whole.index(b"IDAT") - 4
    return whole[:start] + _chunk(b"IDAT", stream[: len(stream) // 2]) + b"\x00\x00\x00\x10<" + SECRET[:3] + SECRET


# ------------------------------------------------------------------------------------------------- formats


def test_eps_is_refused_by_name_without_calling_ghostscript():
    with pytest.raises(ImageDecodeError, match=r"^unsupported format EPS \(allowed: PNG, JPEG"):
        decode_rgb(EPS_FILE)


def test_formats_outside_the_allow_list_are_refused_even_when_pillow_reads_them():
    ppm = _encode(Image.new("RGB", (4, 4), (1, 2, 3)), "PPM")
    assert Image.open(io.BytesIO(ppm)).format == "PPM"  # Pillow alone would decode it
    with pytest.raises(ImageDecodeError, match="^unsupported format PPM"):
        decode_rgb(ppm)


def test_text_is_not_an_image():
    with pytest.raises(ImageDecodeError, match="^not a recognised image format$"):
        decode_rgb(b"user=admin password=" + SECRET + b"\n")


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF", "PNG", "WEBP"])
def test_every_allowed_lossless_format_decodes_to_its_pixels(fmt):
    assert set(ALLOWED_FORMATS) >= {"PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"}
    pixels = np.zeros((6, 10, 3), np.uint8)
    pixels[:, 5:] = (200, 30, 60)
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_rgb(_encode(Image.fromarray(pixels), fmt, **kwargs))
    assert np.array_equal(decoded, pixels), fmt


def test_phone_multi_picture_jpegs_decode_their_first_frame():
    frames = [Image.new("RGB", (8, 6), (200, 10, 10)), Image.new("RGB", (8, 6), (0, 0, 255))]
    mpo = _encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    assert np.abs(decode_rgb(mpo).astype(int) - (200, 10, 10)).max() < 8


# ------------------------------------------------------------------------------------------------- messages


@pytest.mark.parametrize("data", [
    pytest.param(b"user=admin password=" + SECRET, id="text"),
    pytest.param(EPS_FILE, id="eps"),
    pytest.param(b"\x89PNG\r\n\x1a\n" + SECRET * 4, id="png-signature-then-junk"),
    pytest.param(_png_with_a_broken_chunk_after_the_pixels_start(), id="broken-png-chunk"),
    pytest.param(b"\xff\xd8\xff\xe0" + SECRET * 4, id="jpeg-signature-then-junk"),
])
def test_error_messages_never_quote_the_files_bytes(data):
    with pytest.raises(ImageDecodeError) as caught:
        decode_rgb(data)
    message = str(caught.value)
    assert message and "\n" not in message
    for fragment in (SECRET[:3], SECRET[-3:], b"<" + SECRET[:3]):
        assert fragment.decode() not in message, message
    assert "b'" not in message and 'b"' not in message, message


# ------------------------------------------------------------------------------------------------- byte limit


def test_a_file_over_the_byte_limit_is_refused_before_it_is_parsed():
    png = _encode(Image.new("RGB", (8, 8), (9, 9, 9)), "PNG")
    assert decode_rgb(png, max_bytes=len(png)).shape == (8, 8, 3)
    with pytest.raises(ImageDecodeError, match=f"^file too large: {len(png)} bytes > max_bytes={len(png) - 1}$"):
        decode_rgb(png, max_bytes=len(png) - 1)
    with pytest.raises(ImageDecodeError, match="file too large"):  # not parsed: junk of that size says the same
        decode_rgb(b"\x00" * 1025, max_bytes=1024)


# ------------------------------------------------------------------------------------------------- time limit


@pytest.fixture(scope="module")
def slow_png() -> tuple[bytes, np.ndarray]:
    """A valid 3.5 MB PNG that is slow to decode for its size: its pixel stream is cut into 1-byte IDAT chunks."""
    pixels = np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    return _png_rgb(pixels, idat_size=1), pixels


def test_a_slow_decode_gives_up_at_the_time_limit(slow_png):
    data, pixels = slow_png
    start = time.perf_counter()
    assert np.array_equal(decode_rgb(data), pixels)  # the default limit lets it finish
    full = time.perf_counter() - start

    limit = full / 20
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=f"^decode time limit: gave up after max_seconds={limit:g}$"):
        decode_rgb(data, max_seconds=limit)
    assert time.perf_counter() - start < full / 2  # it stopped near the limit, not after decoding everything


# ------------------------------------------------------------------------------------------------- bit depth


def _grey16_png(values: np.ndarray) -> bytes:
    img = Image.fromarray(values.astype(np.uint16))
    assert img.mode == "I;16"
    return _encode(img, "PNG")


@pytest.mark.parametrize("bits", [10, 12, 16])
def test_deep_grey_is_scaled_by_the_range_it_uses(bits):
    top = (1 << bits) - 1
    values = np.linspace(0, top, 64).round().astype(np.uint16).reshape(4, 16)
    grey = decode_rgb(_grey16_png(values))

    assert grey.shape == (4, 16, 3) and (grey[..., 0] == grey[..., 2]).all()
    assert grey[..., 0].min() == 0 and grey[..., 0].max() == 255  # white stays white, whatever the container
    assert np.array_equal(grey[..., 0], values >> (bits - 8))
    assert abs(int(grey[..., 0].flat[32]) - 255 * int(values.flat[32]) / top) <= 1


def test_sixteen_bit_grey_that_fits_in_eight_bits_keeps_its_values():
    values = np.arange(0, 256, 4, dtype=np.uint16).reshape(4, 16)
    assert np.array_equal(decode_rgb(_grey16_png(values))[..., 1], values)
