"""Batch scoring with Ray Data: one Parquet row per input file, resumable and exactly-once.

    list (driver) ─▶ read + decode + crop (CPU tasks) ─▶ DetectorScorer (actor pool, GPU when asked) ─▶ Parquet parts

Nothing is materialised: Ray Data streams blocks through the stages with bounded buffers, so memory stays flat however
large the input. Only the listing (one path string per input) and the set of already-scored paths live on the driver.

Exactly-once, and what it rests on
- The output folder is the checkpoint. Each run writes ``part-<run_id>-<write_uuid>-<task>-<i>.parquet`` files directly
  under the output; Ray names a write task's files deterministically, so a retried write task overwrites its own
  files instead of adding a copy.
- Before running, every existing part's ``path`` column is read. A part that cannot be read (a local file torn by a
  crash mid-write: Parquet writes its footer last, so a readable footer means a complete file) is deleted and its
  rows are simply scored again; on S3 an object only appears once its upload completed, so there is nothing torn.
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
- Assumes one job at a time per output folder (a second concurrent job would see the first one's files in progress
  as torn). ``read_scores`` de-duplicates by path anyway, keeping the latest ``scored_at``, as a last line of defence.
- Ray Data's own checkpointing (``ray.data.checkpoint``) was not used: it keeps a second store of IDs next to the
  output, needs a shared network filesystem for local paths and reserves memory per filter actor, while the output
  here already says exactly which paths are done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FilenameProvider

from mpft_core.imageio import DEFAULT_MAX_PIXELS
from pipelines import storage
from pipelines.storage import StorageConfig

log = logging.getLogger(__name__)

VERDICT_GENERATED = "generated"
VERDICT_REAL = "real"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
# "_" keeps Arrow, Spark and Hive readers of the output folder from taking the record for data.
OUTPUT_RECORD = "_mpft_output.json"

OUTPUT_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("score", pa.float32()),          # probability of "generated"; null when the file could not be scored
    ("verdict", pa.string()),         # "generated" / "real"; null on error
    ("threshold", pa.float64()),
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("model_uri", pa.string()),
    ("error", pa.string()),           # null when scored
    ("width", pa.int32()),            # original size, -1 when undecodable
    ("height", pa.int32()),
    ("scored_at", pa.timestamp("us", tz="UTC")),
])
OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA.names)
# Manifest columns carried through when asked (evaluation needs the labels next to the scores).
LABEL_FIELDS = {"label": pa.int8(), "subset": pa.string(), "split": pa.string()}


# ------------------------------------------------------------------------------------------------ the model bundle


@dataclass
class ModelInfo:
    """A resolved model: a local checkpoint directory plus how it is known (what the output rows name it by).

    ``uri`` names these weights for good where it can: ``models:/name/<version>``, not the alias it came through.
    """

    checkpoint_dir: str
    uri: str
    name: Optional[str] = None
    version: Optional[str] = None


def make_model_bundle(model: ModelInfo) -> dict:
    """The checkpoint as plain data (weights bytes + parsed mpft.json + identity) for shipping to actors.

    Actors on other nodes then need neither the driver's disk nor MLflow access.
    """
    from mpft_core.checkpoint import META_FILE, WEIGHTS_FILE, read_checkpoint_meta

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
    (its threshold sets the verdicts)."""
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
    the others are scored in one forward pass under inference mode.

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
        ok = np.array([e is None for e in errors], dtype=bool)
        scores = np.zeros(n, dtype=np.float32)
        embeddings = None
        if ok.any():
            scores[ok], emb = self._forward(np.asarray(batch["image"])[ok])
            if self.embed:
                embeddings = np.zeros((n, emb.shape[1]), dtype=np.float32)
                embeddings[ok] = emb
        return self._rows(batch, n, errors, ok, scores, embeddings)

    def _forward(self, images: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        import torch

        from mpft_core.transforms import normalize

        pixels = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
        scores = self.detector.score_uint8(pixels).numpy().astype(np.float32)
        if not self.embed:
            return scores, None
        with torch.inference_mode():
            prep = self.detector.preprocess
            x = normalize(pixels.to(self.detector.device), prep.mean, prep.std)
            return scores, self.detector.embed(x).float().cpu().numpy()

    def _rows(self, batch, n, errors, ok, scores, embeddings) -> pa.Table:
        verdicts = np.where(scores >= self.threshold, VERDICT_GENERATED, VERDICT_REAL)
        scored_at = datetime.now(timezone.utc)
        columns = {
            "path": pa.array([str(p) for p in batch["path"]], pa.string()),
            "score": pa.array(scores, pa.float32(), mask=~ok),
            "verdict": pa.array(verdicts, pa.string(), mask=~ok),
            "threshold": pa.array(np.full(n, self.threshold), pa.float64()),
            "model_name": pa.array([self.model_name] * n, pa.string()),
            "model_version": pa.array([self.model_version] * n, pa.string()),
            "model_uri": pa.array([self.model_uri] * n, pa.string()),
            "error": pa.array(errors, pa.string()),
            "width": pa.array(_int_column(batch, "width", n), pa.int32()),
            "height": pa.array(_int_column(batch, "height", n), pa.int32()),
            "scored_at": pa.array([scored_at] * n, pa.timestamp("us", tz="UTC")),
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


def list_part_files(output_uri: str, cfg: Optional[StorageConfig] = None) -> list[str]:
    """Filesystem paths (no scheme) of the Parquet parts directly under ``output_uri``, sorted."""
    fs, root = _output_location(output_uri, cfg)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    names = [i.path for i in infos if i.type == pafs.FileType.File]
    return sorted(p for p in names if Path(p).name.startswith(PART_PREFIX) and p.endswith(PART_SUFFIX))


def committed_paths(output_uri: str, cfg: Optional[StorageConfig] = None,
                    delete_torn: bool = True) -> tuple[set[str], list[str]]:
    """(paths already scored in readable parts, parts found unreadable). Unreadable parts are deleted if asked."""
    done, torn, _ = _scan_parts(output_uri, cfg)
    if delete_torn:
        delete_parts(output_uri, cfg, torn)
    return done, torn


def delete_parts(output_uri: str, cfg: Optional[StorageConfig], parts: list[str]) -> None:
    fs, _ = _output_location(output_uri, cfg)
    for part in parts:
        fs.delete_file(part)


MODEL_COLUMNS = ("model_uri", "model_name", "model_version")


def _scan_parts(output_uri: str, cfg: Optional[StorageConfig]) -> tuple[set, list, set]:
    """(scored paths, torn parts, distinct (model_uri, model_name, model_version) rows) of the parts."""
    fs, _ = _output_location(output_uri, cfg)
    done: set[str] = set()
    torn: list[str] = []
    models: set[tuple] = set()
    for part in list_part_files(output_uri, cfg):
        try:
            table = _read_part_keys(fs, part)
        except (pa.ArrowInvalid, OSError) as err:
            log.warning("output part %s is unreadable (%s): its rows will be scored again", part, err)
            torn.append(part)
            continue
        done.update(table.column("path").to_pylist())
        models.update(_distinct_models(table))
    return done, torn, models


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


def read_scores(output_uri: str, cfg: Optional[StorageConfig] = None, run_id: Optional[str] = None) -> pa.Table:
    """All scored rows under ``output_uri`` (optionally only one run's parts), one row per path (latest wins)."""
    fs, _ = _output_location(output_uri, cfg)
    parts = list_part_files(output_uri, cfg)
    if run_id is not None:
        parts = [p for p in parts if Path(p).name.startswith(f"{PART_PREFIX}{run_id}-")]
    if not parts:
        return OUTPUT_SCHEMA.empty_table()
    table = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in parts], promote_options="permissive")
    return _latest_per_path(table)


