"""Experiment tracking and model registry: the only module that talks to MLflow.

(``jobs/mlflow_model.py`` also imports mlflow, only because its pyfunc class must subclass MLflow's.)

What is logged where
--------------------
Run — one per job; ``start_run(..., resume_by_name=True)`` makes a re-run of a training job continue the same run.
  params     <a.b.c>           the resolved job config, flattened (``method.optim.head_lr``); secret-like keys masked
                               (``**********``), values over MLflow's 6000-char limit truncated with a marker
             data.*            manifest hashes and row counts (train job)
  tags       mlflow.runName, mlflow.parentRunId (jobs of a retrain), mpft.params_changed_on_resume (if any),
             job-specific ones via set_run_tags (e.g. retrain.decision)
  metrics    train/*, val/*    per step / epoch, ``step`` = global step or epoch; rank 0 of Ray Train logs through
                               ``log_metrics_to_run`` (a plain client, no active run in a worker). Characters MLflow
                               rejects in names become ``_``.
  artefacts  config.yaml       the same masked config as YAML
             *.png             figures from jobs/plots.py (ROC, subset accuracy bars, TAM mask grid, feature space)
             <name>.parquet    tables (per-subset metrics, ...) + <name>.md, the same table in markdown
             *.md              reports via log_text (e.g. the promotion gate's decision)
  model      "model"           pyfunc (an MLflow 3 logged model linked to the run: ``runs:/<id>/model``): MLmodel,
                               code/ (mpft_core + the scorer), artifacts/checkpoint/{model.safetensors, mpft.json};
                               no pickled torch objects
MLflow unreachable: logging calls (params, metrics, figures, artefact files) do not fail; ``ResilientRunLogger`` keeps
  what the server cannot take (metrics with their step and timestamp) and sends it with a later call once the server
  answers again (after a backoff, so an outage costs no timeouts). What is still unsent when a process stops logging
  into a run (``start_run``'s exit, ``finish_run_logging``) is named in one warning and written to
  ``mlflow-unlogged-<run id>.json`` (+ a folder with the artefacts).
Registry — aliases, never stages
  registered model (default ``mpft-detector``): one version per registered run model; alias ``challenger`` after
  training, ``champion`` after a passed promotion gate; version tags carry provenance (train_run_id, manifest hash)
  and evaluation results (``set_version_tags``). ``resolve_model`` turns any model reference into a local checkpoint.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Optional

import mlflow
import pandas as pd
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, Schema

from mpft_core.config import InputError
from pipelines.scoring_spec import ResolvedModel
from pipelines.storage import SECRET_MASK

log = logging.getLogger(__name__)

# Defence in depth: callers pass already-masked dicts, but a key that looks like a credential is never logged.
_SECRET_KEY = re.compile(r"secret|passw|credential|(^|[_\-.])token($|[_\-.])|api_?key|private_?key|access_?key",
                         re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s:]+:[^/@\s]+@")
MAX_PARAM_VALUE_CHARS = 6000  # MLflow's limit (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
MAX_KEY_CHARS = 250
MAX_TAG_VALUE_CHARS = 5000  # below MLflow's tag limit, also for model-version tags
_TRUNCATION_MARK = "...[truncated]"
_INVALID_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")
CHANGED_PARAMS_TAG = "mpft.params_changed_on_resume"

CHECKPOINT_FILES = ("model.safetensors", "mpft.json")
# What a logged model needs to be loaded elsewhere; pinned to what is installed here. mpft_core itself ships inside
# the model (code_paths), so it is not a requirement.
MODEL_REQUIREMENTS = ("torch", "torchvision", "open_clip_torch", "safetensors", "pillow", "numpy", "pandas",
                      "pydantic")


# --------------------------------------------------------------------------------------------------------- runs


def set_tracking(uri: str) -> None:
    """Point this process at a tracking server (``http://...``) or store (``sqlite:///...``); registry follows."""
    mlflow.set_tracking_uri(uri)


@contextmanager
def start_run(experiment: str, run_name: str, *, parent_run_id: Optional[str] = None,
              tags: Optional[dict] = None, resume_by_name: bool = False,
              unlogged_dir: Optional[str] = None) -> Iterator[mlflow.ActiveRun]:
    """Start (or, with ``resume_by_name``, continue) the run ``run_name`` in ``experiment`` (created if missing).

    Inside another active run the new run is nested under it. The run ends FINISHED on normal exit and FAILED if
    the block raises. Before it ends, what this process buffered for it during an MLflow outage is sent once more;
    what still cannot be sent is written under ``unlogged_dir`` (default: the working directory), see
    ``ResilientRunLogger.close``.
    """
    client = MlflowClient()
    experiment_id = _experiment_id(client, experiment)
    existing = _latest_run_named(client, experiment_id, run_name) if resume_by_name else None
    run_tags = {k: str(v) for k, v in (tags or {}).items()}
    if existing is not None:
        log.info("continuing MLflow run %s (%r) in experiment %r", existing, run_name, experiment)
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id  # start_run ignores parent_run_id when resuming
        run = mlflow.start_run(run_id=existing, nested=mlflow.active_run() is not None, tags=run_tags or None)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_run_id,
                               nested=mlflow.active_run() is not None, tags=run_tags or None)
    with run:
        try:
            yield run
        finally:
            finish_run_logging(mlflow.get_tracking_uri(), run.info.run_id, unlogged_dir)


