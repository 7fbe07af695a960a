"""Batch scoring with Ray Data: one Parquet row per input file, resumable and exactly-once.

    list (driver) ─▶ read + decode + crop (CPU tasks) ─▶ DetectorScorer (actor pool, GPU when asked) ─▶ Parquet parts

Nothing is materialised: Ray Data streams blocks through the stages with bounded buffers, so memory stays flat however
large the input. Only the listing (one path string per input) and the already-scored paths live on the driver; with
a score store (``ScoreJob.score_store``, pipelines/score_store.py) also each input's content hash, the reuse plan and
the rows scored, which the driver reads back to store them and to copy duplicates. Those three are held for one pass
of at most ``ScoreJob.inputs_per_pass`` inputs at a time (``scoring_passes``; bench/crawl_scale.py and
bench/score_passes.py measure).

With a score store the driver writes two more kinds of part itself, whole or not at all (``storage.write_atomic``):
``part-<run_id>-reused-<i>.parquet`` (rows copied from the store) before the model runs, and
``part-<run_id>-duplicates-<i>.parquet`` (rows copied from another input of the run with the same bytes) after it.
They are parts like any other for the resume below.

Exactly-once, and what it rests on
- The output folder is the checkpoint. Each run writes ``part-<run_id>-<write_uuid>-<task>-<i>.parquet`` files directly
  under the output; Ray names a write task's files deterministically, so a retried write task overwrites its own
  files instead of adding a copy.
- Before running, every existing part's ``path`` column is read. A part that is not valid Parquet (a local file torn
  by a crash mid-write: Parquet writes its footer last, so a readable footer means a complete file) is deleted and
  its rows are simply scored again; on S3 an object only appears once its upload completed, so there is nothing
  torn. A part that cannot be read at all (an I/O error, a stale NFS handle) stops the run and nothing is deleted.
- Inputs whose path is already in a committed part are skipped; the rest are scored. So after an interrupted run and
  a re-run, every input appears once: rows of the crashed run are either in a complete part (kept, skipped now) or
  nowhere (scored now).
- A scoring actor that dies is restarted by Ray Data and its in-flight batches are retried (actor pool defaults
  ``max_restarts=-1``, ``max_task_retries=-1``); a batch's rows only reach the writer once.
- An output belongs to one model version. Before its first part, a run writes ``_mpft_output.json`` next to the
  parts: the reference as given, the immutable URI it resolved to (``models:/name/<version>``, else the run URI or
  checkpoint path), and the sha256 of the checkpoint files. Once the output holds scores, a rerun whose checkpoint
  files differ is refused before anything is changed, so an alias that moved, or a checkpoint folder retrained in
  place, never mixes two models' verdicts in one output (``mpft score`` continues a rerun with the same alias
  reference on the recorded version). Rows carry the recorded identity. Until the first part, another model takes
  the output over (the record is rewritten): a model that failed to load, or a mistaken ``--model``, binds nothing.
  A run with nothing left to score writes nothing. Outputs from before the record are checked on their parts'
  model URI and version.
- One job at a time per output: before it scans or deletes anything, a run takes the lease ``_mpft_lease.json``
  (run id, host, pid, expiry) and renews it from a daemon thread (every 30 s, for 120 s: ``LeaseSettings``), so a
  second job never takes the first one's parts in progress for torn ones. That job is refused (``OutputLeased``,
  naming the holder and when its lease expires); a lease that expired (its job crashed or stalled), or whose process
  on this machine has exited, is taken over with a warning. The lease is deleted when the run ends, failed or not.
  Creating it is atomic: a hard link locally, ``If-None-Match: *`` on S3; taking over a lapsed one replaces it only
  if unchanged (``If-Match`` on S3; locally a check then a rename, microseconds apart). A store that ignores
  conditional writes is caught by reading the lease back after ``settle_s``: two jobs could then both hold it only
  if one took longer than that between reading the old lease and writing its own. Expiry compares the holder's clock
  with the reader's, so hosts' clocks must agree to well within the TTL. A job whose lease was taken over, or ran
  out while renewals failed, raises ``OutputLeased`` before its record or deletes and after scoring, rather than
  report success over parts another job may have deleted. ``read_scores`` de-duplicates by path anyway, keeping the
  latest ``scored_at``, as a last line of defence.
- Ray Data's own checkpointing (``ray.data.checkpoint``) was not used: it keeps a second store of IDs next to the
  output, needs a shared network filesystem for local paths and reserves memory per filter actor, while the output
  here already says exactly which paths are done.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FilenameProvider

from mpft_core.scoring import score_rows, scored_mask, verdicts
from pipelines import storage
from pipelines.score_store import (
    STORE_SCHEMA,
    STORED_RESULT,
    ScoreStore,
    first_per_hash,
    hash_inputs,
    model_fingerprint,
    plan_reuse,
)
from pipelines.scoring_spec import ResolvedModel, ScoringResources
from pipelines.storage import StorageConfig
from pipelines.store_errors import StoreUnavailable, aws_error, describe, is_store_wide

log = logging.getLogger(__name__)

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
# "_" keeps Arrow, Spark and Hive readers of the output folder from taking the record for data.
OUTPUT_RECORD = "_mpft_output.json"
# With a score store: a small JSON file per run (or pass) naming its parts whose new scores all reached the store.
STORED_MARKERS = "_mpft_stored"

OUTPUT_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("score", pa.float32()),          # probability of "generated"; null when the file could not be scored
    # score >= threshold: "generated"; real_threshold <= score < threshold: "uncertain"; score < real_threshold:
    # "real"; null on error. real_threshold equals threshold when the model has no uncertain band. Parts written
    # before the band existed lack the column (read_scores gives null there; their verdicts used threshold alone).
    ("verdict", pa.string()),
    ("threshold", pa.float64()),
    ("real_threshold", pa.float64()),
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("model_uri", pa.string()),
    ("error", pa.string()),           # null when scored
    ("width", pa.int32()),            # original size, -1 when undecodable
    ("height", pa.int32()),
    ("scored_at", pa.timestamp("us", tz="UTC")),
    # SHA-256 of the file's bytes, null when unreadable (pipelines/score_store.py); and where the score came from:
    # "fresh" (scored by this run's model), "reused" (the score store), "duplicate" (another input of this run with
    # the same bytes). Parts written before these columns lack them (read_scores gives null).
    ("content_hash", pa.string()),
    ("reuse", pa.string()),
])
OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA.names)
REUSE_FRESH, REUSE_STORED, REUSE_DUPLICATE = "fresh", "reused", "duplicate"
# Manifest columns carried through when asked (evaluation needs the labels next to the scores).
LABEL_FIELDS = {"label": pa.int8(), "subset": pa.string(), "split": pa.string()}


# ------------------------------------------------------------------------------------------------ the model bundle


def make_model_bundle(model: ResolvedModel) -> dict:
    """The checkpoint as plain data (weights bytes + parsed mpft.json + identity) for shipping to actors.

    Actors on other nodes then need neither the driver's disk nor MLflow access.
    """
    from mpft_core.checkpoint_format import META_FILE, WEIGHTS_FILE, read_checkpoint_meta

    directory = Path(model.checkpoint_dir)
    meta = read_checkpoint_meta(directory)
    return {
        "weights": (directory / WEIGHTS_FILE).read_bytes(),
        "meta_file": META_FILE,
        "weights_file": WEIGHTS_FILE,
        "meta": meta,
        "uri": model.uri,
        "name": model.name,
        "version": model.version,
    }


def checkpoint_sha256(checkpoint_dir: str, bundle: dict) -> dict[str, str]:
    """sha256 of each checkpoint file by name: the weights (the bundle's bytes, which the actors load) and mpft.json
    (its thresholds set the verdicts)."""
    meta = (Path(checkpoint_dir) / bundle["meta_file"]).read_bytes()
    return {bundle["weights_file"]: hashlib.sha256(bundle["weights"]).hexdigest(),
            bundle["meta_file"]: hashlib.sha256(meta).hexdigest()}


def bundle_image_size(bundle: dict) -> int:
    return int(bundle["meta"]["preprocess"]["image_size"])


def bundle_threshold(bundle: dict) -> float:
    return float(bundle["meta"]["threshold"])


def _load_bundle(bundle: dict, device):
    import json

    from mpft_core.checkpoint import load_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="mpft-model-"))
    try:
        (tmp / bundle["weights_file"]).write_bytes(bundle["weights"])
        (tmp / bundle["meta_file"]).write_text(json.dumps(bundle["meta"]), encoding="utf-8")
        return load_checkpoint(tmp, map_location=device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------- the actor


class DetectorScorer:
    """Ray Data callable class: decoded rows in, score rows out (the ``image`` column is dropped).

    Rows whose ``error`` is set (undecodable, too large, unreadable) keep that error and get a null score and verdict;
    the others are scored together by ``mpft_core.scoring`` (the kernel of the registered MLflow model too).

    Args:
        model_bundle: ``make_model_bundle(...)`` or an ObjectRef to it (``ray.put`` once on the driver).
        torch_threads: intra-op threads for this actor; keep actors x threads <= CPUs so they don't oversubscribe.
        use_gpu: run on the first CUDA device when there is one.
        carry_columns: extra input columns copied to the output (e.g. ``label``, ``subset`` for evaluation).
        embed: also output ``embedding`` (the tower's image embedding) for feature-space plots.
        decode: when given (``decode_batch`` keyword arguments: image_size, max_pixels, storage), batches are
            manifest rows that this actor reads and decodes itself before scoring (``ScoreJob.decode_in_actor``).
    """

    def __init__(self, model_bundle: Any, torch_threads: int = 1, use_gpu: bool = False,
                 carry_columns: tuple[str, ...] = (), embed: bool = False, decode: Optional[dict] = None):
        import torch

        if not isinstance(model_bundle, dict):  # an ObjectRef: resolved here, once per actor
            model_bundle = ray.get(model_bundle)
        torch.set_num_threads(max(1, int(torch_threads)))
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.detector = _load_bundle(model_bundle, device)
        self.threshold = float(self.detector.threshold)
        self.real_threshold = float(self.detector.real_threshold)
        self.model_name = model_bundle.get("name")
        self.model_version = None if model_bundle.get("version") is None else str(model_bundle["version"])
        self.model_uri = model_bundle.get("uri")
        self.carry_columns = tuple(carry_columns)
        self.embed = embed
        self.decode = decode

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if self.decode is not None:
            from pipelines.decode import decode_batch

            batch = decode_batch(batch, train=False, **self.decode)
        n = len(batch["path"])
        errors = [None if e is None or (isinstance(e, float) and math.isnan(e)) else str(e)
                  for e in batch.get("error", [None] * n)]
        images = np.asarray(batch["image"])
        scores = score_rows(self.detector, images, errors)
        ok = scored_mask(errors)
        embeddings = self._embeddings(images, ok) if self.embed else None
        return self._rows(batch, n, errors, ok, scores, embeddings)

    def _embeddings(self, images: np.ndarray, ok: np.ndarray) -> Optional[np.ndarray]:
        """The tower's image embedding of each row (zeros on error rows); None when no row was scored."""
        import torch

        from mpft_core.transforms import normalize

        if not ok.any():
            return None
        pixels = torch.from_numpy(np.ascontiguousarray(images[ok], dtype=np.uint8))
        with torch.inference_mode():
            prep = self.detector.preprocess
            embedded = self.detector.embed(normalize(pixels.to(self.detector.device), prep.mean, prep.std))
        out = np.zeros((len(images), embedded.shape[1]), dtype=np.float32)
        out[ok] = embedded.float().cpu().numpy()
        return out

    def _rows(self, batch, n, errors, ok, scores, embeddings) -> pa.Table:
        scored_at = datetime.now(timezone.utc)
        columns = {
            "path": pa.array([str(p) for p in batch["path"]], pa.string()),
            "score": pa.array(scores, pa.float32(), mask=~ok),
            "verdict": pa.array(verdicts(scores, errors, self.threshold, self.real_threshold), pa.string()),
            "threshold": pa.array(np.full(n, self.threshold), pa.float64()),
            "real_threshold": pa.array(np.full(n, self.real_threshold), pa.float64()),
            "model_name": pa.array([self.model_name] * n, pa.string()),
            "model_version": pa.array([self.model_version] * n, pa.string()),
            "model_uri": pa.array([self.model_uri] * n, pa.string()),
            "error": pa.array(errors, pa.string()),
            "width": pa.array(_int_column(batch, "width", n), pa.int32()),
            "height": pa.array(_int_column(batch, "height", n), pa.int32()),
            "scored_at": pa.array([scored_at] * n, pa.timestamp("us", tz="UTC")),
            "content_hash": _carried(batch.get("content_hash"), n, pa.string()),
            "reuse": pa.array([REUSE_FRESH] * n, pa.string()),
        }
        for name in self.carry_columns:
            columns[name] = _carried(batch.get(name), n, LABEL_FIELDS.get(name, pa.string()))
        if embeddings is not None:
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()),
                                                                     embeddings.shape[1])
        return pa.table(columns)


