"""The score store: each distinct image is scored once per model version, across scoring runs and within one.

A data team scores a new crawl every day, and most of it is images it has seen before. With ``mpft score --store
URI`` the job hashes every input's bytes first (a cheap read-and-hash pass, no decode, no model), looks the hashes up
in the store, and sends only new content through decode and the model; a file whose bytes are already in the store
gets the stored result, and files of one run with the same bytes are scored once. Every input still gets exactly one
output row, marked in its ``reuse`` column: ``fresh`` (scored now), ``reused`` (from the store), ``duplicate``
(copied from another input of this run with the same bytes).

Hash: SHA-256 of the file's bytes (hex). It runs at about 1.4 GB/s a core here (hardware SHA instructions), a small
fraction of decoding, and unlike a non-cryptographic hash nobody can craft a file that borrows another file's score.

Key: the content hash and the model's fingerprint (``model_fingerprint``: a digest of the weights' SHA-256, the parts
of ``mpft.json`` that decide a score, ``SCORING_VERSION`` and the device kind), so a model retrained in place, or a
new version behind an alias, never reuses the old one's scores. Thresholds are not in it: verdicts are recomputed
from the scoring model's own. Only successful scores are stored; a file that failed to read or decode is tried
again next time (a read error may be transient, a limit may have been raised).

Layout (Parquet in object storage or a local folder, written by the scoring job itself)::

    <store>/model=<fingerprint>/bucket=<first two hex digits of the hash>/part-<run_id>.parquet

A lookup lists the model's folder, opens only the parts of the buckets its hashes fall in (all 256 once a run has
more than a couple of thousand new hashes) and reads only the rows whose hash it asks for (a Parquet filter on
``content_hash``), several parts at a time. Each run adds files of its own, each written whole or not at all. A hash
stored twice (two runs scored the same new image at once) is read once: the earliest score.

Compaction (``compact``, run by the scoring job once a pass's rows are all written): a daily run adds a file to nearly
every bucket, so after a few months a lookup would open tens of thousands of files. Every bucket holding
``COMPACT_AT_PARTS`` files or more is merged: its files are read, one ``part-compacted-<time>-<id>.parquet`` holding
the earliest score of each hash is written, and only then are the files it merged deleted (files of any run: the
only time a run deletes what another wrote). A crash in between leaves the merged file beside the originals (the
same scores twice, read once). A lookup that finds a file gone lists that bucket again: the merged file was written
before anything was deleted. Two runs merging one bucket at once leave two merged files, which is only duplication.
Merging needs permission to delete in the store: a job that cannot delete its own check file, or the first file it
merged, warns, takes its merged file back out and merges nothing more.

Reuse is exact within a device kind: a reused row carries the very float32 score the model produced for those bytes
when they were first scored, and the verdict is recomputed from the model's thresholds. (Scoring the same bytes again
may differ in the last bit of a float32, about 1e-7: a CPU matmul's rounding depends on the batch the image happens
to share. A GPU rounds differently again, TF32 included, so CPU and GPU runs keep separate stores.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.storage import BytesReader, StorageConfig

log = logging.getLogger(__name__)

STORE_SCHEMA = pa.schema([
    ("content_hash", pa.string()),
    ("score", pa.float32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("model_uri", pa.string()),        # the identity of the run that stored it (informative; the key is the folder)
    ("scored_at", pa.timestamp("us", tz="UTC")),
])
# Raised when decoding or cropping changes what a score means (EXIF handling, colour conversion, the crop): stored
# scores of earlier versions are then never reused.
SCORING_VERSION = 1
LOOKUP_READS_IN_FLIGHT = 16
# A bucket holding this many files after a scoring pass is merged into one (module docstring: compaction).
COMPACT_AT_PARTS = 32
# Times a lookup reads a bucket in which a file disappeared meanwhile (merged by another run), listing it again.
LOOKUP_ATTEMPTS = 5
# What a lookup copies into a reused output row.
STORED_RESULT = ("score", "width", "height")
HASHED_SCHEMA = pa.schema([("path", pa.string()), ("content_hash", pa.string())])


def content_hash(data: bytes) -> str:
    """The key of a file's content: SHA-256 of its bytes, hex."""
    return hashlib.sha256(data).hexdigest()