@contextmanager
def continue_run(run_id: str) -> Iterator[mlflow.entities.Run]:
    """Log into the existing run ``run_id`` again (a sweep registers its best trial's model in that trial's run);
    the yielded run's ``data`` is as it was when the block started. The run keeps its status and end time, whether
    the block succeeds or fails: what is logged afterwards does not change how its training went."""
    client = MlflowClient()
    before = client.get_run(run_id)
    try:
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            try:
                yield before
            finally:
                finish_run_logging(mlflow.get_tracking_uri(), run_id)
    finally:
        if before.info.end_time is not None:
            client.set_terminated(run_id, before.info.status, end_time=before.info.end_time)


def run_params(run_id: str) -> dict[str, str]:
    """The params of an existing run (e.g. which output a scoring run wrote: ``mpft drift``); MLflow's
    RESOURCE_DOES_NOT_EXIST error for an unknown run id."""
    return dict(MlflowClient().get_run(run_id).data.params)


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException as err:  # another job created it between our two calls
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise RuntimeError(f"MLflow experiment {name!r} is deleted; restore it or choose another experiment name")
    return experiment.experiment_id


def _latest_run_named(client: MlflowClient, experiment_id: str, run_name: str) -> Optional[str]:
    """Id of the most recently started live run called exactly ``run_name``, or None."""
    page_token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=_run_name_filter(run_name),
                                  order_by=["attributes.start_time DESC"], max_results=200, page_token=page_token)
        for run in page:
            if run.info.run_name == run_name:
                return run.info.run_id
        page_token = page.token
        if not page_token:
            return None


def _run_name_filter(run_name: str) -> str:
    # MLflow's filter grammar has no escape sequences: quote with a character the name lacks, or (both quote
    # characters present) match the quote-free prefix and let the caller compare names exactly.
    if "'" not in run_name:
        return f"attributes.run_name = '{run_name}'"
    if '"' not in run_name:
        return f'attributes.run_name = "{run_name}"'
    prefix = re.split("['\"]", run_name)[0]
    return f"attributes.run_name LIKE '{prefix}%'"


def _active_run_id() -> str:
    run = mlflow.active_run()
    if run is None:
        # mlflow's fluent API would silently create a stray run here; a missing start_run is a bug.
        raise RuntimeError("no active MLflow run: wrap this in jobs.tracking.start_run(...)")
    return run.info.run_id


# ------------------------------------------------------------------------------------------------------- params


def log_config(cfg: dict, name: str = "config.yaml") -> None:
    """Log the resolved config as a YAML artefact and as flattened params, with secret-like keys masked."""
    masked = _plain(mask_secrets(cfg))
    mlflow.log_text(yaml.safe_dump(masked, sort_keys=False, allow_unicode=True), name)
    log_params(flatten(masked))


def log_params(params: dict) -> None:
    """Log params on the active run. Values are masked/truncated; a key already logged with another value (a resumed
    run whose config changed) is kept as first logged, warned about, and listed in a run tag. Buffered while the
    server is unreachable (``ResilientRunLogger``)."""
    _active_run_logger().log_params(params)