def _int_column(batch, name: str, n: int) -> np.ndarray:
    values = batch.get(name)
    return np.full(n, -1, dtype=np.int32) if values is None else np.asarray(values).astype(np.int32)


def _carried(values, n: int, arrow_type: pa.DataType) -> pa.Array:
    if values is None:
        return pa.nulls(n, arrow_type)
    cleaned = [None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in list(values)]
    return pa.array(cleaned, arrow_type)


# ----------------------------------------------------------------------------------------- output parts and resume


def _output_location(output_uri: str, cfg: Optional[StorageConfig]) -> tuple[pafs.FileSystem, str]:
    # resolved(): keys taken from this process's environment go into the filesystem object itself, so the write
    # tasks on other nodes (where the driver's environment does not exist) can still log in.
    return storage.resolve(output_uri, (cfg or StorageConfig()).resolved())


def list_part_files(output_uri: str, cfg: Optional[StorageConfig] = None, *, files_only: bool = True) -> list[str]:
    """Filesystem paths (no scheme) of the Parquet parts directly under ``output_uri``, sorted; with
    ``files_only=False`` also anything else named like a part (a folder, a special file), which no reader can read."""
    fs, root = _output_location(output_uri, cfg)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    kinds = {pafs.FileType.File} if files_only else {pafs.FileType.File, pafs.FileType.Directory, pafs.FileType.Unknown}
    names = [i.path for i in infos if i.type in kinds]
    return sorted(p for p in names if Path(p).name.startswith(PART_PREFIX) and p.endswith(PART_SUFFIX))


def delete_parts(output_uri: str, cfg: Optional[StorageConfig], parts: list[str]) -> None:
    fs, _ = _output_location(output_uri, cfg)
    for part in parts:
        fs.delete_file(part)


MODEL_COLUMNS = ("model_uri", "model_name", "model_version")


def scan_parts(output_uri: str, cfg: Optional[StorageConfig] = None) -> tuple[pa.Array, list, set]:
    """(scored paths as one Arrow string array, each once; torn parts; distinct (model_uri, model_name,
    model_version) rows) of the parts; torn parts are only listed (``delete_parts`` removes them). The paths stay
    in Arrow: as Python strings, millions of them would cost the driver several times the memory.

    Torn means not a valid Parquet file (no footer: a local write cut short). A part that cannot be read at all
    (an I/O error, a stale NFS handle, no permission, not a file) raises: ``StoreUnavailable`` on S3, else an
    ``OSError`` naming the part; its rows are not lost to a transient failure."""
    fs, _ = _output_location(output_uri, cfg)
    done: list[pa.ChunkedArray] = []
    torn: list[str] = []
    models: set[tuple] = set()
    # Not only files: something else named like a part may hold rows (a folder mounted there), so it stops the scan.
    for part in list_part_files(output_uri, cfg, files_only=False):
        try:
            table = _read_part_keys(fs, part)
        except pa.ArrowInvalid as err:
            log.warning("output part %s is torn (%s): its rows will be scored again", part, err)
            torn.append(part)
            continue
        except OSError as err:
            reason = " ".join(str(err).split())
            if storage.is_remote(output_uri):
                # S3 parts are whole or absent, so this is the store failing: deleting the part would lose its rows
                found = aws_error(err)
                raise StoreUnavailable(describe(found) if found else f"cannot read {part}: {reason}") from err
            raise OSError(err.errno or errno.EIO, f"cannot read output part ({reason}); nothing was deleted, rerun "
                          "once it can be read", part) from err
        done.append(table.column("path").cast(pa.string()))  # a part written by another tool may say large_string
        models.update(_distinct_models(table))
    paths = pa.chunked_array([c for column in done for c in column.chunks], pa.string()).combine_chunks()
    return pc.unique(pc.drop_null(paths)), torn, models


