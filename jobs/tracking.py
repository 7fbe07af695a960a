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
Registry — aliases, never stages
  registered model (default ``mpft-detector``): one version per registered run model; alias ``challenger`` after
  training, ``champion`` after a passed promotion gate; version tags carry provenance (train_run_id, manifest hash)
  and evaluation results (``set_version_tags``). ``resolve_model`` turns any model reference into a local checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
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
              tags: Optional[dict] = None, resume_by_name: bool = False) -> Iterator[mlflow.ActiveRun]:
    """Start (or, with ``resume_by_name``, continue) the run ``run_name`` in ``experiment`` (created if missing).

    Inside another active run the new run is nested under it. The run ends FINISHED on normal exit and FAILED if
    the block raises.
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
        yield run


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
    run whose config changed) is kept as first logged, warned about, and listed in a run tag."""
    _log_params_to_run(MlflowClient(), _active_run_id(), params)


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
    """Log numeric metrics on the active run (nested dicts become dotted names; None values are skipped)."""
    _log_metrics_to_run(MlflowClient(), _active_run_id(), metrics, step)


def log_metrics_to_run(tracking_uri: str, run_id: str, metrics: dict, step: Optional[int] = None) -> None:
    """Log metrics into ``run_id`` from any process (e.g. a Ray Train worker), without an active run."""
    _log_metrics_to_run(MlflowClient(tracking_uri), run_id, metrics, step)


def _log_metrics_to_run(client: MlflowClient, run_id: str, metrics: dict, step: Optional[int]) -> None:
    timestamp = int(time.time() * 1000)
    entities = [Metric(sanitize_key(key), value, timestamp, int(step or 0))
                for key, value in _numeric_items(flatten(metrics))]
    if entities:
        client.log_batch(run_id, metrics=entities, synchronous=True)


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
    """Save a matplotlib figure as an artefact of the active run, then close it (figures hold memory until closed)."""
    try:
        mlflow.log_figure(fig, artifact_file)
    finally:
        _close(fig)


def log_figure_to_run(tracking_uri: str, run_id: str, fig, artifact_file: str) -> None:
    """``log_figure`` for a process without an active run (Ray workers)."""
    try:
        MlflowClient(tracking_uri).log_figure(run_id, fig, artifact_file)
    finally:
        _close(fig)


def _close(fig) -> None:
    import matplotlib.pyplot as plt  # jobs.plots selected the Agg backend before any pyplot import

    plt.close(fig)


def log_artifact_file(path: str, artifact_path: Optional[str] = None) -> None:
    mlflow.log_artifact(path, artifact_path)


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


# ------------------------------------------------------------------------------------------------------- models


def model_signature() -> ModelSignature:
    """Input: ``image`` (encoded bytes). Output: score, verdict, threshold, error (null when the row is fine)."""
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([
            ColSpec("double", "score"),
            ColSpec("string", "verdict", required=False),
            ColSpec("double", "threshold"),
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
            raise ValueError(f"{str(source)!r} is not an MPFT checkpoint: {file_name} is missing")
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
        raise ValueError(f"cannot resolve model {ref!r}: not a registry/run URI, s3:// prefix or local folder")
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
        return Path(tempfile.mkdtemp(prefix="mpft-model-"))
    path = Path(dst_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _find_checkpoint(folder: Path, ref: str) -> Path:
    """``folder`` itself if it is a checkpoint, else the checkpoint inside an MLflow model folder."""
    from jobs.mlflow_model import CHECKPOINT_ARTIFACT

    for candidate in (folder, folder / "artifacts" / CHECKPOINT_ARTIFACT):
        if _is_checkpoint(candidate):
            return candidate
    raise ValueError(f"{ref!r} is not an MPFT checkpoint: no {' + '.join(CHECKPOINT_FILES)} in {folder} "
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