def mask_secrets(value: Any, key: str = "") -> Any:
    """Copy of ``value`` with each entry under a secret-like key replaced by ``SECRET_MASK``, URL passwords removed."""
    if key and _SECRET_KEY.search(key) and not _is_empty(value):
        return SECRET_MASK
    if isinstance(value, Mapping):
        return {k: mask_secrets(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_secrets(v) for v in value]
    if isinstance(value, str):
        return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{SECRET_MASK}@", value)
    return value


def _is_empty(value: Any) -> bool:
    # An unset secret stays visibly unset (None / ""), which is useful when debugging credentials.
    return value is None or (isinstance(value, (str, Mapping, list, tuple)) and len(value) == 0)


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values (logged as JSON), empty dicts are kept as ``{}``."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _log_params_to_run(client: MlflowClient, run_id: str, params: dict) -> None:
    wanted = {}
    for key, value in mask_secrets(dict(params)).items():
        wanted[sanitize_key(str(key))] = _param_value(value)
    existing = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in wanted.items() if k not in existing]
    changed = sorted(k for k, v in wanted.items() if k in existing and existing[k] != v)
    if new:
        client.log_batch(run_id, params=new, synchronous=True)
    if changed:
        # MLflow params are immutable; the YAML artefact of this attempt still records the new values.
        log.warning("run %s already has different values for params %s; keeping the first ones", run_id, changed)
        previous = client.get_run(run_id).data.tags.get(CHANGED_PARAMS_TAG, "")
        keys = sorted(set(filter(None, previous.split(","))) | set(changed))
        client.set_tag(run_id, CHANGED_PARAMS_TAG, _truncate(",".join(keys), MAX_TAG_VALUE_CHARS))


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str, separators=(",", ":"))
    else:
        text = str(value)
    return _truncate(text, MAX_PARAM_VALUE_CHARS)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK


def _plain(value: Any) -> Any:
    """JSON-compatible copy (tuples -> lists, Paths/enums -> str), so YAML dumping never fails on an odd type."""
    return json.loads(json.dumps(value, default=str))


def sanitize_key(key: str) -> str:
    """A param/metric name MLflow accepts: odd characters -> ``_``, no empty/``.``/``..`` path segments, <= 250."""
    cleaned = _INVALID_NAME_CHARS.sub("_", key)
    segments = [("__" if s == ".." else s) for s in cleaned.split("/") if s not in ("", ".")]
    return ("/".join(segments) or "_")[:MAX_KEY_CHARS]


# ------------------------------------------------------------------------------------------------------ metrics


def log_metrics(metrics: dict, step: Optional[int] = None) -> None:
    """Log numeric metrics on the active run (nested dicts become dotted names; None values are skipped). Buffered
    while the server is unreachable (``ResilientRunLogger``)."""
    _active_run_logger().log_metrics(metrics, step)


def log_metrics_to_run(tracking_uri: str, run_id: str, metrics: dict, step: Optional[int] = None) -> None:
    """Log metrics into ``run_id`` from any process (e.g. a Ray Train worker), without an active run; buffered while
    the server is unreachable (a worker calls ``finish_run_logging`` at its end to flush and report the rest)."""
    run_logger(tracking_uri, run_id).log_metrics(metrics, step)


def _metric_entities(metrics: dict, step: Optional[int]) -> list[Metric]:
    """``metrics`` as MLflow metrics stamped now, with sanitised names (TypeError for a value that is no number)."""
    timestamp = int(time.time() * 1000)
    return [Metric(sanitize_key(key), value, timestamp, int(step or 0))
            for key, value in _numeric_items(flatten(metrics))]


def _numeric_items(flat: dict) -> Iterator[tuple[str, float]]:
    for key, value in flat.items():
        if value is None:
            continue  # e.g. an AUC that is undefined for this subset
        try:
            yield key, float(value)  # numpy / torch scalars and bools included
        except (TypeError, ValueError) as err:
            raise TypeError(f"metric {key!r} is not a number: {value!r}") from err


# ---------------------------------------------------------------------------------------------------- artefacts


def log_figure(fig, artifact_file: str) -> None:
    """Save a matplotlib figure as an artefact of the active run, then close it (figures hold memory until closed).
    Kept as a local file while the server is unreachable (``ResilientRunLogger``)."""
    _active_run_logger().log_figure(fig, artifact_file)


def log_figure_to_run(tracking_uri: str, run_id: str, fig, artifact_file: str) -> None:
    """``log_figure`` for a process without an active run (Ray workers)."""
    run_logger(tracking_uri, run_id).log_figure(fig, artifact_file)


def _close(fig) -> None:
    import matplotlib.pyplot as plt  # jobs.plots selected the Agg backend before any pyplot import

    plt.close(fig)