def _read_part_keys(fs: pafs.FileSystem, part: str) -> pa.Table:
    """The ``path`` and model columns of one part; raises if the file is torn."""
    with fs.open_input_file(part) as handle:
        # Opening reads the footer, which Parquet writes last: a file cut short by a crash fails here.
        parquet = pq.ParquetFile(handle)
        columns = [c for c in ("path",) + MODEL_COLUMNS if c in parquet.schema_arrow.names]
        return parquet.read(columns=columns)


def _distinct_models(table: pa.Table) -> set[tuple]:
    if "model_uri" not in table.column_names:
        return set()
    for name in MODEL_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    distinct = table.select(list(MODEL_COLUMNS)).group_by(list(MODEL_COLUMNS)).aggregate([])
    return {tuple(row[c] for c in MODEL_COLUMNS) for row in distinct.to_pylist() if row["model_uri"] is not None}


def read_scores(output_uri: str, cfg: Optional[StorageConfig] = None, run_id: Optional[str] = None,
                columns: Optional[list[str]] = None) -> pa.Table:
    """All scored rows under ``output_uri`` (optionally only one run's parts), one row per path (latest wins);
    ``columns`` (of ``OUTPUT_SCHEMA``): only those (and ``path``, ``scored_at``), for a reader that needs a few of a
    large output's; a part written before a column existed gives nulls for it."""
    fs, _ = _output_location(output_uri, cfg)
    parts = list_part_files(output_uri, cfg) if run_id is None else run_part_files(output_uri, cfg, run_id)
    return _read_parts(fs, parts, columns)


def run_part_files(output_uri: str, cfg: Optional[StorageConfig], run_id: str) -> list[str]:
    """The parts of run ``run_id`` (and of its passes, ``<run_id>-p<i>``); run ids are unique per output: the
    default is the time and a random id."""
    return [p for p in list_part_files(output_uri, cfg) if Path(p).name.startswith(f"{PART_PREFIX}{run_id}-")]


def _read_parts(fs: pafs.FileSystem, parts: list[str], columns: Optional[list[str]] = None) -> pa.Table:
    schema = OUTPUT_SCHEMA if columns is None else pa.schema(
        [OUTPUT_SCHEMA.field(name) for name in dict.fromkeys(["path", "scored_at", *columns])])
    if not parts:
        return schema.empty_table()
    tables = [_read_part_columns(fs, part, schema.names if columns is not None else None) for part in parts]
    table = with_every_output_column(pa.concat_tables(tables, promote_options="permissive"))
    return _latest_per_path(table.select(schema.names) if columns is not None else table)


def _read_part_columns(fs: pafs.FileSystem, part: str, columns: Optional[list[str]]) -> pa.Table:
    if columns is None:
        return pq.read_table(part, filesystem=fs)
    with fs.open_input_file(part) as handle:  # one open: the schema and the columns from the same file
        parquet = pq.ParquetFile(handle)
        present = set(parquet.schema_arrow.names)  # parts written before a column existed lack it
        return parquet.read(columns=[name for name in columns if name in present])


def with_every_output_column(table: pa.Table) -> pa.Table:
    """``table`` with each ``OUTPUT_SCHEMA`` column it lacks added as nulls (parts written before the column
    existed, e.g. ``real_threshold``), so readers of any output find the same columns."""
    for column in OUTPUT_SCHEMA:
        if column.name not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
    return table


def _latest_per_path(table: pa.Table) -> pa.Table:
    if table.num_rows == len(pc.unique(table.column("path"))):
        return table
    order = pc.sort_indices(table, sort_keys=[("path", "ascending"), ("scored_at", "descending")])
    table = table.take(order)
    paths = table.column("path").to_pylist()
    first = [i for i, p in enumerate(paths) if i == 0 or p != paths[i - 1]]
    return table.take(pa.array(first))


def remaining_inputs(manifest: pa.Table, done: pa.Array) -> pa.Table:
    """Manifest rows whose path is not among the ``done`` paths (``scan_parts``)."""
    if not len(done):
        return manifest
    return manifest.filter(pc.invert(pc.is_in(manifest.column("path"), value_set=done)))


class PartNames(FilenameProvider):
    """Names this run's parts ``part-<run_id>-<write_uuid>-<task>-<i>.parquet``."""

    def __init__(self, run_id: str):
        super().__init__(file_format="parquet")
        self.run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        # Deterministic per task: a retried write overwrites, never duplicates. No extension: Ray appends
        # "-{i}.parquet" (one task may split its rows over several files).
        return f"{PART_PREFIX}{self.run_id}-{write_uuid}-{task_index:06d}"


# ------------------------------------------------------------------------------ which model an output belongs to


class OutputRefused(ValueError):
    """Scoring cannot go on with this output; the message is one line, meant for the user."""


class OutputModelMismatch(OutputRefused):
    """Scoring would put a second model's rows into an output."""


@dataclass(frozen=True)
class OutputRecord:
    """The model an output's rows come from: ``_mpft_output.json`` directly under the output, written before any
    part by the run that starts the output, and rewritten only while the output holds no scores."""

    model_ref: str                      # as the user gave it, e.g. models:/name@champion
    model_uri: str                      # what it resolved to, for good: models:/name/3, runs:/..., checkpoint path
    model_name: Optional[str]
    model_version: Optional[str]
    checkpoint_sha256: dict[str, str]   # checkpoint file name -> sha256 (model.safetensors, mpft.json)
    run_id: str                         # the scoring run that started the output
    started_at: str                     # ISO 8601, UTC

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def read_output_record(output_uri: str, cfg: Optional[StorageConfig] = None) -> Optional[OutputRecord]:
    """The output's record, or None for a new output (or one written before outputs had a record)."""
    uri = storage.join(output_uri, OUTPUT_RECORD)
    if not storage.exists(uri, cfg):
        return None
    try:
        return OutputRecord(**json.loads(storage.read_bytes(uri, cfg)))
    except (ValueError, TypeError) as err:
        raise OutputModelMismatch(f"{uri} is not a readable output record ({err}): restore it or use a fresh "
                                  "--output") from err


def write_output_record(output_uri: str, record: OutputRecord, cfg: Optional[StorageConfig] = None) -> None:
    """Write the record whole or not at all; raises ``OutputRefused`` when the output cannot take it."""
    uri = storage.join(output_uri, OUTPUT_RECORD)
    try:
        storage.write_atomic(uri, record.to_json().encode("utf-8"), cfg)
    except OSError as err:
        found = aws_error(err)
        if found is not None and is_store_wide(found):
            raise StoreUnavailable(describe(found)) from err
        reason = " ".join(str(err).split())  # S3 errors can span lines; the refusal is one
        raise OutputRefused(f"cannot write {uri} ({reason}): --output must be writable") from err