def _latest_per_path(table: pa.Table) -> pa.Table:
    if table.num_rows == len(pc.unique(table.column("path"))):
        return table
    order = pc.sort_indices(table, sort_keys=[("path", "ascending"), ("scored_at", "descending")])
    table = table.take(order)
    paths = table.column("path").to_pylist()
    first = [i for i, p in enumerate(paths) if i == 0 or p != paths[i - 1]]
    return table.take(pa.array(first))


def remaining_inputs(manifest: pa.Table, done: set[str]) -> pa.Table:
    """Manifest rows whose path has not been scored yet."""
    if not done:
        return manifest
    already = pc.is_in(manifest.column("path"), value_set=pa.array(sorted(done), pa.string()))
    return manifest.filter(pc.invert(already))


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
        reason = " ".join(str(err).split())  # S3 errors can span lines; the refusal is one
        raise OutputRefused(f"cannot write {uri} ({reason}): --output must be writable") from err


def claim_output(job: ScoreJob, model: ModelInfo, fingerprint: dict[str, str], part_models: set[tuple], *,
                 scored_any: bool, write: bool) -> ModelInfo:
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


def _part_of(part: tuple, model: ModelInfo, started_with: str) -> bool:
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


def _new_record(job: ScoreJob, model: ModelInfo, fingerprint: dict[str, str]) -> OutputRecord:
    return OutputRecord(model_ref=job.model_ref, model_uri=model.uri, model_name=model.name,
                        model_version=model.version, checkpoint_sha256=fingerprint, run_id=job.run_id,
                        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _changed_model_message(job: ScoreJob, record: OutputRecord, fingerprint: dict[str, str]) -> str:
    if record.model_version is not None:
        version = f"version {record.model_version}"
        return (f"{job.output_uri} was started with {record.model_ref} = {version}; rerun with that reference "
                f"(continues with {version}) or use a fresh --output")
    from mpft_core.checkpoint import WEIGHTS_FILE

    changed = next(name for name in fingerprint if record.checkpoint_sha256.get(name) != fingerprint[name])
    what = "weights" if changed == WEIGHTS_FILE else changed
    was, now = (record.checkpoint_sha256.get(changed) or "none")[:12], fingerprint[changed][:12]
    holder = "it now has" if job.model_ref == record.model_ref else f"{job.model_ref} has"
    return (f"{job.output_uri} was started with {record.model_ref} = {what} sha256 {was}, but {holder} {what} "
            f"sha256 {now}; score with the original checkpoint or use a fresh --output")


# --------------------------------------------------------------------------------------------------- the job


@dataclass(kw_only=True)
class ScoringResources:
    """How a scoring pass runs (shared by ``mpft score`` and ``mpft evaluate``): batch and block sizes, the actor
    pool and what each actor gets, CPUs per decode task, the pixel limit, and how much decoded data may wait.

    ``buffer_mib`` caps the object-store memory the pass holds at once (decoded crops queued for the model, scored
    rows queued for the writer). Decoding is far faster than the model on a CPU, so without a cap the decode stage
    runs ahead until Ray Data's default budget (a share of the node's object store) is full: memory would then
    depend on the input's size up to that budget. With the cap, memory is the same for 2k or 20M inputs; a few
    hundred MiB keeps the model fed (one 224 px crop is 147 KiB, so 512 MiB is ~3,500 images). None: Ray's default.
    """

    batch_size: int = 64
    num_actors: Optional[int] = 1     # None: fill the cluster (see pool_size)
    actor_cpus: float = 0.5
    torch_threads: int = 1
    use_gpu: bool = False
    decode_cpus: float = 0.5
    max_pixels: int = DEFAULT_MAX_PIXELS
    rows_per_block: int = 64
    max_tasks_in_flight_per_actor: int = 2
    buffer_mib: Optional[int] = 512

    def pool_size(self, n_rows: Optional[int] = None) -> int:
        """Scoring actors to start: ``num_actors``, or when it is None, enough to fill the cluster (Ray must be up):
        one per GPU with ``use_gpu``, else one per ``torch_threads`` CPU cores, and no more than ``n_rows`` inputs
        make blocks of ``rows_per_block`` (an actor without a block of input would only cost its start-up).

        On CPUs, single-threaded replicas, one per core: alone, they score about as fast as one replica using every
        core, but next to the decode work and Ray's own processes they keep the cores busier. A multi-threaded
        replica waits for its slowest thread at every operation, so any preempted thread stalls all of it, while a
        preempted single-threaded replica stalls only itself (bench/score_throughput.py measures both layouts).
        """
        if self.num_actors:
            return self.num_actors
        cluster = ray.cluster_resources()
        if self.use_gpu:
            fill = int(cluster.get("GPU", 0))
        else:
            fill = int(cluster.get("CPU", 1)) // max(1, self.torch_threads)
        n_blocks = math.ceil(n_rows / self.rows_per_block) if n_rows else fill
        return max(1, min(fill, n_blocks))

    def resources(self) -> dict:
        """Just the ``ScoringResources`` fields, e.g. to build a ``ScoreJob`` from evaluation options."""
        return {f.name: getattr(self, f.name) for f in fields(ScoringResources)}


@dataclass(kw_only=True)
class ScoreJob(ScoringResources):
    """A batch scoring job; plain data (the CLI builds it, tests and the benchmark tune it)."""

    model_ref: str
    input_uri: str
    output_uri: str
    layout: str = "unlabelled"
    storage: Optional[StorageConfig] = None
    rows_per_output_file: int = 4096
    carry_columns: tuple[str, ...] = ()
    # Read and decode inside the scoring actors: one stage instead of decode tasks -> object store -> actors. On a
    # CPU-only node decode and model share the same cores anyway, and this saves the decode tasks' scheduling and
    # the hand-over; on a GPU node leave it off, so CPU tasks decode while the GPU scores.
    decode_in_actor: bool = False
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8])


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
    model: ModelInfo   # as the rows name it: on a resumed output, the model it was started with

    @property
    def n_written(self) -> int:
        return self.n_scored + self.n_errors

    @property
    def images_per_s(self) -> float:
        return self.n_written / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_s": self.images_per_s}