def log_artifact_file(path: str, artifact_path: Optional[str] = None) -> None:
    """A local file as an artefact of the active run (under ``artifact_path``); copied aside while the server is
    unreachable, so the caller may delete its file."""
    _active_run_logger().log_artifact_file(path, artifact_path)


def log_text(text: str, artifact_file: str) -> None:
    """A text artefact (e.g. a markdown report) of the active run."""
    _active_run_id()
    mlflow.log_text(text, artifact_file)


def set_run_tags(tags: dict) -> None:
    """Tags on the active run (values stringified; secret-like keys masked like params)."""
    run_id = _active_run_id()
    masked = mask_secrets(dict(tags))
    MlflowClient().log_batch(run_id, tags=[RunTag(sanitize_key(str(k)), _truncate(str(v), MAX_TAG_VALUE_CHARS))
                                           for k, v in masked.items()], synchronous=True)


def log_table(df: pd.DataFrame, name: str) -> None:
    """``<name>.parquet`` (exact values) and ``<name>.md`` (readable in the MLflow UI); ``name`` may contain ``/``."""
    from mpft_core.metrics import to_markdown

    folder, _, stem = name.rpartition("/")
    with tempfile.TemporaryDirectory(prefix="mpft-table-") as tmp:
        parquet = Path(tmp) / f"{stem}.parquet"
        df.to_parquet(parquet, index=False)
        mlflow.log_artifact(str(parquet), folder or None)
    mlflow.log_text(to_markdown(df), f"{name}.md")


# ------------------------------------------------------------------------------------------ logging through outages

# One quick attempt per call (MLflow's default is 7 retries over ~4 minutes): the buffer and its backoff retry instead.
QUICK_REQUEST_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
FIRST_RETRY_DELAY_S = 2.0
MAX_RETRY_DELAY_S = 60.0
MAX_BUFFERED_METRICS = 100_000
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
UNLOGGED_PREFIX = "mlflow-unlogged-"


@dataclass
class Unlogged:
    """What ``ResilientRunLogger.close`` could not send: counts, and the JSON file / artefact folder holding it."""

    metrics: int
    params: int
    artifacts: int
    json_file: Path
    artifacts_dir: Path


@dataclass
class _PendingArtifact:
    local_path: Path
    artifact_dir: Optional[str]