def claim_output(job: ScoreJob, model: ResolvedModel, fingerprint: dict[str, str], part_models: set[tuple], *,
                 scored_any: bool, write: bool) -> ResolvedModel:
    """``model`` as this run's rows must name it; raises ``OutputModelMismatch`` for a model the output is not of.

    The first run records its model (``write``: only a run that will add rows writes); once the output holds scores
    (``scored_any``), a later run must bring the same checkpoint files (``fingerprint``), whatever reference it came
    through, and its rows then carry the recorded identity. Until then, another model takes the output over. The
    parts' own model columns are checked as well: an output from before the record has nothing else to go by.
    """
    record = read_output_record(job.output_uri, job.storage)
    if record is not None and record.checkpoint_sha256 != fingerprint:
        if scored_any:
            raise OutputModelMismatch(_changed_model_message(job, record, fingerprint))
        log.warning("%s was started with %s but holds no scores yet: it is now an output of %s", job.output_uri,
                    record.model_ref, job.model_ref)
        record = None
    if record is not None:
        model = replace(model, uri=record.model_uri, name=record.model_name, version=record.model_version)
    started_with = job.model_ref if record is None else record.model_ref
    foreign = {part for part in part_models if not _part_of(part, model, started_with)}
    if foreign:
        raise OutputModelMismatch(f"{job.output_uri} already holds scores from "
                                  f"{', '.join(sorted(_part_label(p) for p in foreign))}, not {model.uri}: "
                                  f"{_how_to_continue(part_models)}use a fresh --output")
    if record is None and write:
        write_output_record(job.output_uri, _new_record(job, model, fingerprint), job.storage)
    return model


def _part_of(part: tuple, model: ResolvedModel, started_with: str) -> bool:
    """Whether rows naming ``part`` (model_uri, model_name, model_version) come from ``model``. A registry version
    is known by name and number; other rows by the URI or the reference the output was started with."""
    uri, name, version = part
    if version is not None:
        return (name, version) == (model.name, model.version)
    return uri in (model.uri, started_with)


def _part_label(part: tuple) -> str:
    uri, name, version = part
    return uri if version is None else f"{uri} ({name} version {version})"


def _how_to_continue(part_models: set[tuple]) -> str:
    """The ``--model`` that continues an output whose parts all name one model (a registry version pinned, as the
    alias the rows name may have moved since), or nothing when they name several."""
    if len(part_models) != 1:
        return ""
    ((uri, name, version),) = part_models
    return f"rerun with --model {f'models:/{name}/{version}' if name and version else uri} to continue it, or "