def input_manifest(input_uri: str, layout: str, cfg: Optional[StorageConfig]) -> pa.Table:
    """The files to score: a single image file, a folder/prefix, or a manifest (layout "manifest")."""
    from pipelines import sources

    if layout != "manifest" and Path(input_uri).suffix.lower() in storage.IMAGE_EXTENSIONS:
        return pa.table({"path": [input_uri], "label": pa.nulls(1, pa.int8()), "subset": pa.nulls(1, pa.string()),
                         "split": pa.nulls(1, pa.string())}, schema=sources.MANIFEST_SCHEMA)
    return sources.build_manifest(sources.SourceConfig(uri=input_uri, layout=layout), cfg)


def scored_dataset(manifest: pa.Table, bundle_ref: Any, image_size: int, job: ScoreJob, scorer_cls=None,
                   decoded=None, embed: bool = False):
    """The lazy Ray Dataset decode -> score (no write); ``decoded`` replaces the default read/decode stage, and
    ``job.decode_in_actor`` folds decoding into the scoring actors."""
    from pipelines import ingest

    decode = None  # set when the actors decode: the settings they need
    if decoded is None and job.decode_in_actor:
        decoded = ray.data.from_arrow(ingest.manifest_blocks(manifest, job.rows_per_block))
        decode = decode_settings(image_size, job.max_pixels, job.storage)
    elif decoded is None:
        decoded = ingest.read_images(manifest, job.storage, image_size=image_size, train=False,
                                     max_pixels=job.max_pixels, rows_per_block=job.rows_per_block,
                                     num_cpus=job.decode_cpus)
    size = job.pool_size(manifest.num_rows)
    warn_if_decode_starves(job, size, decodes_in_tasks=decode is None)
    scored = decoded.map_batches(
        scorer_cls or DetectorScorer,
        fn_constructor_kwargs={"model_bundle": bundle_ref, "torch_threads": job.torch_threads,
                               "use_gpu": job.use_gpu, "carry_columns": tuple(job.carry_columns), "embed": embed,
                               "decode": decode},
        batch_size=job.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size,
                                           max_tasks_in_flight_per_actor=job.max_tasks_in_flight_per_actor),
        num_cpus=job.actor_cpus,
        num_gpus=1 if job.use_gpu else 0,
    )
    if job.buffer_mib is not None:
        limit_object_store(scored, job.buffer_mib)
    return scored