class ResilientRunLogger:
    """Logs metrics, params and artefacts into one run, keeping what an unreachable server cannot take yet.

    Each call sends what is pending (in order) and then its own items. When the server does not answer (or answers
    5xx) everything stays pending: metrics with their original step and timestamp, params in memory, artefacts as
    files in a private temporary folder. No new attempt is made until a backoff delay has passed (2 s, doubling up to
    60 s), so during an outage a call returns at once instead of waiting for a timeout. A reachable server's refusal
    (4xx, e.g. a bad value) is raised as before. At most ``max_buffered_metrics`` metrics stay in memory; older ones
    move to a file in the temporary folder and are not sent, only reported. ``close`` tries once more and reports what
    is left.
    """

    def __init__(self, tracking_uri: str, run_id: str, max_buffered_metrics: int = MAX_BUFFERED_METRICS):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.max_buffered_metrics = max_buffered_metrics
        self._client = MlflowClient(tracking_uri)
        self._metrics: deque[Metric] = deque()
        self._params: list[dict] = []
        self._artifacts: dict[str, _PendingArtifact] = {}  # by artefact path: a re-logged file replaces the older one
        self._spilled_metrics = 0
        self._spool: Optional[Path] = None
        self._retry_delay = 0.0
        self._next_attempt = 0.0
        self._lock = threading.RLock()

    def __reduce__(self):
        # Shipped to another process (a Ray worker) it starts empty: a buffer belongs to the process that filled it.
        return ResilientRunLogger, (self.tracking_uri, self.run_id, self.max_buffered_metrics)

    # --- logging calls ------------------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        with self._lock:
            self._metrics.extend(_metric_entities(metrics, step))
            self._spill_excess_metrics()
            self._flush_if_due()

    def log_params(self, params: dict) -> None:
        with self._lock:
            self._params.append(dict(params))
            self._flush_if_due()

    def log_figure(self, fig, artifact_file: str) -> None:
        """Save ``fig`` aside (format by the name's suffix), close it, and log that file as ``artifact_file``."""
        with self._lock:
            try:
                local = self._spool_path(artifact_file)
                fig.savefig(local)
            finally:
                _close(fig)
            self._queue_artifact(artifact_file, local)

    def log_artifact_file(self, path: str, artifact_path: Optional[str] = None) -> None:
        name = Path(path).name
        artifact_file = f"{artifact_path.strip('/')}/{name}" if artifact_path else name
        with self._lock:
            local = self._spool_path(artifact_file)
            shutil.copy2(path, local)
            self._queue_artifact(artifact_file, local)

    def pending(self) -> dict[str, int]:
        """How much is waiting: ``{"metrics": n, "params": n, "artifacts": n}`` (spilled metrics included)."""
        with self._lock:
            return {"metrics": len(self._metrics) + self._spilled_metrics,
                    "params": sum(len(p) for p in self._params), "artifacts": len(self._artifacts)}

    # --- sending ------------------------------------------------------------------------------------------------
    def flush(self) -> bool:
        """Send everything pending now, backoff or not; True when nothing is left."""
        with self._lock:
            try:
                with _quick_requests():
                    self._send_params()
                    self._send_metrics()
                    self._send_artifacts()
            except Exception as err:
                if not _is_unreachable(err):
                    raise
                self._schedule_retry(err)
                return False
            self._note_reachable()
            return self._spilled_metrics == 0

    def close(self, report_dir: Optional[str] = None) -> Optional[Unlogged]:
        """Try a last time; then report what could not be sent (one warning with counts), write its metrics and params
        to ``<report_dir>/mlflow-unlogged-<run id>.json`` and its artefacts under ``<report_dir>/mlflow-unlogged-<run
        id>/``, and delete the temporary folder. ``report_dir`` defaults to the working directory. None when all was
        logged."""
        with self._lock:
            self._flush_past_refusals()
            left = self._write_unlogged(Path(report_dir or Path.cwd())) if any(self.pending().values()) else None
            self._discard()
            return left

    def _flush_past_refusals(self) -> None:
        # Raising here would hide the error that ends a run; each refusal drops its item, so this loop ends.
        while True:
            try:
                self.flush()
                return
            except Exception as err:
                log.warning("MLflow server %s refused part of run %s's logging: %s", self.tracking_uri, self.run_id,
                            _first_line(err))

    def _flush_if_due(self) -> None:
        if time.monotonic() >= self._next_attempt:
            self.flush()

    def _send_params(self) -> None:
        while self._params:
            with _removed_unless_unreachable(partial(self._params.pop, 0)):
                _log_params_to_run(self._client, self.run_id, self._params[0])

    def _send_metrics(self) -> None:
        while self._metrics:
            batch = list(islice(self._metrics, MAX_METRICS_PER_BATCH))
            with _removed_unless_unreachable(partial(self._pop_metrics, len(batch))):
                self._client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def _send_artifacts(self) -> None:
        for artifact_file in list(self._artifacts):
            item = self._artifacts[artifact_file]
            with _removed_unless_unreachable(partial(self._forget_artifact, artifact_file)):
                self._client.log_artifact(self.run_id, str(item.local_path), item.artifact_dir)

    def _pop_metrics(self, count: int) -> None:
        for _ in range(count):
            self._metrics.popleft()

    def _forget_artifact(self, artifact_file: str) -> None:
        self._artifacts.pop(artifact_file).local_path.unlink(missing_ok=True)

    def _schedule_retry(self, err: Exception) -> None:
        if self._retry_delay == 0.0:
            log.warning("MLflow server %s unreachable (%s): run %s's logging is buffered and retried; training goes "
                        "on", self.tracking_uri, _first_line(err), self.run_id)
        self._retry_delay = min(max(self._retry_delay * 2, FIRST_RETRY_DELAY_S), MAX_RETRY_DELAY_S)
        self._next_attempt = time.monotonic() + self._retry_delay

    def _note_reachable(self) -> None:
        if self._retry_delay:
            log.info("MLflow server %s reachable again: buffered logging of run %s sent", self.tracking_uri,
                     self.run_id)
        self._retry_delay, self._next_attempt = 0.0, 0.0

    # --- local files --------------------------------------------------------------------------------------------
    def _spool_dir(self) -> Path:
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix="mpft-mlflow-pending-"))
            weakref.finalize(self, shutil.rmtree, self._spool, True)  # also gone if close() is never called
        return self._spool

    def _spool_path(self, artifact_file: str) -> Path:
        # One folder per file: two artefacts with the same name in different artefact folders must not collide.
        folder = Path(tempfile.mkdtemp(dir=self._spool_dir()))
        return folder / Path(artifact_file).name

    def _queue_artifact(self, artifact_file: str, local: Path) -> None:
        folder = str(Path(artifact_file).parent)
        if artifact_file in self._artifacts:
            self._forget_artifact(artifact_file)
        self._artifacts[artifact_file] = _PendingArtifact(local, None if folder == "." else folder)
        self._flush_if_due()

    def _spill_excess_metrics(self) -> None:
        excess = len(self._metrics) - self.max_buffered_metrics
        if excess <= 0:
            return
        with open(self._spool_dir() / "spilled_metrics.jsonl", "a", encoding="utf-8") as out:
            for _ in range(excess):
                out.write(json.dumps(_metric_record(self._metrics.popleft())) + "\n")
        self._spilled_metrics += excess

    def _spilled_records(self) -> list[dict]:
        spilled = self._spool_dir() / "spilled_metrics.jsonl"
        if not spilled.exists():
            return []
        return [json.loads(line) for line in spilled.read_text(encoding="utf-8").splitlines()]

    def _write_unlogged(self, report_dir: Path) -> Unlogged:
        counts = self.pending()
        report_dir.mkdir(parents=True, exist_ok=True)
        json_file = report_dir / f"{UNLOGGED_PREFIX}{self.run_id}.json"
        artifacts_dir = report_dir / f"{UNLOGGED_PREFIX}{self.run_id}"
        records = self._spilled_records() + [_metric_record(m) for m in self._metrics]
        params = {k: v for batch in self._params for k, v in mask_secrets(batch).items()}
        json_file.write_text(json.dumps({"tracking_uri": self.tracking_uri, "run_id": self.run_id, "metrics": records,
                                         "params": _plain(params), "artifacts": sorted(self._artifacts)}, indent=1),
                             encoding="utf-8")
        for artifact_file, item in self._artifacts.items():
            dest = artifacts_dir / artifact_file
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item.local_path, dest)
        log.warning("MLflow server %s: could not log %d metrics, %d params and %d artefacts of run %s; metrics and "
                    "params are in %s, artefacts in %s", self.tracking_uri, counts["metrics"], counts["params"],
                    counts["artifacts"], self.run_id, json_file, artifacts_dir)
        return Unlogged(counts["metrics"], counts["params"], counts["artifacts"], json_file, artifacts_dir)

    def _discard(self) -> None:
        self._metrics.clear()
        self._params.clear()
        self._artifacts.clear()
        self._spilled_metrics = 0
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None