def _new_record(job: ScoreJob, model: ResolvedModel, fingerprint: dict[str, str]) -> OutputRecord:
    return OutputRecord(model_ref=job.model_ref, model_uri=model.uri, model_name=model.name,
                        model_version=model.version, checkpoint_sha256=fingerprint, run_id=job.run_id,
                        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _changed_model_message(job: ScoreJob, record: OutputRecord, fingerprint: dict[str, str]) -> str:
    if record.model_version is not None:
        version = f"version {record.model_version}"
        return (f"{job.output_uri} was started with {record.model_ref} = {version}; rerun with that reference "
                f"(continues with {version}) or use a fresh --output")
    from mpft_core.checkpoint_format import WEIGHTS_FILE

    changed = next(name for name in fingerprint if record.checkpoint_sha256.get(name) != fingerprint[name])
    what = "weights" if changed == WEIGHTS_FILE else changed
    was, now = (record.checkpoint_sha256.get(changed) or "none")[:12], fingerprint[changed][:12]
    holder = "it now has" if job.model_ref == record.model_ref else f"{job.model_ref} has"
    return (f"{job.output_uri} was started with {record.model_ref} = {what} sha256 {was}, but {holder} {what} "
            f"sha256 {now}; score with the original checkpoint or use a fresh --output")


# ------------------------------------------------------------------------------------ one job per output: the lease


# "_": Arrow, Spark and Hive readers of the output skip it, as they skip the output record.
OUTPUT_LEASE = "_mpft_lease.json"
# Rivals that keep changing the lease between our read and our write: after this many rounds, theirs is the win.
LEASE_ATTEMPTS = 3
# How long ``release`` waits for a renewal in flight before giving up on deleting the lease.
RELEASE_WAIT_S = 5.0


@dataclass(frozen=True)
class LeaseSettings:
    """How long a job's claim on its output lasts unless renewed, and how often the job renews it."""

    ttl_s: float = 120.0
    renew_every_s: float = 30.0
    # S3 only: the pause before reading the lease back, so a rival's write on a store that ignores conditional
    # headers shows up before this job starts deleting parts.
    settle_s: float = 1.0


class OutputLeased(OutputRefused):
    """Another job holds the output's lease: it is writing parts there now."""


@dataclass(frozen=True)
class Lease:
    """``_mpft_lease.json``: which job holds the output and until when; the holder pushes ``expires_at`` forward
    while it runs."""

    run_id: str
    host: str
    pid: int
    pid_space: str    # the processes ``pid`` is one of (host, boot, pid namespace): only there can it be checked
    token: str        # random per job: tells this job's lease from a rival's with the same run id
    started_at: str   # ISO 8601, UTC
    expires_at: str

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode("utf-8")

    @staticmethod
    def from_bytes(data: bytes) -> Lease:
        return Lease(**json.loads(data))

    def owner(self) -> str:
        return f"scoring run {self.run_id} (host {self.host}, pid {self.pid}, started {_when(self.started_at)})"


def _when(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _utc_in(seconds: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def _pid_space() -> str:
    """Where a pid means one process: this host since its boot, inside this pid namespace (containers sharing a
    host name each have their own pids)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{socket.gethostname()}/{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def new_lease(run_id: str, ttl_s: float) -> Lease:
    return Lease(run_id=run_id, host=socket.gethostname(), pid=os.getpid(), pid_space=_pid_space(),
                 token=uuid.uuid4().hex, started_at=_utc_in(0), expires_at=_utc_in(ttl_s))


def _lapsed_because(lease: Lease) -> Optional[str]:
    """Why ``lease`` no longer protects its job, or None while it does."""
    if datetime.fromisoformat(lease.expires_at) <= datetime.now(timezone.utc):
        return f"it expired at {_when(lease.expires_at)}"
    if lease.pid_space == _pid_space() and not _process_exists(lease.pid):
        return f"pid {lease.pid} on this machine has exited"
    return None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process is there
    except ProcessLookupError:
        return False
    except PermissionError:  # there, but another user's
        return True
    return True


class _LocalLeaseFile:
    """The lease in a local or mounted folder; a version is the content's sha256 (each write's content differs)."""

    settle_s = 0.0  # creating is atomic here: nothing to wait for

    def __init__(self, path: str):
        self.path = Path(path)

    def read(self) -> Optional[tuple[bytes, str]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def create(self, data: bytes) -> Optional[str]:
        """Write ``data`` unless a lease exists; its version, or None when one does."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staged = self._staged(data)
        try:
            os.link(staged, self.path)  # atomic, refuses an existing file, and the lease is whole from the start
        except FileExistsError:
            return None
        finally:
            staged.unlink(missing_ok=True)
        return hashlib.sha256(data).hexdigest()

    def replace(self, data: bytes, version: str) -> Optional[str]:
        """Write ``data`` over the lease if it is still at ``version``; the new version, or None."""
        current = self.read()
        if current is None or current[1] != version:
            return None
        staged = self._staged(data)
        try:
            # Check-then-rename: a rival replacing the same lapsed lease in the same instant could slip between.
            os.replace(staged, self.path)
        finally:
            staged.unlink(missing_ok=True)
        return hashlib.sha256(data).hexdigest()

    def delete(self, version: str) -> None:
        current = self.read()
        if current is not None and current[1] == version:
            self.path.unlink(missing_ok=True)

    def _staged(self, data: bytes) -> Path:
        staged = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")  # hidden from listings
        with open(staged, "xb") as out:
            out.write(data)
        return staged


class _S3LeaseFile:
    """The lease as an S3 object, written with conditional PUTs (``If-None-Match: *`` creates, ``If-Match: <ETag>``
    replaces) through s3fs, as PyArrow's S3 client cannot send them; a version is the object's ETag."""

    def __init__(self, uri: str, cfg: Optional[StorageConfig], settle_s: float):
        self.fs = _s3fs(cfg)
        self.key = uri[len(storage.S3_PREFIX):]
        self.settle_s = settle_s

    def read(self) -> Optional[tuple[bytes, str]]:
        try:
            # The ETag before the body: a body newer than its ETag makes the next If-Match fail, never succeed.
            version = self.fs.info(self.key, refresh=True)["ETag"]
            return self.fs.cat_file(self.key), version
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> Optional[str]:
        return self._put(data, {"IfNoneMatch": "*"})

    def replace(self, data: bytes, version: str) -> Optional[str]:
        return self._put(data, {"IfMatch": version})

    def delete(self, version: str) -> None:
        # Check-then-delete (a conditional DELETE is not offered by every store): a lapsed lease taken over in
        # between would be deleted, and its new holder finds out at its next renewal.
        current = self.read()
        if current is not None and current[1] == version:
            self.fs.rm_file(self.key)

    def _put(self, data: bytes, condition: dict) -> Optional[str]:
        try:
            return self.fs.pipe_file(self.key, data, **condition)["ETag"]
        except FileNotFoundError:  # If-Match on a lease deleted meanwhile
            return None
        except OSError as err:
            code = _s3_error_code(err)
            if isinstance(err, FileExistsError) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            if code != "NotImplemented":
                raise
        log.warning("the store of %s does not take conditional writes: two jobs starting on it in the same second "
                    "may both take its lease", self.key)
        return self.fs.pipe_file(self.key, data)["ETag"]


def _s3fs(cfg: Optional[StorageConfig]):
    import s3fs

    resolved = (cfg or StorageConfig()).resolved()
    secret = {name: None if value is None else value.get_secret_value()
              for name, value in (("key", resolved.access_key), ("secret", resolved.secret_key),
                                  ("token", resolved.session_token))}
    return s3fs.S3FileSystem(**secret, endpoint_url=resolved.endpoint(),
                             client_kwargs={"region_name": resolved.effective_region()})


def _s3_error_code(err: OSError) -> Optional[str]:
    return getattr(err.__cause__, "response", {}).get("Error", {}).get("Code")


def _lease_file(uri: str, cfg: Optional[StorageConfig], settings: LeaseSettings):
    if storage.is_remote(uri):
        return _S3LeaseFile(uri, cfg, settings.settle_s)
    return _LocalLeaseFile(storage.resolve(uri, cfg)[1])


class HeldLease:
    """This job's lease on its output, renewed by a daemon thread every ``renew_every_s`` until ``release``."""

    def __init__(self, file, uri: str, lease: Lease, version: str, settings: LeaseSettings):
        self.file, self.uri, self.lease, self.version, self.settings = file, uri, lease, version, settings
        # Set by the renewer: another job took the lease over, or renewals failed until it expired.
        self.lost = False
        self._released = threading.Event()
        self._renewer = threading.Thread(target=self._renew_until_released, name="mpft-output-lease", daemon=True)
        self._renewer.start()

    def _renew_until_released(self) -> None:
        while not self._released.wait(self.settings.renew_every_s):
            if not self.renew():
                return

    def renew(self) -> bool:
        """Push the expiry ``ttl_s`` ahead; False once the lease is lost (it lapsed and another job took it)."""
        renewed = replace(self.lease, expires_at=_utc_in(self.settings.ttl_s))
        try:
            version = self.file.replace(renewed.to_bytes(), self.version)
        except Exception as err:  # OSError, or botocore's (a refused connection is not one): the renewer must not die
            if self.expired():
                # Rivals see an expired lease as free: from now on another job may take it over at any time.
                self.lost = True
                log.error("lost %s: renewals failed (%s) until it expired at %s, so another job may take the output "
                          "over; rerun this output once both have ended", self.uri, " ".join(str(err).split()),
                          _when(self.lease.expires_at))
                return False
            # The store hiccuped: the lease still has time left, try again at the next beat.
            log.warning("could not renew %s (%s): retrying in %.0f s", self.uri, " ".join(str(err).split()),
                        self.settings.renew_every_s)
            return True
        if version is None:
            self.lost = True
            log.error("lost %s: it lapsed and another job took it over, so that job may delete this run's parts in "
                      "progress; rerun this output once both have ended", self.uri)
            return False
        self.lease, self.version = renewed, version
        return True

    def expired(self) -> bool:
        """Whether the lease as last written has run out (rivals then take it for a crashed job's)."""
        return datetime.fromisoformat(self.lease.expires_at) <= datetime.now(timezone.utc)

    def check(self) -> None:
        """Raise ``OutputLeased`` (one line) once this job can no longer count on the output being its own: the
        lease went to another job, or it expired (renewals failing or hung), so another job may take it."""
        if self.lost or self.expired():
            self.lost = True
            raise OutputLeased(f"scoring run {self.lease.run_id} lost its lease {self.uri} (it expired at "
                               f"{_when(self.lease.expires_at)}; another job may have taken the output over and "
                               "deleted this run's parts): rerun once no other job writes this output")

    def release(self) -> None:
        """Stop renewing and delete the lease unless another job holds it now; never raises (it lapses anyway)."""
        self._released.set()
        # Short: a renewal hung on the store must not hold up the end of the job (SIGTERM cleanup included).
        self._renewer.join(timeout=RELEASE_WAIT_S)
        if self._renewer.is_alive():
            # Deleting now could race the hung renewal, which may still write the lease back; it lapses at its TTL.
            log.warning("not releasing %s: its renewal is still hanging on the store; the output stays locked until "
                        "%s", self.uri, _when(self.lease.expires_at))
            return
        if self.lost:
            return
        try:
            self.file.delete(self.version)
        except OSError as err:
            log.warning("could not release %s (%s): the output stays locked until %s", self.uri,
                        " ".join(str(err).split()), _when(self.lease.expires_at))


def acquire_output_lease(output_uri: str, cfg: Optional[StorageConfig], run_id: str,
                         settings: Optional[LeaseSettings] = None) -> Optional[HeldLease]:
    """Take ``output_uri``'s lease for ``run_id`` and keep it renewed; raises ``OutputLeased`` (one line: the
    holder and when its lease expires) while another job holds a live one. A lapsed lease (expired, or its process
    here has exited) is taken over with a warning. None when this job may not write the output at all."""
    settings = settings or LeaseSettings()
    uri = storage.join(output_uri, OUTPUT_LEASE)
    file = _lease_file(uri, cfg, settings)
    mine = new_lease(run_id, settings.ttl_s)
    try:
        for _ in range(LEASE_ATTEMPTS):
            version = _claim(file, output_uri, mine)
            if version is not None and _still_mine(file, mine):
                return HeldLease(file, uri, mine, version, settings)
        winner = file.read()
    except PermissionError as err:
        # Without write access it can neither delete nor write parts, so no other job's parts are at risk.
        log.warning("cannot write %s (%s): going on without a lease; this job can change nothing in %s", uri,
                    " ".join(str(err).split()), output_uri)
        return None
    except OSError as err:
        raise _lease_failure(uri, err) from err
    raise OutputLeased(_in_use_message(output_uri, _parse_lease(winner[0], uri)) if winner else
                       f"{output_uri}: another job kept changing {OUTPUT_LEASE}; retry once it has ended")


def _claim(file, output_uri: str, mine: Lease) -> Optional[str]:
    """Write ``mine`` over no lease or a lapsed one: the version written, or None when a rival changed the lease in
    between; raises ``OutputLeased`` for a live lease."""
    current = file.read()
    if current is None:
        return file.create(mine.to_bytes())
    data, version = current
    theirs = _parse_lease(data, storage.join(output_uri, OUTPUT_LEASE))
    lapsed = _lapsed_because(theirs)
    if lapsed is None:
        raise OutputLeased(_in_use_message(output_uri, theirs))
    log.warning("taking over %s from %s: %s (that job crashed or stalled)", output_uri, theirs.owner(), lapsed)
    return file.replace(mine.to_bytes(), version)


def _still_mine(file, mine: Lease) -> bool:
    """Read the lease back (after ``settle_s``) and check it is this job's: on a store that ignores conditional
    writes, this is what tells two jobs that both wrote one which of them won."""
    time.sleep(file.settle_s)
    current = file.read()
    try:
        return current is not None and Lease.from_bytes(current[0]).token == mine.token
    except (ValueError, TypeError):
        return False


def _parse_lease(data: bytes, uri: str) -> Lease:
    try:
        return Lease.from_bytes(data)
    except (ValueError, TypeError) as err:
        raise OutputLeased(f"{uri} is not a readable lease ({err}): if no scoring job is writing there, delete it "
                           "and rerun") from err


def _in_use_message(output_uri: str, holder: Lease) -> str:
    return (f"{output_uri} is in use by {holder.owner()}; its lease expires at {_when(holder.expires_at)} unless "
            "that job renews it: wait for it to end or use another --output")


def _lease_failure(uri: str, err: OSError) -> OSError:
    reason = " ".join(str(err).split())
    if storage.is_remote(uri):
        return StoreUnavailable(f"cannot take the lease {uri} ({reason})")
    return OutputRefused(f"cannot write {uri} ({reason}): --output must be writable")


@contextmanager
def output_lease(job: ScoreJob):
    """Hold ``job``'s output lease for the ``with`` block: released at its end, on error too."""
    held = acquire_output_lease(job.output_uri, job.storage, job.run_id, job.lease)
    try:
        yield held
    finally:
        if held is not None:
            held.release()


# --------------------------------------------------------------------------------------------------- the job


@dataclass(kw_only=True)
class ScoreJob:
    """A batch scoring job; plain data (the CLI builds it, tests and the benchmark tune it)."""

    model_ref: str
    input_uri: str
    output_uri: str
    resources: ScoringResources = field(default_factory=ScoringResources)
    layout: str = "unlabelled"
    extensions: Optional[tuple[str, ...]] = None  # ``SourceConfig.extensions``: None lists every non-hidden file
    allow_outside_corpus: bool = False  # ``SourceConfig.allow_outside_corpus``: manifest rows outside its folder
    storage: Optional[StorageConfig] = None
    rows_per_output_file: int = 4096
    carry_columns: tuple[str, ...] = ()
    # Read and decode inside the scoring actors: one stage instead of decode tasks -> object store -> actors. On a
    # CPU-only node decode and model share the same cores anyway, and this saves the decode tasks' scheduling and
    # the hand-over; on a GPU node leave it off, so CPU tasks decode while the GPU scores.
    decode_in_actor: bool = False
    lease: LeaseSettings = field(default_factory=LeaseSettings)
    # The score store (pipelines/score_store.py): inputs whose bytes it holds for this model are not scored again,
    # and inputs of this run with the same bytes are scored once. None: every input is decoded and scored.
    score_store: Optional[str] = None
    # Inputs scored per pass: the driver holds a pass's hashes, reuse plan and rows (with a store: roughly a kilobyte
    # per input), so memory is bounded by this rather than by the crawl. Each pass starts its own actors (seconds).
    inputs_per_pass: int = 1_000_000
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8])

    def __post_init__(self):
        if not isinstance(self.inputs_per_pass, int) or self.inputs_per_pass < 1:
            raise ValueError(f"inputs_per_pass must be a whole number of at least 1, not {self.inputs_per_pass!r}")


