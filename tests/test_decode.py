"""mpft_core/imageio.py and pipelines/decode.py without Ray: what each awkward file decodes to, and the crops."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from mpft_core.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_rgb
from pipelines.decode import DECODED_COLUMNS, decode_batch, decode_batch_arrow, decoded_schema
from tests.helpers.images import (
    BAD_CORPUS_FAILURES,
    BAD_CORPUS_MAX_PIXELS,
    BAD_CORPUS_SIZES,
    real_photo_crops,
    write_bad_corpus,
)

FAILURE_REASONS = {
    "truncated.jpg": "truncated",
    "zero_bytes.jpg": "empty file",
    "text_as.jpg": "not a recognised image format",
    "over_limit.png": "exceeds pixel limit",
    "corrupt_header.png": "not a recognised image format",
}


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return root, write_bad_corpus(root)


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------- decode_rgb


def test_every_decodable_file_gives_upright_rgb_uint8_of_its_size(bad_corpus):
    root, expected = bad_corpus
    for name in (n for n, ok in expected.items() if ok):
        pixels = decode_rgb((root / name).read_bytes(), max_pixels=BAD_CORPUS_MAX_PIXELS)
        width, height = BAD_CORPUS_SIZES[name]
        assert pixels.shape == (height, width, 3) and pixels.dtype == np.uint8, name


def test_every_undecodable_file_raises_a_clear_reason(bad_corpus):
    root, expected = bad_corpus
    assert sorted(n for n, ok in expected.items() if not ok) == sorted(BAD_CORPUS_FAILURES)
    for name in BAD_CORPUS_FAILURES:
        with pytest.raises(ImageDecodeError, match=FAILURE_REASONS[name]):
            decode_rgb((root / name).read_bytes(), max_pixels=BAD_CORPUS_MAX_PIXELS)


def test_pixel_limit_is_configurable(bad_corpus):
    root, _ = bad_corpus
    assert decode_rgb((root / "over_limit.png").read_bytes(), max_pixels=90_000).shape == (300, 300, 3)
    with pytest.raises(ImageDecodeError, match="90000 pixels > max_pixels=89999"):
        decode_rgb((root / "over_limit.png").read_bytes(), max_pixels=89_999)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, followed by a few bytes of pixel data (a bomb's cheap shell)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height", [(20_000, 10_000), (100_000, 100_000)])
def test_decompression_bomb_is_refused_from_the_header_before_decoding(width, height):
    # Both exceed the default limit: the first only ours (200 M > 179 M pixels), the second Pillow's own guard too.
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="exceeds pixel limit"):
        decode_rgb(_png_claiming(width, height), max_pixels=DEFAULT_MAX_PIXELS)
    assert time.perf_counter() - start < 1.0  # nothing was allocated or decoded


def test_exif_orientation_is_applied():
    stored = np.zeros((10, 20, 3), np.uint8)  # 20 wide x 10 high: left half red, right half blue
    stored[:, :10] = (255, 0, 0)
    stored[:, 10:] = (0, 0, 255)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # display = rotate 90° clockwise: the left half ends up on top
    pixels = decode_rgb(_encode(img, "JPEG", exif=exif, quality=95))

    assert pixels.shape == (20, 10, 3)
    top, bottom = pixels[:8].reshape(-1, 3).mean(0), pixels[12:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60, top  # red
    assert bottom[2] > 200 and bottom[0] < 60, bottom  # blue


def test_transparency_is_composited_on_white(bad_corpus):
    root, _ = bad_corpus
    pixels = decode_rgb((root / "rgba.png").read_bytes())  # left half opaque red, right half transparent black
    assert (pixels[:, :6] == (255, 0, 0)).all()
    assert (pixels[:, 6:] == 255).all()


def test_sixteen_bit_samples_keep_their_high_byte(bad_corpus):
    root, _ = bad_corpus
    assert (decode_rgb((root / "rgb16.png").read_bytes()) == (255, 128, 0)).all()
    grey = decode_rgb((root / "gray16.png").read_bytes())  # values 0, 500, 1000, ..., 63500 (not clipped at 255)
    assert grey[-1, -1, 0] == 63_500 >> 8 and (grey[..., 0] == grey[..., 2]).all()


def test_cmyk_palette_and_animation_become_the_colours_a_viewer_shows(bad_corpus):
    root, _ = bad_corpus
    cmyk = decode_rgb((root / "cmyk.jpg").read_bytes())  # C=0 M=255 Y=255 K=0 is red
    assert np.abs(cmyk.astype(int) - (255, 0, 0)).max() < 8
    assert (decode_rgb((root / "animated.gif").read_bytes()) == (255, 0, 0)).all()  # first of red/green/blue frames
    palette_img = Image.open(root / "palette.png")
    assert (decode_rgb((root / "palette.png").read_bytes()) == np.asarray(palette_img.convert("RGB"))).all()


# --------------------------------------------------------------------------------------------------- decode_batch


def _batch(paths: list[str], labels=None) -> dict[str, np.ndarray]:
    n = len(paths)
    return {"path": np.array(paths, dtype=object),
            "label": np.array(labels if labels is not None else [1] * n, dtype=np.int8),
            "subset": np.array(["s"] * n, dtype=object), "split": np.array([None] * n, dtype=object)}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    paths = []
    for i, crop in enumerate(real_photo_crops(4, 48, seed=3)):
        Image.fromarray(crop).save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    return paths


def test_decode_batch_turns_every_failure_into_an_error_row(bad_corpus, tmp_path):
    root, expected = bad_corpus
    paths = [str(root / n) for n in sorted(expected)] + [str(tmp_path / "missing.jpg")]

    out = decode_batch(_batch(paths), image_size=16, train=False, max_pixels=BAD_CORPUS_MAX_PIXELS, storage={})

    assert list(out) == list(DECODED_COLUMNS)
    assert out["image"].shape == (len(paths), 16, 16, 3) and out["image"].dtype == np.uint8
    for i, path in enumerate(paths):
        name = path.rsplit("/", 1)[1]
        if expected.get(name):
            assert out["error"][i] is None, (name, out["error"][i])
            assert (out["width"][i], out["height"][i]) == BAD_CORPUS_SIZES[name]
        else:
            assert out["error"][i], name
            assert not out["image"][i].any() and out["width"][i] == out["height"][i] == -1
    assert "cannot read file: FileNotFoundError" in out["error"][-1]
    assert out["image"][paths.index(str(root / "one_pixel.png"))].reshape(-1, 3).tolist() == [[1, 2, 3]] * 256


def test_eval_view_is_the_deterministic_centre_crop(photos):
    first = decode_batch(_batch(photos), image_size=32, train=False, storage={})
    second = decode_batch(_batch(photos), image_size=32, train=False, storage={}, seed=99)

    assert np.array_equal(first["image"], second["image"])
    full = decode_rgb(open(photos[0], "rb").read())
    assert np.array_equal(first["image"][0], full[8:40, 8:40])  # 48 px image, 32 px centre crop


def test_train_view_is_reproducible_per_seed_and_varies_across_seeds(photos):
    seed0 = decode_batch(_batch(photos), image_size=32, train=True, storage={}, seed=0)
    seed0_again = decode_batch(_batch(photos[::-1]), image_size=32, train=True, storage={}, seed=0)
    seed1 = decode_batch(_batch(photos), image_size=32, train=True, storage={}, seed=1)

    assert np.array_equal(seed0["image"], seed0_again["image"][::-1])  # same crop whatever the batch order
    assert any(not np.array_equal(a, b) for a, b in zip(seed0["image"], seed1["image"], strict=True))
    eval_crops = decode_batch(_batch(photos), image_size=32, train=False, storage={})["image"]
    assert any(not np.array_equal(a, b) for a, b in zip(seed0["image"], eval_crops, strict=True))


def _is_crop_of(crop: np.ndarray, picture: np.ndarray) -> bool:
    """Is ``crop`` a region of ``picture`` or of its mirror image?"""
    h, w = crop.shape[:2]
    return any(np.array_equal(crop, view[t:t + h, x:x + w]) for view in (picture, picture[:, ::-1])
               for t in range(picture.shape[0] - h + 1) for x in range(picture.shape[1] - w + 1))


def _epoch_crops(decoded: dict, size: int, epoch: int) -> np.ndarray:
    import torch

    from mpft_core.transforms import crop_generator, random_crops

    return random_crops(torch.from_numpy(decoded["image"]), size, crop_generator(seed=0, epoch=epoch, rank=0),
                        heights=decoded["view_height"], widths=decoded["view_width"]).numpy()


def test_each_epoch_cuts_new_crops_of_the_decoded_windows_and_a_rerun_repeats_them(photos):
    from mpft_core.config import AugmentConfig

    window = AugmentConfig(crop_jitter=0.25).window(32)
    decoded = decode_batch(_batch(photos), image_size=32, window=window, train=True, storage={})

    first, second, first_again = (_epoch_crops(decoded, 32, e) for e in (0, 1, 0))
    assert window == 40 and decoded["image"].shape[1:] == (40, 40, 3) and first.shape == (len(photos), 32, 32, 3)
    assert list(decoded["view_height"]) == list(decoded["view_width"]) == [40] * len(photos)  # 48 px photos
    windows = np.concatenate([decoded["image"]] * 2)
    assert all(_is_crop_of(c, w) for c, w in zip(np.concatenate([first, second]), windows, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))  # augmentation varies per epoch
    assert np.array_equal(first, first_again)  # a restarted epoch sees the same crops


def test_a_picture_smaller_than_the_window_is_padded_and_cropped_only_where_it_is(tmp_path):
    pixels = real_photo_crops(1, 48, seed=5)[0][:36, :44]  # between the 32 px input and the 48 px window
    Image.fromarray(pixels).save(tmp_path / "small.png")
    decoded = decode_batch(_batch([str(tmp_path / "small.png")]), image_size=32, window=48, train=True, storage={})

    assert (decoded["view_height"][0], decoded["view_width"][0]) == (36, 44)
    picture = decoded["image"][0][:36, :44]
    assert _is_crop_of(picture, pixels) and not decoded["image"][0][36:].any()  # whole, not tiled
    for epoch in range(8):
        assert _is_crop_of(_epoch_crops(decoded, 32, epoch)[0], picture)
    with pytest.raises(ValueError, match="cannot crop"):
        _epoch_crops(decoded, 37, 0)


def test_small_images_are_tiled_not_resized(bad_corpus):
    root, _ = bad_corpus
    out = decode_batch(_batch([str(root / "very_wide.png")]), image_size=16, train=False, storage={})
    full = decode_rgb((root / "very_wide.png").read_bytes())  # 4000 x 3: rows repeat every 3 pixels
    crop = out["image"][0]
    assert np.array_equal(crop[0], crop[3]) and np.array_equal(crop[1], crop[4])
    left = (4000 - 16) // 2
    assert any(np.array_equal(crop[0], full[r, left:left + 16]) for r in range(3))


@pytest.fixture(scope="module")
def extreme_pngs(tmp_path_factory) -> dict[tuple[int, int], str]:
    """Constant-colour RGB PNGs 2,000,000 x 2 and 2 x 2,000,000 (12 MB decoded, a few kB as files)."""
    root = tmp_path_factory.mktemp("extreme")
    paths = {}
    for width, height in ((2_000_000, 2), (2, 2_000_000)):
        path = root / f"{width}x{height}.png"
        Image.new("RGB", (width, height), (10, 200, 30)).save(path)
        paths[(width, height)] = str(path)
    return paths


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("size", [(2_000_000, 2), (2, 2_000_000)], ids=["wide", "tall"])
def test_an_extreme_aspect_ratio_gives_a_correct_crop_in_bounded_memory(extreme_pngs, size, train):
    # Tiling the whole 2 px side up to 224 before cropping would ask numpy for 1.3 GB (a 50,000,000 x 2 file: 34 GB).
    tracemalloc.start()
    try:
        out = decode_batch(_batch([extreme_pngs[size]]), image_size=224, train=train, window=256, storage={})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert out["error"][0] is None and (out["width"][0], out["height"][0]) == size
    view = out["image"][0][: out["view_height"][0], : out["view_width"][0]]
    assert min(view.shape[:2]) >= 224 and (view == (10, 200, 30)).all()
    decoded_bytes = size[0] * size[1] * 3
    assert peak < 2 * decoded_bytes + 4 * 256 * 256 * 3, peak  # numpy's share: the decoded image and a few windows


def test_hostile_files_become_error_rows_that_name_the_problem(photos, tmp_path):
    eps = tmp_path / "drawing.jpg"  # a PostScript file with an image's name: Pillow would run Ghostscript on it
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    photo = open(photos[0], "rb").read()
    too_big = tmp_path / "padded.png"  # the same photo with a byte of trailing junk: one byte over the limit
    too_big.write_bytes(photo + b"\x00")
    paths = [photos[0], str(eps), str(too_big)]

    out = decode_batch(_batch(paths), image_size=16, train=False, storage={}, max_bytes=len(photo))

    assert len(out["error"]) == 3
    assert out["error"][1].startswith("unsupported format EPS")
    assert out["error"][2] == f"file too large: more than max_bytes={len(photo)} bytes"
    assert out["error"][0] is None and out["width"][0] == 48
    assert (out["width"][1:] == -1).all() and not out["image"][1:].any()


def test_decode_time_limit_reaches_every_file(photos):
    out = decode_batch(_batch(photos[:2]), image_size=16, train=False, storage={}, max_seconds=0.0)
    assert all(err.startswith("decode time limit") for err in out["error"])


def test_arrow_output_has_the_same_schema_whatever_the_batch_holds(photos, tmp_path):
    labelled_ok = decode_batch_arrow(_batch(photos[:2]), image_size=16, train=False, storage={})
    ray_style_nulls = _batch([photos[0], str(tmp_path / "gone.png")])
    ray_style_nulls["label"] = np.array([np.nan, 1.0])  # how Ray hands a nullable int8 column to numpy
    unlabelled_with_error = decode_batch_arrow(ray_style_nulls, image_size=16, train=False, storage={})

    assert labelled_ok.schema == unlabelled_with_error.schema == decoded_schema(16)
    assert unlabelled_with_error["label"].to_pylist() == [None, 1]
    assert unlabelled_with_error["error"].null_count == 1
    assert labelled_ok["image"].type.shape == (16, 16, 3)
    assert isinstance(labelled_ok, pa.Table)