def warn_if_decode_starves(job: ScoringResources, size: int, decodes_in_tasks: bool) -> None:
    """Warn when the actor pool reserves so many CPUs that no decode task can be scheduled (the job would stall)."""
    cpus = ray.cluster_resources().get("CPU", 0.0)
    needed = size * job.actor_cpus + (job.decode_cpus if decodes_in_tasks else 0.0)
    if needed > cpus:
        log.warning("%d scoring actors x %.2f CPUs%s need %.2f CPUs but the cluster has %.2f now: unless it scales "
                    "up, the job waits for CPUs forever; lower --actor-cpus or --num-actors", size, job.actor_cpus,
                    f" + {job.decode_cpus} per decode task" if decodes_in_tasks else "", needed, cpus)


def decode_settings(image_size: int, max_pixels: int, storage_cfg: Optional[StorageConfig]) -> dict:
    """What a ``DetectorScorer`` needs to read and decode its own batches (its ``decode`` argument)."""
    return {"image_size": image_size, "max_pixels": max_pixels, "storage": storage.for_workers(storage_cfg)}


def limit_object_store(ds, mib: int) -> None:
    """Cap the object-store memory ``ds``'s execution may hold (its own DataContext copy, not the global one)."""
    options = ds.context.execution_options
    options.resource_limits = options.resource_limits.copy(object_store_memory=mib * 1024 * 1024)


