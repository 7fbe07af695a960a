"""Holdout leakage: holdout images that are also in the training data, by path or by identical bytes.

A model judged on images it was trained on looks better than it is, and the promotion gate would reward exactly
that. Two checks:

- the same path in the training and the holdout manifests;
- the same SHA-256 of the bytes under another path (a copy renamed or moved).

Only the holdout, which is small, is read and hashed in full. The training data can be large, so it is streamed one
folder at a time: each folder is listed once (sizes come with the listing, no request per file), and a training file
is read and hashed only when its size equals the size of a holdout file.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from mpft_core.config import InputError
from mpft_core.imageio import DEFAULT_MAX_BYTES
from pipelines import storage
from pipelines.sources import SourceConfig, build_manifest
from pipelines.storage import StorageConfig

log = logging.getLogger(__name__)

LeakagePolicy = Literal["error", "warn"]
_EXAMPLES = 2  # examples named in the one-line report


class HoldoutLeakError(InputError):
    """The training data holds holdout images and the policy is ``error``."""


@dataclass
class HoldoutLeaks:
    holdout_images: int
    shared_paths: list[str] = field(default_factory=list)  # holdout paths that are training paths too
    same_bytes: dict[str, str] = field(default_factory=dict)  # holdout path -> a training path with identical bytes

    def __bool__(self) -> bool:
        return bool(self.shared_paths or self.same_bytes)

    @property
    def leaked(self) -> int:
        return len(self.shared_paths) + len(self.same_bytes)

    def describe(self) -> str:
        """One line: how many holdout images leak, how, and a few examples."""
        parts = []
        if self.shared_paths:
            parts.append(f"{len(self.shared_paths)} by path (e.g. {', '.join(self.shared_paths[:_EXAMPLES])})")
        if self.same_bytes:
            pairs = list(self.same_bytes.items())[:_EXAMPLES]
            examples = ", ".join(f"{holdout} = training {train}" for holdout, train in pairs)
            parts.append(f"{len(self.same_bytes)} by identical bytes under another path (e.g. {examples})")
        return (f"{self.leaked} of {self.holdout_images} holdout images are in the training data: "
                + "; ".join(parts))


def check_holdout_leakage(training: Sequence[SourceConfig], holdout: Sequence[SourceConfig],
                          storage_cfg: Optional[StorageConfig] = None,
                          policy: LeakagePolicy = "error") -> HoldoutLeaks:
    """Find holdout images in the training sources; HoldoutLeakError (one line) under ``error``, a warning under
    ``warn``."""
    leaks = find_holdout_leaks(sources_manifest(training, storage_cfg), sources_manifest(holdout, storage_cfg),
                               storage_cfg)
    if leaks and policy == "error":
        raise HoldoutLeakError(f"{leaks.describe()}; the gate would judge a model on images it was trained on: "
                               "take them out of the training or the holdout sources (or set leakage: warn)")
    if leaks:
        log.warning("HOLDOUT LEAKAGE (leakage: warn, going on): %s", leaks.describe())
    return leaks


def sources_manifest(source_list: Sequence[SourceConfig], storage_cfg: Optional[StorageConfig]) -> pa.Table:
    return pa.concat_tables([build_manifest(source, storage_cfg) for source in source_list])


def find_holdout_leaks(train_manifest: pa.Table, holdout_manifest: pa.Table,
                       storage_cfg: Optional[StorageConfig] = None) -> HoldoutLeaks:
    """Holdout rows whose path is a training path, and the others whose bytes equal a training file's bytes."""
    train_paths = train_manifest["path"]
    holdout_paths = pc.unique(holdout_manifest["path"])
    shared = pc.is_in(holdout_paths, value_set=train_paths)
    leaks = HoldoutLeaks(len(holdout_paths), shared_paths=holdout_paths.filter(shared).to_pylist())
    holdout_digests = _digests_by_size(holdout_paths.filter(pc.invert(shared)).to_pylist(), storage_cfg)
    if holdout_digests:
        reader = storage.BytesReader(storage_cfg, max_bytes=DEFAULT_MAX_BYTES)
        for train_path, data in _same_size_training_files(train_paths, set(holdout_digests), storage_cfg, reader):
            for holdout_path in holdout_digests[len(data)].get(hashlib.sha256(data).hexdigest(), []):
                leaks.same_bytes.setdefault(holdout_path, train_path)
    return leaks


def _digests_by_size(paths: list[str], storage_cfg) -> dict[int, dict[str, list[str]]]:
    """{size: {sha256: [holdout paths]}} of the readable files; unreadable ones are the evaluation's error rows."""
    digests: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    reads = storage.BytesReader(storage_cfg, max_bytes=DEFAULT_MAX_BYTES).read_each(paths)
    for path, (data, err) in zip(paths, reads, strict=True):
        if err is None:
            digests[len(data)][hashlib.sha256(data).hexdigest()].append(path)
    return digests


def _same_size_training_files(train_paths: pa.ChunkedArray, sizes: set[int], storage_cfg,
                              reader: storage.BytesReader) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of each training file whose size is in ``sizes``, one folder at a time."""
    folders = pc.unique(pc.replace_substring_regex(train_paths, pattern=r"/[^/]*$", replacement=""))
    for folder in folders.to_pylist():
        listed = pa.array([path for path, size in _listed_sizes(folder, storage_cfg) if size in sizes], pa.string())
        candidates = listed.filter(pc.is_in(listed, value_set=train_paths)).to_pylist()  # files training reads
        for path, (data, err) in zip(candidates, reader.read_each(candidates), strict=True):
            if err is None:
                yield path, data


def _listed_sizes(folder: str, storage_cfg) -> Iterator[tuple[str, int]]:
    """(path as the manifest writes it, size) of the files directly in ``folder``."""
    fs, fs_path = storage.resolve(folder, storage_cfg)
    selector = pafs.FileSelector(fs_path, recursive=False, allow_not_found=True)
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.File:
            yield f"{folder}/{posixpath.basename(info.path)}", info.size
