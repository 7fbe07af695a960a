"""Image sources -> a manifest table (path, label, subset, split) and the hash that identifies that dataset version.

Layouts (``SourceConfig.layout``):
- ``genimage``: ``<uri>/<subset>/.../{train,val}/{ai,nature}/<files>``. label ai=1, nature=0; split from the folder;
  subset = the first folder under ``uri`` (the generator; intermediate folders such as GenImage's
  ``imagenet_ai_0419_sdv4`` are allowed). If ``uri`` is itself one subset's folder, the subset is its name.
  ``split`` keeps only that split.
- ``ufd`` (UniversalFakeDetect / CNNSpot): ``<uri>/<subset>/[<class>/]{0_real,1_fake}/<files>``. split stays null
  unless ``SourceConfig.split`` is given, which is then recorded on every row.
- ``manifest``: a ``.parquet`` or ``.csv`` file with columns ``path``, ``label`` and optionally ``subset`` (default:
  the manifest's file name without extension) and ``split`` (default null). Relative paths are resolved against the
  manifest's folder; ``split`` filters on the split column.
- ``unlabelled``: every image under ``uri``, label null, subset ``"unlabelled"`` (for scoring).

``subsets`` keeps only the named subsets; naming a subset that does not exist is an error (a typo must not silently
train on nothing). Files that do not fit the layout are skipped with a warning that says how many and shows one.

``manifest_hash`` identifies the listing (paths, labels, subsets, splits), independent of row order; it does not
read the image bytes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
from typing import Literal, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mpft_core.config import _Strict
from pipelines import storage
from pipelines.storage import StorageConfig

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema([("path", pa.string()), ("label", pa.int8()), ("subset", pa.string()),
                             ("split", pa.string())])
GENIMAGE_SPLITS = {"train", "val"}
GENIMAGE_CLASSES = {"ai": 1, "nature": 0}
UFD_CLASSES = {"1_fake": 1, "0_real": 0}
UNLABELLED_SUBSET = "unlabelled"
_HASH_VERSION = b"mpft-manifest-v1\n"


class SourceConfig(_Strict):
    uri: str  # prefix/folder, or a .parquet/.csv manifest file
    layout: Literal["genimage", "ufd", "manifest", "unlabelled"] = "genimage"
    split: Optional[str] = None  # genimage: "train"/"val"; manifest: filter on its split column; else recorded
    subsets: Optional[list[str]] = None  # keep only these subsets


def build_manifest(source: SourceConfig, storage_cfg: StorageConfig | None = None) -> pa.Table:
    """The manifest of ``source``, sorted by path; raises ValueError if it comes out empty."""
    if source.layout == "manifest":
        table = _read_manifest_file(source.uri, storage_cfg)
        if source.split is not None:
            table = table.filter(pc.equal(table["split"], source.split))
    else:
        files = storage.list_files(source.uri, storage_cfg)
        table = _from_listing(source, files)
    table = _keep_subsets(table, source.subsets)
    if table.num_rows == 0:
        raise ValueError(f"no images found for {source.layout} source {source.uri} (split={source.split}, "
                         f"subsets={source.subsets})")
    _check_unique_paths(table, source.uri)
    return table.sort_by("path")


# --------------------------------------------------------------------------------------------------- folder layouts


def _relative_parts(root: str, path: str) -> list[str]:
    return path[len(root.rstrip("/")) + 1:].split("/")


def _from_listing(source: SourceConfig, files: list[str]) -> pa.Table:
    root = source.uri.rstrip("/") if storage.is_remote(source.uri) else storage.resolve(source.uri)[1]
    root_name = posixpath.basename(root.rstrip("/"))
    rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    skipped: list[str] = []
    for path in files:
        row = _parse(source, _relative_parts(root, path), root_name)
        if row is None:
            skipped.append(path)
            continue
        label, subset, split = row
        if source.layout == "genimage" and source.split is not None and split != source.split:
            continue
        for name, value in zip(MANIFEST_SCHEMA.names, (path, label, subset, split)):
            rows[name].append(value)
    if skipped:
        log.warning("%d files under %s do not fit the %s layout and are skipped, e.g. %s",
                    len(skipped), source.uri, source.layout, skipped[0])
    return pa.table(rows, schema=MANIFEST_SCHEMA)


def _parse(source: SourceConfig, parts: list[str], root_name: str):
    """(label, subset, split) of a file from its path below the source root, or None if it does not fit."""
    folders = parts[:-1]
    if source.layout == "unlabelled":
        return None, UNLABELLED_SUBSET, source.split
    if source.layout == "genimage":
        # The last "<split>/<class>" pair decides, so a subset may itself contain folders named like a split.
        for i in range(len(folders) - 2, -1, -1):
            if folders[i] in GENIMAGE_SPLITS and folders[i + 1] in GENIMAGE_CLASSES:
                subset = folders[0] if i > 0 else root_name
                return GENIMAGE_CLASSES[folders[i + 1]], subset, folders[i]
        return None
    if source.layout == "ufd":
        for i in range(len(folders) - 1, -1, -1):
            if folders[i] in UFD_CLASSES:
                subset = folders[0] if i > 0 else root_name
                return UFD_CLASSES[folders[i]], subset, source.split
        return None
    raise ValueError(f"unknown layout {source.layout!r}")


def _keep_subsets(table: pa.Table, subsets: Optional[list[str]]) -> pa.Table:
    if subsets is None:
        return table
    present = set(table["subset"].to_pylist())
    missing = sorted(set(subsets) - present)
    if missing:
        raise ValueError(f"subsets {missing} not found; available: {sorted(s for s in present if s is not None)}")
    return table.filter(pc.is_in(table["subset"], value_set=pa.array(subsets, pa.string())))


def _check_unique_paths(table: pa.Table, uri: str) -> None:
    paths = table["path"]
    if pc.count_distinct(paths).as_py() != len(paths):
        counts = pc.value_counts(paths)
        dup = next(c["values"] for c in counts.to_pylist() if c["counts"] > 1)
        raise ValueError(f"{uri}: path listed more than once, e.g. {dup}")


# --------------------------------------------------------------------------------------------------- manifest files


def _read_manifest_file(uri: str, storage_cfg: StorageConfig | None) -> pa.Table:
    data = storage.read_bytes(uri, storage_cfg)
    ext = posixpath.splitext(uri)[1].lower()
    if ext == ".parquet":
        table = pq.read_table(pa.BufferReader(data))
    elif ext == ".csv":
        table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
            column_types={"path": pa.string(), "label": pa.int8(), "subset": pa.string(), "split": pa.string()},
            strings_can_be_null=True))
    else:
        raise ValueError(f"manifest {uri}: expected a .parquet or .csv file")
    missing = {"path", "label"} - set(table.column_names)
    if missing:
        raise ValueError(f"manifest {uri} lacks column(s) {sorted(missing)}; it has {table.column_names}")
    n = table.num_rows
    stem = posixpath.splitext(posixpath.basename(uri))[0]
    subset = table["subset"] if "subset" in table.column_names else pa.array([stem] * n, pa.string())
    split = table["split"] if "split" in table.column_names else pa.nulls(n, pa.string())
    labels = table["label"].cast(pa.int8())
    bad = pc.invert(pc.is_in(labels, value_set=pa.array([0, 1], pa.int8())))
    if pc.any(pc.and_(bad, pc.is_valid(labels))).as_py():
        raise ValueError(f"manifest {uri}: label must be 0 (real), 1 (generated) or empty")
    folder = posixpath.dirname(uri if storage.is_remote(uri) else storage.resolve(uri)[1])
    paths = [_absolute(p, folder, uri) for p in table["path"].to_pylist()]
    return pa.table([pa.array(paths, pa.string()), labels, subset.cast(pa.string()), split.cast(pa.string())],
                    schema=MANIFEST_SCHEMA)


def _absolute(path: Optional[str], folder: str, uri: str) -> str:
    if not path:
        raise ValueError(f"manifest {uri} has an empty path")
    if storage.is_remote(path) or path.startswith("/"):
        return path
    if "://" in path:
        raise ValueError(f"manifest {uri}: unsupported location {path!r}")
    # normpath folds "./" and "../" (an S3 key would otherwise contain them literally and never match)
    if storage.is_remote(folder):
        key = posixpath.normpath(posixpath.join(folder[len(storage.S3_PREFIX):], path))
        return storage.S3_PREFIX + key
    return posixpath.normpath(posixpath.join(folder, path))


def write_manifest(table: pa.Table, uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """Write a manifest as ``.parquet`` or ``.csv`` (by the extension of ``uri``)."""
    table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    buf = io.BytesIO()
    ext = posixpath.splitext(uri)[1].lower()
    if ext == ".parquet":
        pq.write_table(table, buf)
    elif ext == ".csv":
        pacsv.write_csv(table, buf)
    else:
        raise ValueError(f"{uri}: a manifest is written as .parquet or .csv")
    storage.write_bytes(uri, buf.getvalue(), storage_cfg)


def manifest_hash(table: pa.Table) -> str:
    """sha256 (hex) of the manifest's content: same rows in any order -> same hash; any changed value -> new hash."""
    canonical = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    canonical = canonical.sort_by([(name, "ascending") for name in MANIFEST_SCHEMA.names])
    buf = io.BytesIO()
    # CSV text depends only on the values (not on chunking or buffer layout) and keeps null distinct from "".
    pacsv.write_csv(canonical, buf, write_options=pacsv.WriteOptions(quoting_style="all_valid"))
    return hashlib.sha256(_HASH_VERSION + buf.getvalue()).hexdigest()
