"""Image corpora in object storage -> Ray Datasets of decoded, fixed-size uint8 crops.

    from pipelines.ingest import for_training, read_images
    from pipelines.sources import SourceConfig, build_manifest, manifest_hash
    from pipelines.storage import StorageConfig

    cfg = StorageConfig(endpoint_url="http://127.0.0.1:9000")        # or nothing: the AWS_* variables are used
    manifest = build_manifest(SourceConfig(uri="s3://corpora/genimage", layout="genimage", split="train"), cfg)
    print(manifest.num_rows, "images, dataset version", manifest_hash(manifest))
    ds = read_images(manifest, cfg, image_size=224, train=True, seed=0)   # one row per file, errors included
    for batch in for_training(ds).iter_torch_batches(batch_size=32):   # decoded + labelled; image and label
        images, labels = batch["image"], batch["label"]               # uint8 [32, 224, 224, 3], int8 [32]

Shape of the graph: the manifest (small: paths and labels) is cut into blocks of ``rows_per_block`` rows on the
driver; one Ray task per block reads those files' bytes through ``pipelines.storage`` and decodes them
(``pipelines.decode``). Reading inside the decode task, rather than with ``read_binary_files``, means a missing or
unreadable object becomes an error row like a corrupt one instead of failing the job, and a task holds at most one
block of files. The output has one row per manifest row (``pipelines.decode.DECODED_COLUMNS``); ``drop_errors``
removes the rows that did not decode, ``for_training`` also the unlabelled ones and every column but
``TRAINING_COLUMNS`` (``iter_torch_batches`` cannot turn strings into tensors).

The storage settings travel to the tasks as a plain dict with the keys revealed (workers on other nodes lack the
driver's environment); they are never logged or written to the output.
"""

from __future__ import annotations

import pyarrow as pa
import ray.data
from ray.data.expressions import col

from mpft_core.imageio import DEFAULT_MAX_PIXELS
from pipelines.decode import decode_batch_arrow
from pipelines.sources import MANIFEST_SCHEMA
from pipelines.storage import StorageConfig, for_workers


def manifest_blocks(manifest: pa.Table, rows_per_block: int, extra_columns: tuple[str, ...] = ()) -> list[pa.Table]:
    """The manifest (its standard columns, plus ``extra_columns`` as they are) as consecutive slices of
    ``rows_per_block`` rows (the last may be shorter)."""
    if rows_per_block < 1:
        raise ValueError("rows_per_block must be >= 1")
    table = manifest.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    for name in extra_columns:
        table = table.append_column(manifest.schema.field(name), manifest.column(name))
    table = table.combine_chunks()
    return [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]


def read_images(manifest: pa.Table, storage_cfg: StorageConfig | None, *, image_size: int, train: bool,
                max_pixels: int = DEFAULT_MAX_PIXELS, rows_per_block: int = 64, seed: int = 0,
                window: int | None = None, num_cpus: float = 0.5) -> ray.data.Dataset:
    """A lazy Ray Dataset with one decoded row per manifest row (columns ``DECODED_COLUMNS``).

    ``train`` selects a random window of ``window`` pixels a side (default ``image_size``) + horizontal flip, seeded
    by ``seed`` and the path, instead of the centre crop; the training loop crops ``image_size`` from it every epoch.
    Rows whose file could not be read or decoded carry an ``error`` and zero pixels; see ``drop_errors``.
    """
    if manifest.num_rows == 0:
        raise ValueError("the manifest is empty")
    storage = for_workers(storage_cfg)
    ds = ray.data.from_arrow(manifest_blocks(manifest, rows_per_block))
    return ds.map_batches(
        decode_batch_arrow,
        fn_kwargs={"image_size": image_size, "train": train, "max_pixels": max_pixels, "storage": storage,
                   "seed": seed, "window": window},
        batch_format="numpy",
        batch_size=rows_per_block,
        num_cpus=num_cpus,
    )


# What a training step reads: pixels, label, and the picture's extent inside the (possibly padded) window.
TRAINING_COLUMNS = ["image", "label", "view_height", "view_width"]


def drop_errors(ds: ray.data.Dataset) -> ray.data.Dataset:
    """Only the rows that decoded (``error`` is null).

    A native predicate, evaluated with Arrow compute per block. (Ray 2.60's string form ``expr="error IS NULL"`` is
    rejected: string expressions are Python syntax there, and ``is`` comparisons are unsupported.)
    """
    return ds.filter(expr=col("error").is_null())


def for_training(ds: ray.data.Dataset) -> ray.data.Dataset:
    """Decoded, labelled rows with only ``image``, ``label`` and the picture's extent in the image (``view_height``,
    ``view_width``): what ``iter_torch_batches`` can turn into tensors (it raises on string columns such as
    ``path``, and a null label has no tensor value)."""
    return drop_errors(ds).filter(expr=col("label").is_not_null()).select_columns(TRAINING_COLUMNS)
