"""The decode stage: manifest rows -> fixed-size RGB uint8 crops, one output row per input row, never an exception.

Each batch re-reads its files through ``pipelines.storage`` (one filesystem per batch, rebuilt from the plain storage
dict the driver ships; S3 objects fetched a few at a time ahead of the decoder), decodes them with
``mpft_core.imageio.decode_rgb`` and cuts the model view with ``mpft_core.transforms``: tile small images up to the
input size, then the centre crop (evaluation, scoring) or, in training, a random window + flip that the training
loop crops anew every epoch (``mpft_core.transforms.train_window``). Nothing is ever resized (docs/METHOD.md).

A file that cannot be read or decoded becomes a row with an ``error`` message, zero pixels and width = height = -1;
it never fails the task or the job. Only one batch of files is held at a time: bytes and the full-size decode of a
file are released as soon as its crop is taken. Each file is held to ``decode_rgb``'s limits (formats, bytes, pixels,
decode time); the crop tiles only the window it returns, so an image of extreme shape (50,000,000 x 2) costs no more
than its decode.

Output columns (``DECODED_COLUMNS``; ``decoded_schema`` gives the exact Arrow types, identical for every block):
    path str | label int8, null = unlabelled | subset str | split str (nullable) | image uint8 [S, S, 3]
    | error str, null when decoded | width, height int32: upright size of the original, -1 on error
    | view_height, view_width int32: the picture's extent in ``image`` from the top-left (S, S except for training
      windows of pictures smaller than the window, which are zero-padded rather than tiled), -1 on error
    | content_hash str: SHA-256 of the bytes read (``pipelines.score_store.content_hash``), null when unreadable;
      taken here, from the very bytes that were decoded, so a stored score always belongs to its hash
The label stays nullable (as in the manifest) instead of using a sentinel such as -1: a sentinel would silently
become a class if a consumer forgot to filter it, a null cannot. Training drops error and unlabelled rows anyway.

Training randomness: the window of a file is drawn from ``numpy.random.default_rng([seed, hash(path)])``, so a
given seed gives the same windows on any worker, in any order, on any re-run; another seed gives other windows.
The training job asks for windows a little larger than the model input (``AugmentConfig.crop_jitter``), which the
training loop crops anew every epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np
import pyarrow as pa
from ray.data.extensions import ArrowTensorArray, ArrowTensorTypeV2

from mpft_core.imageio import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SECONDS,
    ImageDecodeError,
    decode_rgb,
)
from mpft_core.scoring import describe_failure
from mpft_core.transforms import eval_view, train_window
from pipelines.score_store import content_hash
from pipelines.storage import BytesReader, TooLarge

DECODED_COLUMNS = ("path", "label", "subset", "split", "image", "error", "width", "height", "view_height",
                   "view_width", "content_hash")
_MANIFEST_COLUMNS = ("path", "label", "subset", "split")


def decoded_schema(side: int) -> pa.Schema:
    """Arrow types of decoded rows whose ``image`` is ``side`` x ``side``."""
    return pa.schema([
        ("path", pa.string()), ("label", pa.int8()), ("subset", pa.string()), ("split", pa.string()),
        ("image", ArrowTensorTypeV2((side, side, 3), pa.uint8())),
        ("error", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("view_height", pa.int32()), ("view_width", pa.int32()), ("content_hash", pa.string()),
    ])  # fmt: skip


def path_seed(path: str) -> int:
    """A stable 64-bit number per path (Python's hash() is salted per process, so workers would disagree)."""
    return int.from_bytes(hashlib.blake2b(path.encode("utf-8"), digest_size=8).digest(), "little")


def crop_view(pixels: np.ndarray, image_size: int, *, train: bool, seed: int, path: str,
              window: Optional[int] = None) -> tuple[np.ndarray, int, int]:
    """(view, picture height, picture width): the centre crop, or in training the random window of
    ``mpft_core.transforms.train_window`` (``window`` defaults to ``image_size``: one fixed crop)."""
    if train:
        rng = np.random.default_rng([seed, path_seed(path)])
        return train_window(pixels, image_size, window or image_size, rng)
    return eval_view(pixels, image_size), image_size, image_size


def describe_error(err: BaseException) -> str:
    """The kernel's text for a file that cannot be scored; a failure outside decoding is a read failure."""
    if isinstance(err, TooLarge):  # the reader's own limit, already worded for people
        return str(err)
    text = describe_failure(err)
    return text if isinstance(err, ImageDecodeError) else f"cannot read file: {text}"


Degrade = Optional[Callable[[np.ndarray], np.ndarray]]


def decode_batch(batch: dict[str, np.ndarray], *, image_size: int, train: bool, max_pixels: int = DEFAULT_MAX_PIXELS,
                 storage: dict, seed: int = 0, window: Optional[int] = None,
                 degrade: Optional[Sequence[Degrade]] = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_seconds: float = DEFAULT_MAX_SECONDS) -> dict[str, np.ndarray]:
    """Decode one batch of manifest rows; returns numpy columns ``DECODED_COLUMNS``. Never raises per file.

    ``image`` is ``image_size`` a side, or with ``train`` ``window`` (default ``image_size``): the random window the
    training loop crops ``image_size`` from every epoch, its picture in the top-left ``view_height`` x
    ``view_width`` pixels (``image_size`` both when not training).
    ``degrade[i]``, when given and not None, transforms row ``i``'s whole decoded image before the crop (the
    evaluation's JPEG / blur / downscale copies); width and height stay the original file's.
    ``label`` is passed through as it came (int8, or float with NaN where Ray had nulls); ``decode_batch_arrow``
    gives the exact Arrow types.
    ``max_pixels``, ``max_bytes`` and ``max_seconds`` are ``decode_rgb``'s per-file limits: a file over one is an
    error row. The byte limit stops the read itself one byte past it (``/dev/zero`` in a manifest reads 256 MiB, not
    forever).
    """
    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    side = (window or image_size) if train else image_size
    degrade = [None] * n if degrade is None else list(degrade)
    images = np.zeros((n, side, side, 3), dtype=np.uint8)
    sizes = {name: np.full(n, -1, dtype=np.int32) for name in ("width", "height", "view_height", "view_width")}
    errors = np.full(n, None, dtype=object)
    hashes = np.full(n, None, dtype=object)
    reads = BytesReader(storage, max_bytes=max_bytes).read_each(paths)
    for i, (path, (data, read_error)) in enumerate(zip(paths, reads, strict=True)):
        try:
            if read_error is not None:
                raise read_error
            hashes[i] = content_hash(data)
            pixels = decode_rgb(data, max_pixels=max_pixels, max_bytes=max_bytes, max_seconds=max_seconds)
            sizes["height"][i], sizes["width"][i] = pixels.shape[:2]
            if degrade[i] is not None:
                pixels = degrade[i](pixels)
            images[i], sizes["view_height"][i], sizes["view_width"][i] = crop_view(
                pixels, image_size, train=train, seed=seed, path=path, window=side)
        except Exception as err:  # one bad file must never cost the batch
            errors[i] = describe_error(err)
            sizes["width"][i] = sizes["height"][i] = -1
        finally:
            pixels = None  # release the full-size decode before the next file
    out = {name: batch[name] for name in _MANIFEST_COLUMNS if name in batch}
    out.update(image=images, error=errors, **sizes, content_hash=hashes)
    return out


def decode_batch_arrow(batch: dict[str, np.ndarray], **kwargs) -> pa.Table:
    """``decode_batch`` as an Arrow table with ``decoded_schema``."""
    return decoded_table(decode_batch(batch, **kwargs))


def decoded_table(out: dict[str, np.ndarray]) -> pa.Table:
    """Decoded numpy columns as an Arrow table with ``decoded_schema``: the same column types in every block, whether
    a block happens to hold nulls (label, split, error) or not."""
    schema = decoded_schema(out["image"].shape[1])
    columns = []
    for field in schema:
        if field.name == "image":
            columns.append(ArrowTensorArray.from_numpy(out["image"]))
        else:
            # from_pandas=True: NaN (how Ray hands a nullable int column to numpy) becomes null again.
            columns.append(pa.array(out[field.name], from_pandas=True).cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)