def run_scoring(job: ScoreJob, model: ModelInfo, *, scorer_cls=None) -> ScoreSummary:
    """Score every input of ``job`` not yet in its output; returns counts for this run (Ray must be initialised).

    Raises, before the output changes: ``OutputModelMismatch`` when the output belongs to another model
    (``claim_output``), ``OutputRefused`` when it cannot take its record, ValueError for a malformed checkpoint.
    ``scorer_cls`` swaps the actor class (tests use a subclass that slows down or reports its handle).
    """
    started = time.perf_counter()
    manifest = input_manifest(job.input_uri, job.layout, job.storage)
    done, torn, part_models = _scan_parts(job.output_uri, job.storage)
    todo = remaining_inputs(manifest, done)
    # Read (and mpft.json checked) before the output is claimed: a checkpoint that cannot score claims nothing.
    bundle = make_model_bundle(model)
    # Resuming with another model would skip files the first one scored and mix two models' verdicts: refused
    # before anything under the output changes.
    model = claim_output(job, model, checkpoint_sha256(model.checkpoint_dir, bundle), part_models,
                         scored_any=bool(done), write=todo.num_rows > 0)
    delete_parts(job.output_uri, job.storage, torn)
    skipped = manifest.num_rows - todo.num_rows
    log.info("scoring %d of %d inputs (%d already in %s, %d torn parts removed)", todo.num_rows,
             manifest.num_rows, skipped, job.output_uri, len(torn))
    if todo.num_rows:
        bundle = {**bundle, "uri": model.uri, "name": model.name, "version": model.version}
        ds = scored_dataset(todo, ray.put(bundle), bundle_image_size(bundle), job, scorer_cls)
        fs, root = _output_location(job.output_uri, job.storage)
        ds.select_columns(list(OUTPUT_COLUMNS) + list(job.carry_columns)).write_parquet(
            root, filesystem=fs, filename_provider=PartNames(job.run_id),
            min_rows_per_file=job.rows_per_output_file,
            # Writing is light; a whole CPU per write task would starve decode on small machines.
            ray_remote_args={"num_cpus": 0.1},
        )
    written = read_scores(job.output_uri, job.storage, run_id=job.run_id) if todo.num_rows else None
    n_errors = 0 if written is None else int(written.column("error").is_valid().to_numpy(zero_copy_only=False).sum())
    n_rows = 0 if written is None else written.num_rows
    return ScoreSummary(run_id=job.run_id, output_uri=job.output_uri, n_inputs=manifest.num_rows,
                        n_skipped_already_scored=skipped, n_scored=n_rows - n_errors, n_errors=n_errors,
                        n_torn_parts_removed=len(torn), seconds=time.perf_counter() - started, model=model)