_RUN_LOGGERS: dict[tuple[str, str], ResilientRunLogger] = {}
_RUN_LOGGERS_LOCK = threading.Lock()


def run_logger(tracking_uri: str, run_id: str) -> ResilientRunLogger:
    """This process's logger for ``run_id`` (one per run and server, so what it buffers outlives each call)."""
    with _RUN_LOGGERS_LOCK:
        key = (tracking_uri, run_id)
        if key not in _RUN_LOGGERS:
            _RUN_LOGGERS[key] = ResilientRunLogger(tracking_uri, run_id)
        return _RUN_LOGGERS[key]


def finish_run_logging(tracking_uri: str, run_id: str, report_dir: Optional[str] = None) -> Optional[Unlogged]:
    """Send what this process buffered for ``run_id`` and report what is left (``ResilientRunLogger.close``); call it
    where a process stops logging into a run (``start_run`` does for its own run). None when nothing was left."""
    with _RUN_LOGGERS_LOCK:
        logger = _RUN_LOGGERS.pop((tracking_uri, run_id), None)
    return logger.close(report_dir) if logger is not None else None


def _active_run_logger() -> ResilientRunLogger:
    return run_logger(mlflow.get_tracking_uri(), _active_run_id())


@contextmanager
def _removed_unless_unreachable(remove) -> Iterator[None]:
    """Run ``remove`` once the block has sent its item, or the server refused it (retrying cannot help; the refusal
    is raised); an unreachable server leaves the item pending."""
    try:
        yield
    except Exception as err:
        if not _is_unreachable(err):
            remove()
        raise
    remove()


@contextmanager
def _quick_requests() -> Iterator[None]:
    # MLflow reads these at each request; set only around our own calls, so model logging keeps the patient defaults.
    saved = {name: os.environ.get(name) for name in QUICK_REQUEST_ENV}
    os.environ.update(QUICK_REQUEST_ENV)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _is_unreachable(err: Exception) -> bool:
    """No answer (connection refused, timeout: MLflow wraps those as 500) or a server error: worth retrying later."""
    if isinstance(err, MlflowException):
        return err.get_http_status_code() >= 500
    return isinstance(err, OSError)  # requests' errors (artefact uploads) are OSErrors


