"""Image sources -> a manifest table (path, label, subset, split) and the hash that identifies that dataset version.

Layouts (``SourceConfig.layout``):
- ``genimage``: ``<uri>/.../<generator>/[<folder>/]{train,val}/{ai,nature}/<files>``. label ai=1, nature=0; split
  from the folder; ``split`` keeps only that split.
- ``ufd`` (UniversalFakeDetect / CNNSpot): ``<uri>/.../<generator>/[<class>/]{0_real,1_fake}/<files>``. split stays
  null unless ``SourceConfig.split`` is given, which is then recorded on every row.
- ``manifest``: a ``.parquet`` or ``.csv`` file with columns ``path``, ``label`` and optionally ``subset`` (default:
  the manifest's file name without extension) and ``split`` (default null). Relative paths are resolved against the
  manifest's folder; ``split`` filters on the split column.
- ``unlabelled``: every file under ``uri``, label null, subset ``"unlabelled"`` (for scoring).

Every object of a folder layout is an input, whatever its name ends with: a crawl's objects often have no extension
(content-addressed keys), and the decoder sniffs the bytes, so a file that is no image becomes an error row instead
of vanishing. Hidden names are skipped, and so is everything inside a hidden folder (``.git/``, ``.cache/``, macOS
``._x.jpg`` forks), below ``uri``. ``extensions`` (``[".png", ".jpg"]``, any case, the dot optional) narrows the
listing of every folder layout; it is refused for a manifest, which names its files itself.

A manifest cannot reach outside its corpus: a row that resolves outside the manifest's folder (an absolute path or
URI elsewhere, ``..`` that climbs out, another bucket or scheme, a local symlink whose target lies outside) makes
the whole source an error, raised while the manifest is read, so before any Ray work, naming how many rows and one
of them; ``allow_outside_corpus: true`` lets such rows through. A row naming a special file (under ``/dev``,
``/proc`` or ``/sys``, or a FIFO, device or socket, also through a symlink) is refused even then: reading it never
ends or is never an image. A refusal is a job error, not error rows, because a manifest pointing at ``/etc`` is a
misconfiguration or an attack, not bad data.

Subset names do not depend on where ``uri`` points: genimage takes the folder directly above ``{train,val}``, ufd the
nearest folder above ``{0_real,1_fake}`` that is not one of UFD's object categories (car, cat, ...), even when that
folder is above ``uri``; either is mapped to its canonical name (``pipelines.subset_names``: the generator folder
``stable_diffusion_v_1_4`` and the folder inside it, ``imagenet_ai_0419_sdv4``, both give ``sdv14``). A manifest
file's subsets are mapped to canonical names too.

``subsets`` keeps only the named subsets (canonical names or aliases) and the real subsets they are paired with;
naming a subset that does not exist is an error (a typo must not silently train on nothing). Files that do not fit
the layout are skipped with a warning that says how many and shows one.

``carve`` keeps a deterministic part of a source, so validation can be held out of the training split: a file is in
the carved part iff the first 8 bytes of sha256(its carve key, UTF-8), read as a big-endian integer, are below
``fraction * 2**64``. The carve key is ``<subset>/<path below the split folder>`` for genimage (``sdv14/ai/x.png``),
``<subset>/<path below the subset's folder>`` for ufd (``progan/car/1_fake/x.png``), the path relative to the
manifest's folder for a manifest file (the whole path if outside it) and the path below ``uri`` for unlabelled
files. So the same files are carved on every machine, wherever the dataset is mounted and whichever folder ``uri``
points at: a train source with ``keep: rest`` and a val source with ``keep: carved`` (same split and fraction) are
disjoint and together exactly the split.

``real_pairs`` ({fake-only subset: real-only subset}) says which real images a fake-only subset is evaluated with
(``real_pairs_of``, ``mpft_core.metrics.per_subset_metrics(pairs=...)``); the ufd layout defaults to
``UFD_REAL_PAIRS``, the pairing of UFD's diffusion test sets.

``manifest_hash`` identifies the listing (paths, labels, subsets, splits), independent of row order; it does not
read the image bytes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import stat
from collections.abc import Sequence
from typing import Literal, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from mpft_core.config import InputError, StrictModel
from mpft_core.metrics import pairing_problem
from pipelines import storage
from pipelines.storage import StorageConfig
from pipelines.subset_names import UFD_OBJECT_CLASSES, UFD_REAL_PAIRS, canonical_subset

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema([("path", pa.string()), ("label", pa.int8()), ("subset", pa.string()),
                             ("split", pa.string())])
GENIMAGE_SPLITS = {"train", "val"}
GENIMAGE_CLASSES = {"ai": 1, "nature": 0}
UFD_CLASSES = {"1_fake": 1, "0_real": 0}
UNLABELLED_SUBSET = "unlabelled"
_CARVE_KEY = "carve_key"  # a column that lives only until the carve
_HASH_VERSION = b"mpft-manifest-v1\n"
SPECIAL_FOLDERS = ("/dev", "/proc", "/sys")  # pseudo-files: endless, or the machine's secrets, never images
MAX_MANIFEST_BYTES = 4 << 30  # a manifest is read whole: room for ~40 million rows of 100-byte paths
_SHOWN_PATH_CHARS = 200  # a refused row is quoted, cut to this length


class CarveConfig(StrictModel):
    """A deterministic part of a source's files, chosen by a hash of each file's carve key (module docstring)."""

    fraction: float = Field(gt=0.0, lt=1.0)  # expected share of the files in the carved part
    keep: Literal["rest", "carved"]          # train on the rest, validate on the carved part


class SourceConfig(StrictModel):
    uri: str  # prefix/folder, or a .parquet/.csv manifest file
    layout: Literal["genimage", "ufd", "manifest", "unlabelled"] = "genimage"
    split: Optional[str] = None  # genimage: "train"/"val"; manifest: filter on its split column; else recorded
    subsets: Optional[list[str]] = None  # keep only these subsets (canonical names or aliases)
    carve: Optional[CarveConfig] = None  # keep only one part of the files, e.g. validation held out of training
    real_pairs: Optional[dict[str, str]] = None  # {fake-only subset: real-only subset}; None: the layout's default
    extensions: Optional[list[str]] = None  # folder layouts: only files ending so (any case); None: every file
    allow_outside_corpus: bool = False  # manifest: rows may name files outside the manifest's folder

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, extensions: Optional[list[str]]) -> Optional[list[str]]:
        if extensions is None:
            return None
        normalised = sorted({_as_extension(ext) for ext in extensions})
        if not normalised:
            raise InputError("extensions is empty: name at least one, or leave it unset to list every file")
        return normalised

    @model_validator(mode="after")
    def _extensions_need_a_folder(self) -> SourceConfig:
        if self.layout == "manifest" and self.extensions is not None:
            raise InputError("extensions narrows a folder listing; a manifest names its files itself")
        return self


def _as_extension(text: str) -> str:
    """``"PNG"``, ``".png"`` -> ``".png"``; ValueError for an empty or path-like one."""
    ext = text.strip().lower()
    ext = ext if ext.startswith(".") else "." + ext
    if ext == "." or "/" in ext or "." in ext[1:]:
        raise InputError(f"extension {text!r} is not a file-name suffix like .png")
    return ext


def build_manifest(source: SourceConfig, storage_cfg: StorageConfig | None = None) -> pa.Table:
    """The manifest of ``source``, sorted by path; raises ValueError if it comes out empty."""
    if source.layout == "manifest":
        table = _read_manifest_file(source.uri, storage_cfg, source.allow_outside_corpus)
        if source.split is not None:
            table = table.filter(pc.equal(table["split"], source.split))
        folder = posixpath.dirname(_source_root(source.uri))
        keys = [_path_below(folder, path) for path in table["path"].to_pylist()]
        table = table.append_column(_CARVE_KEY, pa.array(keys, pa.string()))
    else:
        table = _from_listing(source, listed_files(source, storage_cfg))
    table = _keep_subsets(table, source.subsets, real_pairs_of([source]))
    if source.carve is not None:
        table = _carve(table, source.carve)
    table = table.select(MANIFEST_SCHEMA.names)
    if table.num_rows == 0:
        raise InputError(f"no images found for {source.layout} source {source.uri} (split={source.split}, "
                         f"subsets={source.subsets})")
    _check_unique_paths(table, source.uri)
    return table.sort_by("path")


def real_pairs_of(sources: Sequence[SourceConfig]) -> dict[str, str]:
    """{fake-only subset: the real-only subset it is evaluated with} of these sources together, in canonical names;
    ValueError if two sources pair one subset differently."""
    merged: dict[str, str] = {}
    for source in sources:
        pairs = source.real_pairs if source.real_pairs is not None else _default_real_pairs(source.layout)
        for fake, real in pairs.items():
            fake, real = canonical_subset(fake), canonical_subset(real)
            if merged.setdefault(fake, real) != real:
                raise InputError(f"subset {fake!r} is paired with both {merged[fake]!r} and {real!r}")
    return merged


def _default_real_pairs(layout: str) -> dict[str, str]:
    return UFD_REAL_PAIRS if layout == "ufd" else {}


def check_real_pairs(manifest: pa.Table, real_pairs: dict[str, str]) -> None:
    """ValueError, in one line naming the pair and the fix, if the labelled rows of ``manifest`` cannot be scored
    with ``real_pairs`` (``mpft_core.metrics.pairing_problem``), e.g. a fake-only set listed without its real set."""
    labelled = manifest.filter(pc.is_valid(manifest["label"]))
    problem = pairing_problem(labelled["label"].to_numpy(zero_copy_only=False), labelled["subset"].to_pylist(),
                              real_pairs)
    if problem:
        raise InputError(f"{problem}: list both subsets of each pair, each holding its own class only (point the "
                         "source at the folder that holds both), or turn pairing off with `real_pairs: {}` on every "
                         "source")


# --------------------------------------------------------------------------------------------------- folder layouts


def _source_root(uri: str) -> str:
    """``uri`` as the listed paths begin (full URI for S3, local path without scheme), without a trailing slash."""
    return uri.rstrip("/") if storage.is_remote(uri) else storage.resolve(uri)[1].rstrip("/")


def _relative_parts(root: str, path: str) -> list[str]:
    return path[len(root) + 1:].split("/")


def listed_files(source: SourceConfig, storage_cfg: StorageConfig | None = None) -> list[str]:
    """Every file under a folder source, sorted, except hidden ones and those inside hidden folders below ``uri``,
    narrowed to ``source.extensions`` when set; whether a file is an image is left to the decoder."""
    return storage.list_files(source.uri, storage_cfg, extensions=source.extensions)


def _from_listing(source: SourceConfig, files: list[str]) -> pa.Table:
    """The listed files that fit the layout, with the manifest columns and their carve keys."""
    root = _source_root(source.uri)
    root_folders = [folder for folder in root.split("/") if folder]
    names = MANIFEST_SCHEMA.names + [_CARVE_KEY]
    rows: dict[str, list] = {name: [] for name in names}
    skipped: list[str] = []
    for path in files:
        row = _parse(source, _relative_parts(root, path), root_folders)
        if row is None:
            skipped.append(path)
            continue
        label, subset, split, key = row
        if source.layout == "genimage" and source.split is not None and split != source.split:
            continue
        for name, value in zip(names, (path, label, subset, split, key), strict=True):
            rows[name].append(value)
    if skipped:
        log.warning("%d files under %s do not fit the %s layout and are skipped, e.g. %s",
                    len(skipped), source.uri, source.layout, skipped[0])
    return pa.table(rows, schema=MANIFEST_SCHEMA.append(pa.field(_CARVE_KEY, pa.string())))


def _parse(source: SourceConfig, parts: list[str], root_folders: list[str]):
    """(label, subset, split, carve key) of a file from its path below the source root, or None if it does not fit.

    The split / class folder is looked for below the root only; the subset's folder may be above it
    (``root_folders``), so subset and carve key are the same whichever folder the source points at.
    """
    folders = parts[:-1]
    if source.layout == "unlabelled":
        return None, UNLABELLED_SUBSET, source.split, "/".join(parts)
    if source.layout == "genimage":
        # The last "<split>/<class>" pair decides, so a subset may itself contain folders named like a split.
        for i in range(len(folders) - 2, -1, -1):
            if folders[i] in GENIMAGE_SPLITS and folders[i + 1] in GENIMAGE_CLASSES:
                above = root_folders + folders[:i]
                if not above:
                    return None
                subset = canonical_subset(above[-1])
                return GENIMAGE_CLASSES[folders[i + 1]], subset, folders[i], "/".join([subset, *parts[i + 1:]])
        return None
    if source.layout == "ufd":
        for i in range(len(folders) - 1, -1, -1):
            if folders[i] in UFD_CLASSES:
                above = root_folders + folders[:i]
                at = next((j for j in reversed(range(len(above))) if above[j].lower() not in UFD_OBJECT_CLASSES),
                          None)
                if at is None:
                    return None
                subset = canonical_subset(above[at])
                return UFD_CLASSES[folders[i]], subset, source.split, "/".join([subset, *above[at + 1:], *parts[i:]])
        return None
    raise InputError(f"unknown layout {source.layout!r}")


def _keep_subsets(table: pa.Table, subsets: Optional[list[str]], real_pairs: dict[str, str]) -> pa.Table:
    """Rows of the requested subsets and of the real subsets they are paired with."""
    if subsets is None:
        return table
    present = set(table["subset"].to_pylist())
    missing = sorted(name for name in subsets if canonical_subset(name) not in present)
    if missing:
        raise InputError(f"subsets {missing} not found; available: {sorted(s for s in present if s is not None)}")
    wanted = {canonical_subset(name) for name in subsets}
    wanted |= {real_pairs[name] for name in wanted if name in real_pairs}
    return table.filter(pc.is_in(table["subset"], value_set=pa.array(sorted(wanted), pa.string())))


def _carve(table: pa.Table, carve: CarveConfig) -> pa.Table:
    in_carved_part = [_in_carved_part(key, carve.fraction) for key in table[_CARVE_KEY].to_pylist()]
    keep = in_carved_part if carve.keep == "carved" else [not carved for carved in in_carved_part]
    return table.filter(pa.array(keep, pa.bool_()))


def _path_below(root: str, path: str) -> str:
    """``path`` relative to ``root`` (a manifest file's carve key, so the mount point does not matter); whole if
    outside."""
    return path[len(root) + 1:] if path.startswith(root + "/") else path


def _in_carved_part(key: str, fraction: float) -> bool:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def _check_unique_paths(table: pa.Table, uri: str) -> None:
    paths = table["path"]
    if pc.count_distinct(paths).as_py() != len(paths):
        counts = pc.value_counts(paths)
        dup = next(c["values"] for c in counts.to_pylist() if c["counts"] > 1)
        raise InputError(f"{uri}: path listed more than once, e.g. {dup}")


# --------------------------------------------------------------------------------------------------- manifest files


def _read_manifest_file(uri: str, storage_cfg: StorageConfig | None, allow_outside_corpus: bool) -> pa.Table:
    data = storage.read_bytes(uri, storage_cfg, max_bytes=MAX_MANIFEST_BYTES)
    ext = posixpath.splitext(uri)[1].lower()
    if ext == ".parquet":
        table = pq.read_table(pa.BufferReader(data))
    elif ext == ".csv":
        table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
            column_types={"path": pa.string(), "label": pa.int8(), "subset": pa.string(), "split": pa.string()},
            strings_can_be_null=True))
    else:
        raise InputError(f"manifest {uri}: expected a .parquet or .csv file")
    missing = {"path", "label"} - set(table.column_names)
    if missing:
        raise InputError(f"manifest {uri} lacks column(s) {sorted(missing)}; it has {table.column_names}")
    n = table.num_rows
    stem = posixpath.splitext(posixpath.basename(uri))[0]
    subset = table["subset"].cast(pa.string()) if "subset" in table.column_names else pa.array([stem] * n, pa.string())
    subset = pa.array([None if name is None else canonical_subset(name) for name in subset.to_pylist()], pa.string())
    split = table["split"] if "split" in table.column_names else pa.nulls(n, pa.string())
    labels = table["label"].cast(pa.int8())
    bad = pc.invert(pc.is_in(labels, value_set=pa.array([0, 1], pa.int8())))
    if pc.any(pc.and_(bad, pc.is_valid(labels))).as_py():
        raise InputError(f"manifest {uri}: label must be 0 (real), 1 (generated) or empty")
    folder = posixpath.dirname(uri if storage.is_remote(uri) else storage.resolve(uri)[1])
    written = table["path"].cast(pa.string()).to_pylist()
    paths = [_absolute(p, folder, uri) for p in written]
    # Each local row's real location, resolved once (it follows symlinks: a system call per path component).
    real = [None if storage.is_remote(path) else os.path.realpath(path) for path in paths]
    _refuse_special_files(uri, written, paths, real)
    if not allow_outside_corpus:
        _refuse_rows_outside(uri, folder, written, paths, real)
    return pa.table([pa.array(paths, pa.string()), labels, subset, split.cast(pa.string())],
                    schema=MANIFEST_SCHEMA)


def _absolute(path: Optional[str], folder: str, uri: str) -> str:
    if not path:
        raise InputError(f"manifest {uri} has an empty path")
    # normpath folds "./" and "../" everywhere: "/corpus/../etc/passwd" must not pass for a path below /corpus
    if storage.is_remote(path):
        return storage.S3_PREFIX + posixpath.normpath(path[len(storage.S3_PREFIX):])
    if path.startswith("/"):
        return posixpath.normpath(path)
    if "://" in path:
        raise InputError(f"manifest {uri}: unsupported location {path!r}")
    if storage.is_remote(folder):
        key = posixpath.normpath(posixpath.join(folder[len(storage.S3_PREFIX):], path))
        return storage.S3_PREFIX + key
    return posixpath.normpath(posixpath.join(folder, path))


def _refuse_rows_outside(uri: str, folder: str, written: list[str], paths: list[str],
                         real: list[Optional[str]]) -> None:
    """ValueError naming how many rows of manifest ``uri`` resolve outside its ``folder``, and the first of them
    (``real``: each local path's ``os.path.realpath``, None for a remote one)."""
    real_folder = None if storage.is_remote(folder) else os.path.realpath(folder)
    outside = [i for i, path in enumerate(paths) if not _is_inside(folder, path, real_folder, real[i])]
    if outside:
        raise InputError(f"manifest {uri}: {len(outside)} of {len(paths)} rows point outside the manifest's folder "
                         f"{folder}, e.g. {_shown_row(outside[0], written, paths)}; move the manifest to the folder "
                         "that holds its images, or set allow_outside_corpus: true on the source "
                         "(mpft score / evaluate: --allow-outside-corpus) if these files are meant")


def _refuse_special_files(uri: str, written: list[str], paths: list[str], real: list[Optional[str]]) -> None:
    """ValueError naming how many rows of manifest ``uri`` name a special file, and the first of them."""
    special = [i for i, path in enumerate(paths) if _is_special_file(path, real[i])]
    if special:
        raise InputError(f"manifest {uri}: {len(special)} of {len(paths)} rows name a special file (a device, FIFO, "
                         f"socket or a file under {', '.join(SPECIAL_FOLDERS)}), e.g. "
                         f"{_shown_row(special[0], written, paths)}; these are never images and are always refused")


def _is_inside(folder: str, path: str, real_folder: Optional[str], real_path: Optional[str]) -> bool:
    """``path`` is below ``folder``, and on a local disk so is the file it really is (``real_path`` below
    ``real_folder``: a symlink in the corpus, e.g. from an extracted crawl archive, may not lead out of it)."""
    if not _is_below(folder, path):
        return False
    return storage.is_remote(path) or _is_below(real_folder, real_path)


def _is_below(folder: str, path: str) -> bool:
    return path.startswith(folder.rstrip("/") + "/")


def _is_special_file(path: str, real_path: Optional[str]) -> bool:
    """A local path under /dev, /proc or /sys (also through a symlink: ``real_path`` is its realpath), or a FIFO,
    device or socket."""
    if storage.is_remote(path):
        return False
    if any(_is_below(folder, candidate) or candidate == folder
           for folder in SPECIAL_FOLDERS for candidate in (path, real_path)):
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False  # missing or unreadable: that row's read error says so
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode)


def _shown_row(i: int, written: list[str], paths: list[str]) -> str:
    """Row ``i`` as written and as resolved, each quoted and cut short (a hostile manifest may hold anything)."""
    shown = repr(written[i][:_SHOWN_PATH_CHARS])
    if paths[i] != written[i]:
        shown += f" (resolved to {paths[i][:_SHOWN_PATH_CHARS]!r})"
    return f"row {i + 1}: {shown}"


def manifest_hash(table: pa.Table) -> str:
    """sha256 (hex) of the manifest's content: same rows in any order -> same hash; any changed value -> new hash."""
    canonical = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    canonical = canonical.sort_by([(name, "ascending") for name in MANIFEST_SCHEMA.names])
    buf = io.BytesIO()
    # CSV text depends only on the values (not on chunking or buffer layout) and keeps null distinct from "".
    pacsv.write_csv(canonical, buf, write_options=pacsv.WriteOptions(quoting_style="all_valid"))
    return hashlib.sha256(_HASH_VERSION + buf.getvalue()).hexdigest()