def model_fingerprint(weights_sha256: str, meta: dict, device: str = "cpu") -> str:
    """The store's folder for a model: a digest of its weights, the parts of ``mpft.json`` that decide a score
    (architecture, detector, preprocessing), ``SCORING_VERSION`` and the ``device`` kind that scores (``cpu`` or
    ``cuda``: their rounding differs). Thresholds are left out: verdicts are recomputed from the scoring model's own,
    so recalibrating a model keeps its stored scores."""
    scoring_meta = {key: meta.get(key) for key in ("architecture", "detector", "preprocess", "format_version")}
    text = json.dumps([SCORING_VERSION, weights_sha256, scoring_meta, device], sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def bucket_of(hex_hash: str) -> str:
    return hex_hash[:2]


# ------------------------------------------------------------------------------------------- the hash pass


def hash_batch(batch: dict[str, np.ndarray], *, storage: dict, max_bytes: int) -> pa.Table:
    """Manifest rows -> (path, content_hash); the hash is null where the file cannot be read (the scoring pass then
    reports why, in that input's row)."""
    paths = [str(p) for p in batch["path"]]
    hashes = []
    for data, error in BytesReader(storage, max_bytes=max_bytes).read_each(paths):
        hashes.append(None if error is not None else content_hash(data))
    return pa.Table.from_arrays([pa.array(paths, pa.string()), pa.array(hashes, pa.string())],
                                schema=HASHED_SCHEMA)


def hash_inputs(manifest: pa.Table, storage_cfg: Optional[StorageConfig], *, rows_per_block: int, num_cpus: float,
                max_bytes: int) -> pa.Table:
    """(path, content_hash) of every manifest row, read and hashed by Ray tasks (Ray must be initialised); the
    driver keeps two strings per input, as it already keeps the paths."""
    import ray

    from pipelines.ingest import manifest_blocks

    if manifest.num_rows == 0:
        return HASHED_SCHEMA.empty_table()
    ds = ray.data.from_arrow(manifest_blocks(manifest, rows_per_block)).map_batches(
        hash_batch, fn_kwargs={"storage": storage.for_workers(storage_cfg), "max_bytes": max_bytes},
        batch_format="numpy", batch_size=rows_per_block, num_cpus=num_cpus)
    blocks = [ray.get(ref) for ref in ds.to_arrow_refs()]
    return pa.concat_tables([b.select(HASHED_SCHEMA.names).cast(HASHED_SCHEMA) for b in blocks]) if blocks \
        else HASHED_SCHEMA.empty_table()


# ------------------------------------------------------------------------------------------- the plan


@dataclass
class ReusePlan:
    """How a run's inputs split once hashed: ``reused`` (path, content_hash, score, width, height) from the store;
    ``to_score`` manifest rows for the model (one input per new content, and every unreadable one); ``duplicates``
    (path, content_hash) of inputs whose content another row of ``to_score`` carries."""

    reused: pa.Table
    to_score: pa.Table
    duplicates: pa.Table


def plan_reuse(todo: pa.Table, hashed: pa.Table, stored: pa.Table) -> ReusePlan:
    """Split ``todo`` by its inputs' hashes (``hashed``: path, content_hash) and the ``stored`` results found for
    them. Of several inputs with the same new content the first in the manifest is scored. Arrow joins and
    group-bys throughout: millions of inputs cost no Python loop."""
    rows = todo.select(["path"]).append_column("row", pa.array(np.arange(todo.num_rows, dtype=np.int64)))
    hashed = rows.join(hashed.select(["path", "content_hash"]), keys="path", join_type="left outer")
    reused = hashed.select(["path", "content_hash"]).join(stored, keys="content_hash", join_type="inner")
    new = hashed.filter(pc.and_(hashed.column("content_hash").is_valid(),
                                pc.invert(pc.is_in(hashed.column("content_hash"),
                                                   value_set=stored.column("content_hash")))))
    firsts = new.group_by("content_hash").aggregate([("row", "min")]).column("row_min")
    duplicates = new.filter(pc.invert(pc.is_in(new.column("row"), value_set=firsts))).select(["path", "content_hash"])
    not_scored = pa.concat_arrays([reused.column("path").combine_chunks(), duplicates.column("path").combine_chunks()])
    to_score = todo.filter(pc.invert(pc.is_in(todo.column("path"), value_set=not_scored)))
    return ReusePlan(reused=reused, to_score=to_score, duplicates=duplicates)


# ------------------------------------------------------------------------------------------- the store


class ScoreStore:
    """One model's part of the store at ``uri``: ``lookup`` known hashes, ``add`` newly scored rows, ``compact``."""

    def __init__(self, uri: str, fingerprint: str, cfg: Optional[StorageConfig] = None):
        self.uri = uri
        self.fingerprint = fingerprint
        self.cfg = (cfg or StorageConfig()).resolved()
        self.fs, root = storage.resolve(uri, self.cfg)
        self.model_dir = f"{root.rstrip('/')}/model={fingerprint}"

    @property
    def identity(self) -> str:
        """Which store and model, however the URI was spelt: the filesystem kind, the S3 endpoint, the model's folder
        (an absolute path locally, ``bucket/key`` on S3, the fingerprint included)."""
        endpoint = self.cfg.endpoint() if self.fs.type_name == "s3" else None
        return json.dumps([self.fs.type_name, endpoint, self.model_dir])

    def lookup(self, hashes) -> pa.Table:
        """The stored (content_hash, score, width, height) of those of ``hashes`` (an Arrow string array or a
        sequence of str) the store holds, one row each.

        Each stored part is asked only for the hashes of its own bucket, with a Parquet filter, so a lookup costs
        about the parts of the touched buckets times their share of the hashes (not every part times every hash).
        A bucket in which a file disappeared while it was read (merged by another run) is listed and read again.
        """
        wanted = _sorted_unique(hashes)
        if not len(wanted):
            return _empty_results()
        pending = _split_by_bucket(wanted)
        found: list[pa.Table] = []
        for attempt in range(1, LOOKUP_ATTEMPTS + 1):
            asks = [(part, pending[_bucket_of_part(part)]) for part in self._parts()
                    if _bucket_of_part(part) in pending]
            read = self._in_parallel(lambda ask: self._read_matches(*ask), asks)
            gone = {_bucket_of_part(part) for (part, _), table in zip(asks, read, strict=True) if table is _GONE}
            if gone and attempt < LOOKUP_ATTEMPTS:
                log.info("score store: %d bucket(s) changed while read (merged by another run); reading them again",
                         len(gone))
            elif gone:  # what those files held is scored again: slower, and the score may differ in its last bit
                log.warning("score store %s: files kept disappearing in %d bucket(s) over %d listings; going on "
                            "without them", self.uri, len(gone), attempt)
                gone = set()
            found += [t for (part, _), t in zip(asks, read, strict=True)
                      if _bucket_of_part(part) not in gone and t is not None and t is not _GONE and t.num_rows]
            pending = {bucket: pending[bucket] for bucket in gone}
            if not pending:
                break
        if not found:
            return _empty_results()
        table = pa.concat_tables(found)
        table = table.take(pc.sort_indices(table, sort_keys=[("scored_at", "ascending")]))
        return first_per_hash(table).select(["content_hash", *STORED_RESULT])

    def add(self, rows: pa.Table, run_id: str) -> int:
        """Store ``rows`` (content_hash, score, width, height, model_uri, scored_at; rows without a score or hash are
        left out), one file per bucket named after ``run_id``, sorted by hash so Parquet's statistics can skip row
        groups; each file appears whole or not at all (``storage.write_atomic``). Returns how many were stored."""
        keep = pc.and_(rows.column("score").is_valid(), rows.column("content_hash").is_valid())
        rows = rows.filter(keep).select(STORE_SCHEMA.names).cast(STORE_SCHEMA)
        if not rows.num_rows:
            return 0
        rows = rows.sort_by("content_hash")
        hashes = rows.column("content_hash").combine_chunks()
        for bucket, in_bucket in _bucket_ranges(hashes):
            start = in_bucket.offset - hashes.offset
            self._write_part(bucket, f"part-{run_id}.parquet", rows.slice(start, len(in_bucket)))
        return rows.num_rows

    def compact(self, min_parts: Optional[int] = None) -> int:
        """Merge every bucket holding ``min_parts`` (default ``COMPACT_AT_PARTS``) files or more into one file (module
        docstring: compaction); returns how many buckets were merged. Housekeeping: it never raises (a failure is a
        warning, and the next run tries again), because the scores are stored either way."""
        try:
            return self._compact(max(2, min_parts or COMPACT_AT_PARTS))
        except Exception as err:  # noqa: BLE001 - any failure leaves every score readable: merged or not yet
            log.warning("score store %s: merging files failed (%s: %s); the next run tries again", self.uri,
                        type(err).__name__, err)
            return 0

    def _compact(self, min_parts: int) -> int:
        by_bucket: dict[str, list[str]] = {}
        for part in self._parts():
            by_bucket.setdefault(_bucket_of_part(part), []).append(part)
        due = {bucket: parts for bucket, parts in sorted(by_bucket.items()) if len(parts) >= min_parts}
        if not due or not self._may_delete():
            return 0
        merged = 0
        for bucket, parts in due.items():
            outcome = self._merge_bucket(bucket, parts)
            if outcome is None:  # deleting refused: stop here
                break
            merged += outcome
        return merged

    def _may_delete(self) -> bool:
        """Whether this job may delete in the store, tried on an empty file of its own (one fixed name, so a store
        that refuses keeps one such file, not one per run): without deletes a merged file could never replace the
        files it merged, and every run would add another copy of the bucket."""
        check = f"{self.model_dir}/.delete-check"
        try:
            with self.fs.open_output_stream(check) as out:
                out.write(b"")
            self.fs.delete_file(check)
        except FileNotFoundError:  # another run's check deleted it first
            pass
        except OSError as err:
            log.warning("score store %s: could not delete there (%s), so this run merges none of its files; lookups "
                        "slow down as runs add files unless the job may delete under the store's prefix",
                        self.uri, err)
            return False
        return True

    def _merge_bucket(self, bucket: str, parts: list[str]) -> Optional[int]:
        """1 if ``parts`` were merged, 0 if left alone (another run is merging them, or fewer than two could be
        read), None if the store refused to delete (the merged copy is then taken back out)."""
        read = self._in_parallel(self._read_whole, parts)
        if any(table is _GONE for table in read):  # another run is merging this bucket: leave it to that run
            return 0
        merging = [(part, table) for part, table in zip(parts, read, strict=True) if table is not None]
        if len(merging) < 2:  # unreadable files stay where they are (lookups skip them too)
            return 0
        rows = pa.concat_tables([table for _, table in merging])
        rows = first_per_hash(rows.take(pc.sort_indices(rows, sort_keys=[("scored_at", "ascending")])))
        name = f"part-compacted-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}.parquet"
        self._write_part(bucket, name, rows.sort_by("content_hash"))
        first, *rest = [part for part, _ in merging]
        try:  # until here a crash leaves every score where it was
            self._delete(first)
        except OSError as err:
            log.warning("score store %s: could not delete %s (%s); taking the merged copy back out and merging no "
                        "more files this run", self.uri, first, err)
            self._delete(f"{self.model_dir}/bucket={bucket}/{name}", quiet=True)
            return None
        self._in_parallel(self._delete, rest)
        log.info("score store: merged %d files of bucket %s into %s", len(merging), bucket, name)
        return 1

    def _delete(self, path: str, quiet: bool = False) -> None:
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:  # merged and deleted by another run at the same time
            pass
        except OSError as err:
            if self._gone(path):  # deleted after all: the answer was lost on the way
                log.info("score store: deleting %s reported %s, but it is gone", path, err)
                return
            if not quiet:
                raise
            log.warning("score store: could not delete %s either (%s); it repeats scores stored beside it", path, err)

    def _gone(self, path: str) -> bool:
        try:
            return self.fs.get_file_info(path).type == pafs.FileType.NotFound
        except OSError:  # cannot tell: not gone, as far as anyone knows
            return False

    def _in_parallel(self, fn, items: list) -> list:
        """``[fn(item) for item in items]``, several at a time: each call mostly waits for the store (pyarrow
        releases the GIL while it waits)."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=LOOKUP_READS_IN_FLIGHT) as pool:
            return list(pool.map(fn, items))

    def _write_part(self, bucket: str, name: str, rows: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(rows.select(STORE_SCHEMA.names).cast(STORE_SCHEMA), sink)
        uri = storage.join(self.uri, f"model={self.fingerprint}", f"bucket={bucket}", name)
        storage.write_atomic(uri, sink.getvalue().to_pybytes(), self.cfg)

    def _parts(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.model_dir, recursive=True, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                      and not i.base_name.startswith("."))  # a local write's temporary file

    def _read_matches(self, part: str, value_set: pa.Array):
        """The rows of ``part`` whose hash is in ``value_set``; None if it is unreadable, ``_GONE`` if it vanished."""
        return self._read(part, columns=["content_hash", *STORED_RESULT, "scored_at"],
                          filters=pc.is_in(pc.field("content_hash"), value_set=value_set))

    def _read_whole(self, part: str):
        table = self._read(part, columns=STORE_SCHEMA.names)
        if table is None or table is _GONE:
            return table
        try:
            return table.cast(STORE_SCHEMA)
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as err:  # a file of another shape
            log.warning("score store: leaving out of the merge %s (%s)", part, err)
            return None

    def _read(self, part: str, **options):
        try:
            return pq.read_table(part, filesystem=self.fs, **options)
        except FileNotFoundError:  # merged away by another run
            return _GONE
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:  # not our Parquet (copied in by hand?): scored again
            log.warning("score store: skipping unreadable part %s (%s)", part, err)
            return None
        except OSError:
            # On S3 a file deleted after it was opened fails mid-read with a plain OSError: gone, if it is gone.
            if self._gone(part):
                return _GONE
            raise


_GONE = object()  # a part that disappeared between the listing and the read


def _sorted_unique(hashes) -> pa.Array:
    if not isinstance(hashes, (pa.Array, pa.ChunkedArray)):
        hashes = pa.array(list(hashes), pa.string())
    unique = pc.unique(pc.drop_null(hashes))
    if isinstance(unique, pa.ChunkedArray):
        unique = unique.combine_chunks()
    return unique.take(pc.sort_indices(unique))


def _split_by_bucket(sorted_hashes: pa.Array) -> dict[str, pa.Array]:
    """Sorted hashes cut into their buckets (contiguous once sorted); the buckets are dictionary-encoded, so this
    costs four bytes per hash, not a Python string."""
    return dict(_bucket_ranges(sorted_hashes))


def _bucket_ranges(sorted_hashes: pa.Array):
    """(bucket, slice of ``sorted_hashes``) for each bucket present, in order."""
    encoded = pc.utf8_slice_codeunits(sorted_hashes, 0, 2).dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    stops = np.r_[starts[1:], len(codes)]
    names = encoded.dictionary
    for start, stop in zip(starts, stops, strict=True):
        yield names[codes[start]].as_py(), sorted_hashes.slice(start, stop - start)


def _bucket_of_part(part: str) -> str:
    folder = part.rsplit("/", 2)[-2]
    return folder.removeprefix("bucket=")


def _empty_results() -> pa.Table:
    return STORE_SCHEMA.empty_table().select(["content_hash", *STORED_RESULT])


def first_per_hash(table: pa.Table) -> pa.Table:
    """One row per ``content_hash`` (its first, in table order), computed with an Arrow group-by."""
    if not table.num_rows:
        return table
    indexed = table.append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    firsts = indexed.group_by("content_hash", use_threads=False).aggregate([("_row", "min")]).column("_row_min")
    if len(firsts) == table.num_rows:
        return table
    return table.take(firsts.take(pc.sort_indices(firsts)))