def _metric_record(metric: Metric) -> dict:
    return {"key": metric.key, "value": metric.value, "step": metric.step, "timestamp": metric.timestamp}


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


# ------------------------------------------------------------------------------------------------------- models


def model_signature() -> ModelSignature:
    """Input: ``image`` (encoded bytes). Output: score, verdict, threshold, real_threshold, error (null when the
    row is fine)."""
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([
            ColSpec("double", "score"),
            ColSpec("string", "verdict", required=False),
            ColSpec("double", "threshold"),
            ColSpec("double", "real_threshold"),
            ColSpec("string", "error", required=False),
        ]),
    )


def log_detector_model(checkpoint_dir: str, name: str = "model") -> str:
    """Log the checkpoint as the ``MPFTImageScorer`` pyfunc under the active run; returns its model URI.

    Only ``model.safetensors`` and ``mpft.json`` are logged (training checkpoints also hold optimiser state and
    predictions). ``mpft_core`` and the scorer travel as ``code_paths`` so the model loads wherever its pip
    requirements are installed; requirements are given explicitly so MLflow does not load the model to infer them.
    """
    from jobs import mlflow_model

    with tempfile.TemporaryDirectory(prefix="mpft-log-model-") as tmp:
        checkpoint = _stage_checkpoint(Path(checkpoint_dir), Path(tmp) / mlflow_model.CHECKPOINT_ARTIFACT)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=mlflow_model.MPFTImageScorer(),
            artifacts={mlflow_model.CHECKPOINT_ARTIFACT: str(checkpoint)},
            code_paths=_stage_code(Path(tmp) / "code"),
            signature=model_signature(),
            pip_requirements=_pinned_requirements(),
        )
    return info.model_uri


def _stage_checkpoint(source: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for file_name in CHECKPOINT_FILES:
        if not (source / file_name).is_file():
            raise InputError(f"{str(source)!r} is not an MPFT checkpoint: {file_name} is missing")
        shutil.copy2(source / file_name, dest / file_name)
    return dest


def _stage_code(dest: Path) -> list[str]:
    """``mpft_core/`` and a ``jobs/`` package holding only the scorer: the importable names the pickled model uses."""
    import mpft_core
    from jobs import mlflow_model

    core = dest / "mpft_core"
    shutil.copytree(Path(mpft_core.__file__).parent, core, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    jobs_pkg = dest / "jobs"
    jobs_pkg.mkdir()
    (jobs_pkg / "__init__.py").write_text("", encoding="utf-8")
    shutil.copy2(mlflow_model.__file__, jobs_pkg / "mlflow_model.py")
    return [str(core), str(jobs_pkg)]


def _pinned_requirements() -> list[str]:
    pins = []
    for dist in MODEL_REQUIREMENTS:
        version = importlib.metadata.version(dist).split("+")[0]  # drop local tags such as +cu130
        pins.append(f"{dist}=={version}")
    return pins


def register_model(model_uri: str, name: str, tags: Optional[dict] = None) -> str:
    """Register ``model_uri`` as a new version of ``name`` (created if needed); returns the version number."""
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()})
    return str(version.version)


def set_alias(name: str, alias: str, version) -> None:
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def get_alias_version(name: str, alias: str) -> Optional[str]:
    """The version ``alias`` points at, or None if the alias (or the registered model) does not exist."""
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):  # no such registered model
            return None
        # A missing alias on an existing model comes back as INVALID_PARAMETER_VALUE ("alias ... not found").
        if err.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE) and "not found" in err.message:
            return None
        raise


def set_version_tags(name: str, version, tags: dict) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, _truncate(str(value), MAX_TAG_VALUE_CHARS))


# ---------------------------------------------------------------------------------------------- model resolution


_MODELS_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)/?$")
_MODELS_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)/?$")


def training_config_of(name: str, version) -> Optional[dict]:
    """The ``config.yaml`` logged by the run that trained a registered version (its ``train_run_id`` tag, else the
    run that logged the model), parsed; None when there is no such run or file."""
    import yaml

    model_version = MlflowClient().get_model_version(name, str(version))
    run_id = model_version.tags.get("train_run_id") or model_version.run_id
    if not run_id:
        return None
    try:
        return yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")) or {}
    except (MlflowException, OSError):
        return None


