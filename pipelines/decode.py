"""The decode stage: manifest rows -> fixed-size RGB uint8 crops, one output row per input row, never an exception.

Each batch re-reads its files through ``pipelines.storage`` (one filesystem per batch, rebuilt from the plain storage
dict the driver ships; S3 objects fetched a few at a time ahead of the decoder), decodes them with
``mpft_core.imageio.decode_rgb`` and cuts the model view with ``mpft_core.transforms``: tile small images up to the
input size, then a random crop + flip (training) or the centre crop (evaluation, scoring). Nothing is ever resized
(METHOD.md).

A file that cannot be read or decoded becomes a row with an ``error`` message, zero pixels and width = height = -1;
it never fails the task or the job. Only one batch of files is held at a time: bytes and the full-size decode of a
file are released as soon as its crop is taken.

Output columns (``DECODED_COLUMNS``; ``decoded_schema`` gives the exact Arrow types, identical for every block):
    path str | label int8, null = unlabelled | subset str | split str (nullable) | image uint8 [S, S, 3]
    | error str, null when decoded | width, height int32: upright size of the original, -1 on error
The label stays nullable (as in the manifest) instead of using a sentinel such as -1: a sentinel would silently
become a class if a consumer forgot to filter it, a null cannot. Training drops error and unlabelled rows anyway.

Training randomness: the crop of a file is drawn from ``numpy.random.default_rng([seed, hash(path)])``, so a given
seed gives the same crops on any worker, in any order, on any re-run; another seed gives other crops. The training
job decodes windows a little larger than the model input and the training loop crops those anew every epoch
(``AugmentConfig.crop_jitter``).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
from ray.data.extensions import ArrowTensorArray, ArrowTensorTypeV2

from mpft_core.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_rgb
from mpft_core.transforms import eval_view, train_view
from pipelines.storage import BytesReader

DECODED_COLUMNS = ("path", "label", "subset", "split", "image", "error", "width", "height")
_MANIFEST_COLUMNS = ("path", "label", "subset", "split")


def decoded_schema(image_size: int) -> pa.Schema:
    return pa.schema([
        ("path", pa.string()), ("label", pa.int8()), ("subset", pa.string()), ("split", pa.string()),
        ("image", ArrowTensorTypeV2((image_size, image_size, 3), pa.uint8())),
        ("error", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ])  # fmt: skip


def path_seed(path: str) -> int:
    """A stable 64-bit number per path (Python's hash() is salted per process, so workers would disagree)."""
    return int.from_bytes(hashlib.blake2b(path.encode("utf-8"), digest_size=8).digest(), "little")


def crop_view(pixels: np.ndarray, image_size: int, *, train: bool, seed: int, path: str) -> np.ndarray:
    if train:
        return train_view(pixels, image_size, np.random.default_rng([seed, path_seed(path)]))
    return eval_view(pixels, image_size)


def describe_error(err: BaseException) -> str:
    # ImageDecodeError messages are already written for people; other errors (read failures) get their type.
    if isinstance(err, ImageDecodeError):
        return str(err)
    return f"cannot read file: {type(err).__name__}: {err}"


Degrade = Optional[Callable[[np.ndarray], np.ndarray]]


def _decode_one(data: bytes, path: str, image_size: int, train: bool, max_pixels: int, seed: int,
                degrade: Degrade) -> tuple[np.ndarray, int, int]:
    """(crop, width, height) of one file; its full-size pixels are freed when this returns."""
    pixels = decode_rgb(data, max_pixels=max_pixels)
    height, width = pixels.shape[:2]
    if degrade is not None:
        pixels = degrade(pixels)
    return crop_view(pixels, image_size, train=train, seed=seed, path=path), width, height


def decode_batch(batch: dict[str, np.ndarray], *, image_size: int, train: bool, max_pixels: int = DEFAULT_MAX_PIXELS,
                 storage: dict, seed: int = 0, degrade: Optional[Sequence[Degrade]] = None) -> dict[str, np.ndarray]:
    """Decode one batch of manifest rows; returns numpy columns ``DECODED_COLUMNS``. Never raises per file.

    ``degrade[i]``, when given and not None, transforms row ``i``'s whole decoded image before the crop (the
    evaluation's JPEG / blur / downscale copies); width and height stay the original file's.
    ``label`` is passed through as it came (int8, or float with NaN where Ray had nulls); ``decode_batch_arrow``
    gives the exact Arrow types.
    """
    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    degrade = [None] * n if degrade is None else list(degrade)
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    widths = np.full(n, -1, dtype=np.int32)
    heights = np.full(n, -1, dtype=np.int32)
    errors = np.full(n, None, dtype=object)
    for i, (path, (data, read_error)) in enumerate(zip(paths, BytesReader(storage).read_each(paths))):
        try:
            if read_error is not None:
                raise read_error
            images[i], widths[i], heights[i] = _decode_one(data, path, image_size, train, max_pixels, seed,
                                                           degrade[i])
        except Exception as err:  # one bad file must never cost the batch
            errors[i] = describe_error(err)
    out = {name: batch[name] for name in _MANIFEST_COLUMNS if name in batch}
    out.update(image=images, error=errors, width=widths, height=heights)
    return out


def decode_batch_arrow(batch: dict[str, np.ndarray], *, image_size: int, **kwargs) -> pa.Table:
    """``decode_batch`` as an Arrow table with ``decoded_schema``."""
    return decoded_table(decode_batch(batch, image_size=image_size, **kwargs), image_size)


def decoded_table(out: dict[str, np.ndarray], image_size: int) -> pa.Table:
    """Decoded numpy columns as an Arrow table with ``decoded_schema``: the same column types in every block, whether
    a block happens to hold nulls (label, split, error) or not."""
    schema = decoded_schema(image_size)
    columns = []
    for field in schema:
        if field.name == "image":
            columns.append(ArrowTensorArray.from_numpy(out["image"]))
        else:
            # from_pandas=True: NaN (how Ray hands a nullable int column to numpy) becomes null again.
            columns.append(pa.array(out[field.name], from_pandas=True).cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)