@dataclass
class ScoreSummary:
    run_id: str
    output_uri: str
    n_inputs: int
    n_skipped_already_scored: int
    n_scored: int
    n_errors: int
    n_torn_parts_removed: int
    seconds: float
    model: ResolvedModel   # as the rows name it: on a resumed output, the model it was started with
    n_reused: int = 0      # rows copied from the score store (same bytes, same model): no model time
    n_duplicates: int = 0  # rows copied from another input of this run with the same bytes

    @property
    def n_written(self) -> int:
        return self.n_scored + self.n_errors + self.n_reused + self.n_duplicates

    @property
    def images_per_s(self) -> float:
        return self.n_written / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_s": self.images_per_s}


def input_manifest(job: ScoreJob) -> pa.Table:
    """The files to score: a single image file, a folder/prefix, or a manifest (layout "manifest")."""
    from pipelines import sources

    source = sources.SourceConfig(uri=job.input_uri, layout=job.layout,
                                  extensions=list(job.extensions) if job.extensions else None,
                                  allow_outside_corpus=job.allow_outside_corpus)
    return sources.build_manifest(source, job.storage)


def input_stage(manifest: pa.Table, image_size: int, job: ScoreJob) -> tuple[Any, Optional[dict]]:
    """(the rows the scoring actors get, the ``decode_settings`` they decode them with or None): crops decoded by
    read/decode tasks, or with ``job.decode_in_actor`` the manifest rows themselves."""
    from pipelines import ingest

    resources = job.resources
    if job.decode_in_actor:
        rows = ray.data.from_arrow(ingest.manifest_blocks(manifest, resources.rows_per_block))
        return rows, decode_settings(image_size, resources.max_pixels, job.storage)
    return ingest.read_images(manifest, job.storage, image_size=image_size, train=False,
                              max_pixels=resources.max_pixels, rows_per_block=resources.rows_per_block,
                              num_cpus=resources.decode_cpus), None


def scored_dataset(rows, bundle_ref: Any, resources: ScoringResources, *, n_inputs: int,
                   decode: Optional[dict] = None, carry_columns: tuple[str, ...] = (), embed: bool = False,
                   scorer_cls=None):
    """The lazy Ray Dataset that scores ``rows`` (decoded rows, or manifest rows the actors decode with ``decode``)
    of ``n_inputs`` inputs on an actor pool sized by ``resources`` (no write). ``bundle_ref`` and ``carry_columns``,
    ``embed``, ``decode`` go to each ``scorer_cls`` (default ``DetectorScorer``) actor."""
    size = actor_pool_size(resources, n_inputs)
    warn_if_decode_starves(resources, size, decodes_in_tasks=decode is None)
    scored = rows.map_batches(
        scorer_cls or DetectorScorer,
        fn_constructor_kwargs={"model_bundle": bundle_ref, "torch_threads": resources.torch_threads,
                               "use_gpu": resources.use_gpu, "carry_columns": tuple(carry_columns), "embed": embed,
                               "decode": decode},
        batch_size=resources.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=size, max_tasks_in_flight_per_actor=resources.max_tasks_in_flight_per_actor),
        num_cpus=resources.actor_cpus,
        num_gpus=1 if resources.use_gpu else 0,
    )
    if resources.buffer_mib:
        limit_object_store(scored, resources.buffer_mib)
    return scored


def actor_pool_size(resources: ScoringResources, n_rows: Optional[int] = None) -> int:
    """Scoring actors to start: ``num_actors``, or when it is 0, enough to fill the cluster (Ray must be up): one per
    GPU with ``use_gpu``, else one per ``torch_threads`` CPU cores, and no more than ``n_rows`` inputs make blocks of
    ``rows_per_block`` (an actor without a block of input would only cost its start-up).

    On CPUs, single-threaded replicas, one per core: alone, they score about as fast as one replica using every core,
    but next to the decode work and Ray's own processes they keep the cores busier. A multi-threaded replica waits
    for its slowest thread at every operation, so any preempted thread stalls all of it, while a preempted
    single-threaded replica stalls only itself (bench/score_throughput.py measures both layouts).
    """
    if resources.num_actors:
        return resources.num_actors
    cluster = ray.cluster_resources()
    if resources.use_gpu:
        fill = int(cluster.get("GPU", 0))
    else:
        fill = int(cluster.get("CPU", 1)) // max(1, resources.torch_threads)
    n_blocks = math.ceil(n_rows / resources.rows_per_block) if n_rows else fill
    return max(1, min(fill, n_blocks))


def warn_if_decode_starves(resources: ScoringResources, size: int, decodes_in_tasks: bool) -> None:
    """Warn when the actor pool reserves so many CPUs that no decode task can be scheduled (the job would stall)."""
    cpus = ray.cluster_resources().get("CPU", 0.0)
    needed = size * resources.actor_cpus + (resources.decode_cpus if decodes_in_tasks else 0.0)
    if needed > cpus:
        log.warning("%d scoring actors x %.2f CPUs%s need %.2f CPUs but the cluster has %.2f now: unless it scales "
                    "up, the job waits for CPUs forever; lower --actor-cpus or --num-actors", size,
                    resources.actor_cpus, f" + {resources.decode_cpus} per decode task" if decodes_in_tasks else "",
                    needed, cpus)