def resolve_model(ref: str, storage_cfg=None, *, dst_dir: Optional[str] = None) -> ResolvedModel:
    """Turn any model reference into a local checkpoint folder, named for good (``ResolvedModel.uri``).

    ``models:/name@alias`` (named ``models:/name/<the version it points to now>``) and ``models:/name/version``
    (registry), ``runs:/<id>/model`` and other MLflow model URIs are downloaded; a local checkpoint folder (or a
    downloaded MLflow model folder; ``file://`` optional) is used in place, named by its absolute path, and needs no
    tracking server; an ``s3://`` checkpoint prefix has its two files fetched through ``pipelines.storage``.
    Downloads go to ``dst_dir``; without one, MLflow downloads go to a new temporary folder the caller owns and S3
    files to storage's reusable cache. ValueError when the reference names no MPFT checkpoint.
    """
    if m := _MODELS_ALIAS.match(ref):
        version = str(MlflowClient().get_model_version_by_alias(m["name"], m["alias"]).version)
        return _download_model(f"models:/{m['name']}/{version}", dst_dir, m["name"], version)
    if m := _MODELS_VERSION.match(ref):
        MlflowClient().get_model_version(m["name"], m["version"])  # fail with MLflow's message if it is missing
        return _download_model(f"models:/{m['name']}/{m['version']}", dst_dir, m["name"], m["version"])
    if ref.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        return _download_model(ref, dst_dir, None, None)
    if ref.startswith("s3://"):
        cache = _new_dir(dst_dir) if dst_dir is not None else None  # None: storage's shared download cache
        return ResolvedModel(_fetch_s3_checkpoint(ref, storage_cfg, cache), ref)
    local = Path(ref.removeprefix("file://")).resolve()
    if not local.is_dir():
        raise InputError(f"cannot resolve model {ref!r}: not a registry/run URI, s3:// prefix or local folder")
    return ResolvedModel(str(_find_checkpoint(local, ref)), str(local))


def is_alias_reference(ref: str) -> bool:
    """Whether ``ref`` is ``models:/name@alias`` (a name for whichever version the alias points to now)."""
    return _MODELS_ALIAS.match(ref) is not None


def alias_target(ref: str) -> Optional[str]:
    """``models:/name/<version>`` that the alias reference ``ref`` names now; None when ``ref`` is no alias
    reference, or the alias is not set."""
    m = _MODELS_ALIAS.match(ref)
    version = get_alias_version(m["name"], m["alias"]) if m else None
    return None if version is None else f"models:/{m['name']}/{version}"


def _download_model(uri: str, dst_dir: Optional[str], name: Optional[str], version: Optional[str]) -> ResolvedModel:
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(_new_dir(dst_dir)))
    return ResolvedModel(str(_find_checkpoint(Path(local), uri)), uri, name, version)


def _new_dir(dst_dir: Optional[str]) -> Path:
    if dst_dir is None:
        # Removed when this process exits (SIGTERM included: the CLI turns it into an exception): the jobs hand the
        # model to Ray as bytes, so nothing outlives the driver that needs this copy.
        path = Path(tempfile.mkdtemp(prefix="mpft-model-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        return path
    path = Path(dst_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _find_checkpoint(folder: Path, ref: str) -> Path:
    """``folder`` itself if it is a checkpoint, else the checkpoint inside an MLflow model folder."""
    from jobs.mlflow_model import CHECKPOINT_ARTIFACT

    for candidate in (folder, folder / "artifacts" / CHECKPOINT_ARTIFACT):
        if _is_checkpoint(candidate):
            return candidate
    raise InputError(f"{ref!r} is not an MPFT checkpoint: no {' + '.join(CHECKPOINT_FILES)} in {folder} "
                     f"(nor in its artifacts/{CHECKPOINT_ARTIFACT}/)")


def _is_checkpoint(folder: Path) -> bool:
    return all((folder / f).is_file() for f in CHECKPOINT_FILES)


def _fetch_s3_checkpoint(prefix: str, storage_cfg, cache_dir: Optional[Path]) -> str:
    """Download the two checkpoint files (not optimiser state etc.) into ``pipelines.storage``'s cache layout
    ``<cache>/<bucket>/<key>``, so both land side by side and unchanged files are not fetched again."""
    from pipelines import storage

    fetched = [storage.fetch_to_local(storage.join(prefix, name), storage_cfg, cache_dir=cache_dir)
               for name in CHECKPOINT_FILES]
    return str(fetched[0].parent)
