"""A crawl-like corpus through `mpft score`: every non-hidden object is an input, with a score or an error, once.

A crawl names its objects by content hash, without extensions, and mixes in text, truncated and empty files and
the hidden files of the tools that fetched it. Everything runs on the real stack: files on disk, a private Ray.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import scoring
from pipelines.decode import decode_batch
from pipelines.sources import SourceConfig, build_manifest
from tests.helpers.images import fake_images, real_photo_crops
from tests.helpers.models import tiny_checkpoint

SMALL_JOB = ["--batch-size", "8", "--rows-per-block", "8", "--num-actors", "1", "--actor-cpus", "0.5",
             "--decode-cpus", "0.25"]


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header announcing ``width`` x ``height`` pixels with almost no data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


def _deep_grey_png() -> bytes:
    """12-bit values in a 16-bit greyscale PNG, as scanners and medical cameras write them."""
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    return buf.getvalue()


def _crawl_files() -> tuple[dict[str, bytes], set[str]]:
    """({relative path: bytes}, the relative paths that hold an image and must be scored)."""
    real, fake = real_photo_crops(4, 40, seed=3), fake_images(4, 40, seed=3)
    jpeg = _encoded(real[3], "JPEG")
    images = {
        "photo.png": _encoded(real[0], "PNG"),
        "photo.JPG": _encoded(real[1], "JPEG"),
        "photo.webp": _encoded(real[2], "WEBP"),
        "3f9a0c7e1d2b": _encoded(fake[0], "PNG"),             # content-addressed keys: no extension
        "ab/cd/abcd0123": _encoded(fake[1], "JPEG"),
        "ab/ef/ef456789": _encoded(fake[2], "WEBP"),
        "wide-strip.png": _encoded(np.full((2, 2_000_000, 3), 90, dtype=np.uint8), "PNG"),  # tiled in its window only
        "7d1e22aa90f1": _deep_grey_png(),
    }
    broken = {
        "0badc0de": b"<html><body>403 Forbidden</body></html>\n",  # an error page saved under a hash
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "e3b0c44298fc": b"",                                      # sha256 of nothing: an empty object
        "bomb.png": _png_declaring(40_000, 40_000),              # over max_pixels: refused before decoding
        "poster.jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",  # EPS: not on the allow-list
    }
    hidden = {
        ".hidden.png": _encoded(fake[3], "PNG"),
        "._photo.png": b"macOS resource fork",
        ".cache/seen.png": _encoded(real[0], "PNG"),
        "ab/.tmp/partial": jpeg,
    }
    return {**images, **broken, **hidden}, set(images)


def _visible(rel: str) -> bool:
    return not any(part.startswith(".") for part in rel.split("/"))


@pytest.fixture(scope="module")
def crawl(tmp_path_factory) -> tuple[Path, dict[str, bool]]:
    """The corpus on disk, and {absolute path of each non-hidden file: holds an image}."""
    root = tmp_path_factory.mktemp("crawl")
    files, images = _crawl_files()
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root, {str(root / rel): rel in images for rel in files if _visible(rel)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", threshold=0.5, seed=0)


def score_cli(argv: list[str]) -> int:
    """`mpft score ...` as a user runs it."""
    from jobs import cli

    return cli.main(["score", *argv])


def _no_ray(monkeypatch) -> None:
    import ray

    from pipelines import runtime

    def refuse(*args, **kwargs):
        raise AssertionError("this path must not start or join Ray")

    monkeypatch.setattr(runtime, "init_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def _all_rows(output: Path) -> pa.Table:
    """Every row of every part, without de-duplication: what a naive reader of the output sees."""
    return pa.concat_tables([pq.read_table(p) for p in scoring.list_part_files(str(output))])


# ------------------------------------------------------------------------------------------------ no Ray


def test_the_decoder_sniffs_content_not_names(crawl):
    root, expected = crawl
    manifest = build_manifest(SourceConfig(uri=str(root), layout="unlabelled"))
    batch = {name: np.array(manifest[name].to_pylist(), dtype=object) for name in manifest.column_names}

    decoded = decode_batch(batch, image_size=32, train=False, storage={})

    errors = dict(zip(manifest["path"].to_pylist(), decoded["error"], strict=True))
    assert set(errors) == set(expected)
    assert {path for path, error in errors.items() if error is None} == {p for p, ok in expected.items() if ok}
    assert "empty" in errors[str(root / "e3b0c44298fc")]
    assert "unsupported format EPS" in errors[str(root / "poster.jpg")]
    assert "pixel limit" in errors[str(root / "bomb.png")]


def test_the_table_lists_extensionless_files_and_narrows_to_the_given_extensions(crawl, checkpoint, capsys,
                                                                                 monkeypatch):
    root, expected = crawl
    _no_ray(monkeypatch)

    assert score_cli(["--model", str(checkpoint), "--input", str(root)]) == 0
    everything = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert score_cli(["--model", str(checkpoint), "--input", str(root), "--extensions", "png,jpg"]) == 0
    narrowed = {line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]}

    assert set(everything) == {str(Path(p).relative_to(root)) for p in expected}
    assert everything["3f9a0c7e1d2b"][2] in ("generated", "real")
    assert everything["0badc0de"][1] == "error"
    assert narrowed == {"photo.png", "photo.JPG", "truncated.jpg", "wide-strip.png", "bomb.png", "poster.jpg"}


def test_a_manifest_reaching_outside_its_folder_is_refused_before_ray_starts(crawl, checkpoint, tmp_path,
                                                                            monkeypatch):
    root, _ = crawl
    (tmp_path / "m").mkdir()
    manifest = tmp_path / "m" / "crawl.csv"
    manifest.write_text(f"path,label\n{root / 'photo.png'},\n/etc/passwd,\n../elsewhere.png,\n")
    _no_ray(monkeypatch)

    with pytest.raises(SystemExit, match=r"3 of 3 rows point outside.*row 1") as refused:
        score_cli(["--model", str(checkpoint), "--input", str(manifest), "--layout", "manifest",
                   "--output", str(tmp_path / "scores")])

    assert "allow-outside-corpus" in str(refused.value)
    assert not (tmp_path / "scores").exists()


# ------------------------------------------------------------------------------------------------ the Ray job


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_mpft_score_gives_every_crawled_object_one_row_with_a_score_or_an_error(ray_local, crawl, checkpoint,
                                                                             tmp_path, capsys):
    root, expected = crawl
    out = tmp_path / "scores"
    argv = ["--model", str(checkpoint), "--input", str(root), "--output", str(out), *SMALL_JOB]

    assert score_cli(argv) == 0
    first = _all_rows(out)
    assert score_cli(argv) == 0
    second = _all_rows(out)

    paths = second.column("path").to_pylist()
    assert sorted(paths) == sorted(expected), "one row per non-hidden file, none for hidden ones, no duplicates"
    assert second.num_rows == first.num_rows
    for row in second.to_pylist():
        if expected[row["path"]]:
            assert row["error"] is None and 0.0 <= row["score"] <= 1.0 and row["verdict"] in ("generated", "real")
        else:
            assert row["score"] is None and row["verdict"] is None and row["error"], row
    assert f'"n_skipped_already_scored": {len(expected)}' in capsys.readouterr().out