def decode_settings(image_size: int, max_pixels: int, storage_cfg: Optional[StorageConfig]) -> dict:
    """What a ``DetectorScorer`` needs to read and decode its own batches (its ``decode`` argument)."""
    return {"image_size": image_size, "max_pixels": max_pixels, "storage": storage.for_workers(storage_cfg)}


def limit_object_store(ds, mib: int) -> None:
    """Cap the object-store memory ``ds``'s execution may hold (its own DataContext copy, not the global one)."""
    options = ds.context.execution_options
    options.resource_limits = options.resource_limits.copy(object_store_memory=mib * 1024 * 1024)


def run_scoring(job: ScoreJob, model: ResolvedModel, *, scorer_cls=None) -> ScoreSummary:
    """Score every input of ``job`` not yet in its output; returns counts for this run (Ray must be initialised).

    Raises, before the output changes: ``OutputLeased`` while another job holds the output's lease,
    ``OutputModelMismatch`` when the output belongs to another model (``claim_output``), ``OutputRefused`` when it
    cannot take its record, ValueError for a malformed checkpoint, an ``OSError`` naming a part it cannot read.
    Raises ``OutputLeased`` after scoring too, when this job lost its lease meanwhile (``HeldLease.check``).
    ``scorer_cls`` swaps the actor class (tests use a subclass that slows down or reports its handle).
    """
    # Taken before the scan: another job's parts in progress would look torn and be deleted.
    with output_lease(job) as held:
        return _score_remaining(job, model, scorer_cls, held)


def _check_lease(held: Optional[HeldLease]) -> None:
    if held is not None:  # None: a read-only output, which this job cannot change
        held.check()


def _score_remaining(job: ScoreJob, model: ResolvedModel, scorer_cls, held: Optional[HeldLease]) -> ScoreSummary:
    started = time.perf_counter()
    manifest = input_manifest(job)
    done, torn, part_models = scan_parts(job.output_uri, job.storage)
    todo = remaining_inputs(manifest, done)
    # Read (and mpft.json checked) before the output is claimed: a checkpoint that cannot score claims nothing.
    bundle = make_model_bundle(model)
    # Resuming with another model would skip files the first one scored and mix two models' verdicts: refused
    # before anything under the output changes.
    _check_lease(held)  # the record and the deletes below are only this job's to make while it holds the output
    checkpoint_hashes = checkpoint_sha256(model.checkpoint_dir, bundle)
    model = claim_output(job, model, checkpoint_hashes, part_models, scored_any=len(done) > 0,
                         write=todo.num_rows > 0)
    _check_lease(held)
    delete_parts(job.output_uri, job.storage, torn)
    skipped = manifest.num_rows - todo.num_rows
    log.info("scoring %d of %d inputs (%d already in %s, %d torn parts removed)", todo.num_rows,
             manifest.num_rows, skipped, job.output_uri, len(torn))
    store = None
    if job.score_store:
        device = "cuda" if job.resources.use_gpu else "cpu"
        store = ScoreStore(job.score_store, model_fingerprint(checkpoint_hashes[bundle["weights_file"]],
                                                              bundle["meta"], device), job.storage)
        if len(done):  # even with nothing left to score: the crashed run may have died storing its last scores
            _store_earlier_scores(job, store)
    counts = _row_counts(None)
    bundle = {**bundle, "uri": model.uri, "name": model.name, "version": model.version}
    # Passes bound what the store's work keeps on the driver; without a store rows stream from Ray to the output.
    passes = scoring_passes(job, todo) if store is not None else ([(job, todo)] if todo.num_rows else [])
    fs, _ = _output_location(job.output_uri, job.storage)
    for pass_job, inputs in passes:
        if store is not None:
            _score_through_store(pass_job, inputs, bundle, store, scorer_cls, held)
        else:
            _score_fresh(pass_job, inputs, bundle, scorer_cls)
        # A lease lost while scoring: another job may have deleted this run's parts, so the counts would lie.
        _check_lease(held)
        parts = run_part_files(job.output_uri, job.storage, pass_job.run_id)
        written = _row_counts(_read_parts(fs, parts, columns=["error", "reuse"]))
        counts = {name: counts[name] + written[name] for name in counts}
        if store is not None:  # each pass adds a file per bucket; merging waits until its rows are all written
            _mark_stored(pass_job, store, parts)
            store.compact()
    if store is not None and not todo.num_rows:  # no pass, but earlier scores may just have been stored
        store.compact()
    return ScoreSummary(run_id=job.run_id, output_uri=job.output_uri, n_inputs=manifest.num_rows,
                        n_skipped_already_scored=skipped, n_torn_parts_removed=len(torn),
                        seconds=time.perf_counter() - started, model=model, **counts)


def scoring_passes(job: ScoreJob, todo: pa.Table):
    """(job, inputs) for each pass of at most ``job.inputs_per_pass`` inputs, in manifest order (runs with a score
    store: the hashes, the reuse plan and the pass's rows are the driver's to hold). One pass keeps the job's run id;
    with several, pass i writes as run ``<run_id>-p<i>``, so its parts and store files are its own while
    ``read_scores(run_id=<run_id>)`` still finds every part of the run."""
    step = max(1, job.inputs_per_pass)
    if todo.num_rows <= step:
        if todo.num_rows:
            yield job, todo
        return
    for i, start in enumerate(range(0, todo.num_rows, step)):
        log.info("pass %d of %d: inputs %d-%d", i + 1, math.ceil(todo.num_rows / step), start + 1,
                 min(start + step, todo.num_rows))
        yield replace(job, run_id=f"{job.run_id}-p{i:05d}"), todo.slice(start, step)


def _row_counts(written: Optional[pa.Table]) -> dict[str, int]:
    """n_scored (by the model now), n_errors, n_reused, n_duplicates among this run's rows."""
    if written is None or not written.num_rows:
        return {"n_scored": 0, "n_errors": 0, "n_reused": 0, "n_duplicates": 0}
    failed = written.column("error").is_valid()
    reuse = pc.fill_null(written.column("reuse"), REUSE_FRESH)
    n_errors = int(pc.sum(failed).as_py() or 0)
    n_reused = int(pc.sum(pc.equal(reuse, REUSE_STORED)).as_py() or 0)
    n_duplicates = int(pc.sum(pc.equal(reuse, REUSE_DUPLICATE)).as_py() or 0)
    return {"n_scored": written.num_rows - n_errors - n_reused - n_duplicates, "n_errors": n_errors,
            "n_reused": n_reused, "n_duplicates": n_duplicates}


def _score_fresh(job: ScoreJob, todo: pa.Table, bundle: dict, scorer_cls) -> None:
    """Decode and score ``todo`` (manifest rows) on Ray and write their rows as this run's parts."""
    rows, decode = input_stage(todo, bundle_image_size(bundle), job)
    ds = scored_dataset(rows, ray.put(bundle), job.resources, n_inputs=todo.num_rows, decode=decode,
                        carry_columns=job.carry_columns, scorer_cls=scorer_cls)
    fs, root = _output_location(job.output_uri, job.storage)
    ds.select_columns(list(OUTPUT_COLUMNS) + list(job.carry_columns)).write_parquet(
        root, filesystem=fs, filename_provider=PartNames(job.run_id),
        min_rows_per_file=job.rows_per_output_file,
        # Writing is light; a whole CPU per write task would starve decode on small machines.
        ray_remote_args={"num_cpus": 0.1},
    )


# ------------------------------------------------------------------------------------- scoring through the store


def copied_rows(results: pa.Table, bundle: dict, reuse: str, todo: pa.Table,
                carry_columns: tuple[str, ...]) -> pa.Table:
    """Output rows for inputs whose result is copied (``results``: path, content_hash, score, width, height): the
    verdicts recomputed with the model's thresholds, the model identity of this run, ``reuse`` as given."""
    from mpft_core.checkpoint_format import recorded_real_threshold

    n = results.num_rows
    threshold, real_threshold = bundle_threshold(bundle), recorded_real_threshold(bundle["meta"])
    scores = results.column("score").cast(pa.float32())
    version = None if bundle.get("version") is None else str(bundle["version"])
    columns = {
        "path": results.column("path"),
        "score": scores,
        "verdict": pa.array(verdicts(scores.to_numpy(), None, threshold, real_threshold), pa.string()),
        "threshold": pa.repeat(pa.scalar(threshold, pa.float64()), n),
        "real_threshold": pa.repeat(pa.scalar(real_threshold, pa.float64()), n),
        "model_name": pa.repeat(pa.scalar(bundle.get("name"), pa.string()), n),
        "model_version": pa.repeat(pa.scalar(version, pa.string()), n),
        "model_uri": pa.repeat(pa.scalar(bundle.get("uri"), pa.string()), n),
        "error": pa.nulls(n, pa.string()),
        "width": results.column("width").cast(pa.int32()),
        "height": results.column("height").cast(pa.int32()),
        "scored_at": pa.repeat(pa.scalar(datetime.now(timezone.utc), pa.timestamp("us", tz="UTC")), n),
        "content_hash": results.column("content_hash"),
        "reuse": pa.repeat(pa.scalar(reuse, pa.string()), n),
    }
    table = pa.table(columns, schema=OUTPUT_SCHEMA)
    if carry_columns:
        carried = todo.select(["path", *carry_columns])
        table = table.join(carried, keys="path", join_type="left outer")
    return table


def write_rows_part(job: ScoreJob, table: pa.Table, tag: str) -> None:
    """Write ``table`` as this run's parts ``part-<run_id>-<tag>-<i>.parquet`` (rows_per_output_file rows each)."""
    step = max(1, job.rows_per_output_file)
    for i, start in enumerate(range(0, table.num_rows, step)):
        sink = pa.BufferOutputStream()
        pq.write_table(table.slice(start, step), sink)
        name = storage.join(job.output_uri, f"{PART_PREFIX}{job.run_id}-{tag}-{i:06d}{PART_SUFFIX}")
        storage.write_atomic(name, sink.getvalue().to_pybytes(), (job.storage or StorageConfig()).resolved())


def _score_through_store(job: ScoreJob, todo: pa.Table, bundle: dict, store: ScoreStore, scorer_cls,
                         held: Optional[HeldLease]) -> None:
    """Hash ``todo``, copy what ``store`` holds, score one input per new content, copy it to that content's other
    inputs, and add the new scores to the store. Each input gets one row; after a crash at any point a rerun finds
    the written rows in the output and the stored scores in the store."""
    from mpft_core.imageio import DEFAULT_MAX_BYTES

    resources = job.resources
    hashed = hash_inputs(todo, job.storage, rows_per_block=resources.rows_per_block, num_cpus=resources.decode_cpus,
                         max_bytes=DEFAULT_MAX_BYTES)
    stored = store.lookup(hashed.column("content_hash"))
    # A stored picture over this run's pixel limit would be an error row if scored now: it is scored (and refused).
    pixels = pc.multiply(stored.column("width").cast(pa.int64()), stored.column("height").cast(pa.int64()))
    plan = plan_reuse(todo, hashed, stored.filter(pc.less_equal(pixels, resources.max_pixels)))
    log.info("score store %s: %d inputs reused, %d to score, %d duplicates of those", store.uri,
             plan.reused.num_rows, plan.to_score.num_rows, plan.duplicates.num_rows)
    _check_lease(held)
    if plan.reused.num_rows:
        write_rows_part(job, copied_rows(plan.reused, bundle, REUSE_STORED, todo, job.carry_columns), "reused")
    if plan.to_score.num_rows:
        _score_fresh(job, plan.to_score, bundle, scorer_cls)
    _check_lease(held)
    fresh = _fresh_rows(job)
    store.add(fresh, job.run_id)  # before the copies: a crash now leaves the duplicates to be reused on the rerun
    if not plan.duplicates.num_rows:
        return
    scored = fresh.filter(fresh.column("score").is_valid()).select(["content_hash", *STORED_RESULT])
    copies = plan.duplicates.join(first_per_hash(scored), keys="content_hash", join_type="inner")
    _check_lease(held)
    if copies.num_rows:
        write_rows_part(job, copied_rows(copies, bundle, REUSE_DUPLICATE, todo, job.carry_columns), "duplicates")
    # The one input scored for their content failed (unreadable then, say): each is scored on its own.
    left = pc.invert(pc.is_in(plan.duplicates.column("path"), value_set=copies.column("path")))
    leftover = todo.filter(pc.is_in(todo.column("path"), value_set=plan.duplicates.filter(left).column("path")))
    if leftover.num_rows:
        _check_lease(held)
        _score_fresh(job, leftover, bundle, scorer_cls)
        fresh = _fresh_rows(job)
        # A second file of this run's (the first one, per bucket, is already written).
        store.add(fresh.filter(pc.is_in(fresh.column("path"), value_set=leftover.column("path"))), f"{job.run_id}-2")


def _mark_stored(job: ScoreJob, store: ScoreStore, parts: list[str], name: Optional[str] = None) -> None:
    """Record that every score in ``parts`` (filesystem paths) reached ``store``: ``_mpft_stored/<name>`` (default the
    run id) holding the store's identity (``ScoreStore.identity``: its place and model) and the part names."""
    record = {"store": store.identity, "parts": sorted(Path(p).name for p in parts)}
    storage.write_atomic(storage.join(job.output_uri, STORED_MARKERS, name or job.run_id),
                         json.dumps(record).encode("utf-8"), (job.storage or StorageConfig()).resolved())


def _unmarked_parts(job: ScoreJob, store: ScoreStore) -> list[str]:
    """The output's parts whose scores no marker (``_mark_stored``) of this store and model says were stored."""
    fs, root = _output_location(job.output_uri, job.storage)
    markers = fs.get_file_info(pafs.FileSelector(f"{root.rstrip('/')}/{STORED_MARKERS}", allow_not_found=True))
    identity, stored = store.identity, set()
    for info in markers:
        if info.type != pafs.FileType.File:
            continue
        try:
            with fs.open_input_stream(info.path) as handle:
                record = json.loads(handle.read())
        except (OSError, ValueError):  # unreadable: its parts are read again, which is only slower
            continue
        if isinstance(record, dict) and record.get("store") == identity:
            stored.update(record.get("parts") or ())
    return [p for p in list_part_files(job.output_uri, job.storage) if Path(p).name not in stored]


def _store_earlier_scores(job: ScoreJob, store: ScoreStore) -> None:
    """Add the scores earlier runs of this output computed but did not store (a crash between writing their rows
    and storing them, or runs with another store or none), so that later crawls reuse them too, then mark those
    parts stored. Only unmarked parts are read, a group at a time (about ``job.inputs_per_pass`` rows), only the
    store's columns; every scored row counts, whichever way it got its score (the lookup drops what is known)."""
    fs, _ = _output_location(job.output_uri, job.storage)
    parts = _unmarked_parts(job, store)
    per_group = max(1, job.inputs_per_pass // max(1, job.rows_per_output_file))
    for start in range(0, len(parts), per_group):
        group, name = parts[start:start + per_group], f"{job.run_id}-earlier{start // per_group:05d}"
        written = _read_parts(fs, group, columns=list(STORE_SCHEMA.names))
        fresh = written.filter(pc.and_(written.column("score").is_valid(), written.column("content_hash").is_valid()))
        if fresh.num_rows:
            known = store.lookup(fresh.column("content_hash")).column("content_hash")
            missing = fresh.filter(pc.invert(pc.is_in(fresh.column("content_hash"), value_set=known)))
            if missing.num_rows:
                log.info("score store %s: adding %d scores of earlier runs of %s", store.uri, missing.num_rows,
                         job.output_uri)
                store.add(missing, name)  # its own file name: this run adds its new scores later
        _mark_stored(job, store, group, name=name)


def _fresh_rows(job: ScoreJob) -> pa.Table:
    written = read_scores(job.output_uri, job.storage, run_id=job.run_id)
    return written.filter(pc.equal(pc.fill_null(written.column("reuse"), REUSE_FRESH), REUSE_FRESH))
