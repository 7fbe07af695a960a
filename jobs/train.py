"""`mpft train`: the driver side of a training run.

Builds the manifests, starts the Ray Train job, and does everything MLflow-related on the driver except the
per-epoch metrics, which rank 0 logs through `MlflowRankZeroLogger` while training runs.

Re-running a run name resumes that run. Its folder (``<checkpoint_root>/<name>``) holds ``mpft_run.json``: the
settings that shape the model (``method``, ``train``, ``val``, ``max_pixels``) and the manifest hashes of its data.
A re-run whose settings or data differ is refused before anything starts, unless ``resume="force"``: continuing
another run's checkpoints would mix two trainings under one name. Only ``method.optim.epochs`` may change (train a
finished run for longer). A run whose checkpoints all fail their check is refused too (see pipelines/training.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import plots, tracking
from jobs.config import TrainJobConfig
from mpft_core.backbone import input_size, read_weights_metadata, resolve_architecture
from mpft_core.config import BackboneConfig, InputError, ThresholdConfig
from pipelines import ingest, sources, storage, training
from pipelines.runtime import init_ray

log = logging.getLogger(__name__)

RUN_RECORD_FILE = "mpft_run.json"
# What makes two runs the same training: change any of these and the checkpoints belong to another model.
RUN_DEFINING_KEYS = ("method", "train", "val", "max_pixels")
# Continuing a finished run for more epochs is what a resume is for.
MAY_CHANGE_ON_RESUME = frozenset({"method.optim.epochs"})
ResumeMode = Literal["auto", "force"]
RESUME_MODES = ("auto", "force")


@dataclass
class TrainOutcome:
    run_id: str
    checkpoint_dir: str  # where the best checkpoint stays: a local folder or an s3:// URI
    model_uri: Optional[str]
    model_version: Optional[str]
    metrics: dict  # what the epoch of the kept (best) checkpoint reported: val_loss, val_mean_acc, ...


class MlflowRankZeroLogger:
    """Picklable handle rank 0 uses to log into the driver's MLflow run."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        tracking.log_metrics_to_run(self.tracking_uri, self.run_id, metrics, step=step)

    def log_training_masks(self, images: np.ndarray, masks: np.ndarray, grid_size: int) -> None:
        fig = plots.mask_grid(images, masks, grid_size)
        tracking.log_figure_to_run(self.tracking_uri, self.run_id, fig, "tam_masks.png")

    def close(self) -> None:
        tracking.finish_run_logging(self.tracking_uri, self.run_id)


def check_backbone_weights(backbone: BackboneConfig, storage_cfg) -> None:
    """Refuse on the driver, before Ray starts, a weight file whose activation nobody states (or that contradicts
    backbone.activation); each worker would otherwise fail the same way after ingest, and be retried. Reads only
    the file's header; open_clip tags and random init need nothing here."""
    source = backbone.pretrained
    if source is None or not (storage.is_remote(source) or Path(source).exists()):
        return
    try:
        metadata = read_weights_metadata(lambda n: storage.read_prefix(source, n, storage_cfg), origin=source)
        resolve_architecture(backbone, weights_metadata=metadata)
    except ValueError as err:
        raise RefusedToStart(str(err)) from err


class RefusedToStart(InputError):
    """A training job that cannot be right, found before Ray or MLflow start (the CLI prints it as one line)."""


class ValidationNotHeldOutError(RefusedToStart):
    """Validation images that are also training images: checkpoint choice and threshold would be biased."""


class ChangedRunError(RefusedToStart):
    """A re-run of a run name with other settings or data than the run it would resume."""


def run_train(cfg: TrainJobConfig, tracking_uri: str, parent_run_id: Optional[str] = None, *,
              verbose: bool = False, resume: ResumeMode = "auto") -> TrainOutcome:
    """Train, log to MLflow under ``parent_run_id`` if given, register the best checkpoint as ``challenger``.
    RefusedToStart, before Ray or MLflow start, for a job that cannot be right. ``verbose``: Ray's own progress and
    INFO lines on the console too (else one line per epoch). ``resume``: "auto" resumes a same-name run only if its
    settings and data are unchanged (ChangedRunError otherwise); "force" resumes it under the new ones."""
    if resume not in RESUME_MODES:
        raise InputError(f"resume must be one of {RESUME_MODES}, not {resume!r}")
    # Manifests first: a leaky validation set is refused before Ray or MLflow start.
    train_manifest = labelled_manifest(cfg.train, cfg.storage)
    val_manifest = labelled_manifest(cfg.val, cfg.storage)
    check_validation_is_held_out(train_manifest, val_manifest)
    check_calibration_classes(cfg.method.threshold, val_manifest)
    val_pairs = validation_pairs(cfg.val, val_manifest)
    check_backbone_weights(cfg.method.detector.backbone, cfg.storage)
    record = run_record(cfg, train_manifest, val_manifest)
    check_resumable(cfg, record, force=resume == "force")
    init_ray(cfg.ray_address, verbose=verbose)
    tracking.set_tracking(tracking_uri)
    size = input_size(cfg.method.detector.backbone)
    # Undecodable files are reported by ingest as error rows; training and validation skip them.
    # Manifests are sorted by path, i.e. grouped by class and generator: shuffle the rows once (cheap, paths only)
    # so that every block, and with the loop's local shuffle buffer every batch, mixes classes and subsets.
    train_rows = shuffled(train_manifest, seed=cfg.method.optim.seed)
    # Training rows are decoded as windows of augment.window(size) (the input size unless crop_jitter > 0); the
    # training loop crops the input size from them anew every epoch.
    train_ds = ingest.for_training(ingest.read_images(train_rows, cfg.storage, image_size=size, train=True,
                                                      window=cfg.method.augment.window(size),
                                                      max_pixels=cfg.max_pixels, seed=cfg.method.optim.seed))
    val_ds = ingest.drop_errors(ingest.read_images(val_manifest, cfg.storage, image_size=size, train=False,
                                                   max_pixels=cfg.max_pixels))
    if cfg.cache_decoded:
        train_ds, val_ds = train_ds.materialize(), val_ds.materialize()

    with tracking.start_run(cfg.tracking.experiment, run_name=cfg.name, parent_run_id=parent_run_id,
                            resume_by_name=True) as run:
        tracking.log_config(cfg.to_dict())
        tracking.log_params({
            "data.train_manifest_hash": sources.manifest_hash(train_manifest),
            "data.val_manifest_hash": sources.manifest_hash(val_manifest),
            "data.train_rows": train_manifest.num_rows,
            "data.val_rows": val_manifest.num_rows,
        })
        loop_config = training.LoopConfig(
            method=cfg.method.to_dict(),
            storage=cfg.storage.to_dict(reveal_secrets=True),
            steps_per_epoch=training.steps_per_epoch(train_manifest.num_rows, cfg.method.optim.batch_size,
                                                     cfg.scaling.num_workers),
            log_every_steps=cfg.log_every_steps,
            torch_threads=cfg.scaling.torch_threads,
            inject_failure_at_step=cfg.inject_failure_at_step,
            real_pairs=val_pairs,
            verbose=verbose,
        )
        trainer = training.build_trainer(
            name=cfg.name, loop_config=loop_config, logger=MlflowRankZeroLogger(tracking_uri, run.info.run_id),
            train_ds=train_ds, val_ds=val_ds, checkpoint_root=cfg.checkpoint_root, storage_cfg=cfg.storage,
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
            cpus_per_worker=cfg.scaling.cpus_per_worker, keep_checkpoints=cfg.keep_checkpoints,
            max_failures=cfg.max_failures,
        )
        write_run_record(cfg, record)
        result = trainer.fit()
        # The local copy of the best checkpoint lives only for this block; the outcome names where it stays.
        with training.best_checkpoint(result) as best:
            _log_validation_plots(best.local_dir)
            model_uri = version = None
            if cfg.tracking.registered_model:
                model_uri = tracking.log_detector_model(str(best.local_dir))
                version = tracking.register_model(model_uri, cfg.tracking.registered_model, tags={
                    "train_run_id": run.info.run_id,
                    "train_manifest_hash": sources.manifest_hash(train_manifest),
                })
                tracking.set_alias(cfg.tracking.registered_model, "challenger", version)
                log.info("registered %s version %s as challenger", cfg.tracking.registered_model, version)
        return TrainOutcome(run.info.run_id, best.location, model_uri, version, best.metrics)


def run_folder(cfg: TrainJobConfig) -> str:
    """``<checkpoint_root>/<name>``: where Ray Train keeps the run's checkpoints and this module its record."""
    return storage.join(cfg.checkpoint_root, cfg.name)


def run_record(cfg: TrainJobConfig, train_manifest: pa.Table, val_manifest: pa.Table) -> dict:
    """What identifies the training a run name stands for: its model-shaping settings and its data's hashes."""
    config = cfg.to_dict()
    record = {"config": {key: config[key] for key in RUN_DEFINING_KEYS},
              "data": {"train_manifest_hash": sources.manifest_hash(train_manifest),
                       "val_manifest_hash": sources.manifest_hash(val_manifest)}}
    return json.loads(json.dumps(record))  # as it reads back from the file (tuples become lists), so equal compares


def write_run_record(cfg: TrainJobConfig, record: dict) -> None:
    storage.write_atomic(storage.join(run_folder(cfg), RUN_RECORD_FILE),
                         json.dumps(record, indent=2, sort_keys=True).encode(), cfg.storage)


def read_run_record(cfg: TrainJobConfig) -> Optional[dict]:
    uri = storage.join(run_folder(cfg), RUN_RECORD_FILE)
    if not storage.exists(uri, cfg.storage):
        return None
    try:
        return json.loads(storage.read_bytes(uri, cfg.storage))
    except ValueError as err:
        raise RefusedToStart(f"{uri} is unreadable ({err}); delete it to resume the run without checking its "
                             "settings, or choose a new run name (--name)") from err


def check_resumable(cfg: TrainJobConfig, record: dict, *, force: bool) -> None:
    """Refuse (before Ray starts) a re-run that would resume a run trained with other settings or data, unless
    ``force``, and a run whose checkpoints are all broken."""
    fs, folder = storage.resolve(run_folder(cfg), cfg.storage)
    checkpoints = training.checkpoint_folders(fs, folder)
    if not checkpoints:
        return  # nothing to resume: a new run, or one that stopped before its first checkpoint
    try:
        training.resume_checkpoint_path(fs, checkpoints[0])
    except training.NoUsableCheckpoint as err:
        raise RefusedToStart(str(err)) from err
    saved = read_run_record(cfg)
    if saved is None:
        log.warning("run %r has no %s (started by an older version): resuming it without checking its settings",
                    cfg.name, RUN_RECORD_FILE)
        return
    changes = run_changes(with_current_defaults(saved), record)
    if not changes:
        return
    if force:
        log.warning("resuming run %r under changed settings (--resume force): %s", cfg.name, "; ".join(changes))
        return
    raise ChangedRunError(
        f"run {cfg.name!r} in {run_folder(cfg)} was trained with other settings: {'; '.join(changes)}. "
        "Resume it anyway with `--resume force`, or start a separate run with a new name (--name)")


def with_current_defaults(saved: dict) -> dict:
    """A run record with the settings this version added filled in at their defaults (validated through today's
    config), so that a run recorded before a new, default-off setting existed still resumes; a record today's config
    refuses (a removed setting) is compared as it is."""
    from pydantic import ValidationError

    config = saved.get("config", {})
    try:
        # name, train and val are required fields: any valid stand-ins do, only the defining keys are kept.
        full = TrainJobConfig.from_dict({"name": "saved", "train": [], "val": [], **config}).to_dict()
    except ValidationError:
        return saved
    return {**saved, "config": {key: full[key] for key in config}}


def run_changes(saved: dict, new: dict) -> list[str]:
    """What differs between two run records, for a person: changed config keys, then "training data changed" /
    "validation data changed"."""
    keys = differing_keys(saved.get("config", {}), new["config"]) - MAY_CHANGE_ON_RESUME
    changes = [f"config {', '.join(sorted(keys))} changed"] if keys else []
    saved_data = saved.get("data", {})
    if saved_data.get("train_manifest_hash") != new["data"]["train_manifest_hash"]:
        changes.append("training data changed")
    if saved_data.get("val_manifest_hash") != new["data"]["val_manifest_hash"]:
        changes.append("validation data changed")
    return changes


def differing_keys(old, new, prefix: str = "") -> set[str]:
    """Dotted keys (``method.optim.lr``, ``train[0].uri``) whose values differ between two JSON-like values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {key for name in old.keys() | new.keys()
                for key in differing_keys(old.get(name), new.get(name), f"{prefix}.{name}" if prefix else name)}
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = enumerate(zip(old, new, strict=True))
        return {key for i, (a, b) in pairs for key in differing_keys(a, b, f"{prefix}[{i}]")}
    return set() if old == new else {prefix}


def check_calibration_classes(threshold: ThresholdConfig, val_manifest: pa.Table) -> None:
    """Refuse, before Ray starts, a calibration target whose class the validation set lacks (it would fail after the
    first epoch): ``target_fpr`` needs real images, ``target_miss_rate`` generated ones."""
    labels = set(pc.unique(val_manifest.column("label")).to_pylist())
    for target, value, label, kind in (("target_fpr", threshold.target_fpr, 0, "real"),
                                       ("target_miss_rate", threshold.target_miss_rate, 1, "generated")):
        if value is not None and label not in labels:
            raise InputError(f"method.threshold.{target} is set, but the validation sources hold no {kind} images to "
                             "calibrate it on")


def check_validation_is_held_out(train_manifest: pa.Table, val_manifest: pa.Table) -> None:
    """Raise ValidationNotHeldOutError if any validation path is also a training path."""
    shared = pc.is_in(val_manifest["path"], value_set=train_manifest["path"])
    n_shared = pc.sum(shared).as_py() or 0
    if n_shared:
        example = val_manifest.filter(shared)["path"][0].as_py()
        raise ValidationNotHeldOutError(
            f"{n_shared} of {val_manifest.num_rows} validation images are also in the training manifest, "
            f"e.g. {example}: validate on another split, or carve validation out of the training split: `carve` "
            "with the same fraction on both sources (train `keep: rest`, val `keep: carved`), both on the same split "
            "so that their carve keys match")


def validation_pairs(val_sources, val_manifest: pa.Table) -> dict[str, str]:
    """The validation sources' ``real_pairs``; RefusedToStart if the validation rows cannot be scored with them (a
    fake-only set without its real set...), which rank 0 would otherwise find only after the first epoch."""
    try:
        pairs = sources.real_pairs_of(val_sources)
        sources.check_real_pairs(val_manifest, pairs)
    except ValueError as err:
        raise RefusedToStart(str(err)) from err
    return pairs


def shuffled(table: pa.Table, seed: int) -> pa.Table:
    return table.take(pa.array(np.random.default_rng(seed).permutation(table.num_rows)))


def labelled_manifest(source_list, storage_cfg) -> pa.Table:
    """One manifest from several sources, labelled rows only, sorted by path (so its hash names the data)."""
    tables = [sources.build_manifest(source, storage_cfg) for source in source_list]
    merged = pa.concat_tables(tables).sort_by("path")
    labelled = merged.filter(pc.is_valid(merged["label"]))
    if labelled.num_rows == 0:
        raise InputError(f"no labelled images in {[s.uri for s in source_list]}")
    return labelled


def _log_validation_plots(checkpoint_dir: str) -> None:
    preds = pq.read_table(Path(checkpoint_dir) / training.VAL_PREDICTIONS_FILE).to_pandas()
    tracking.log_figure(plots.roc_curves(preds["label"].to_numpy(), preds["score"].to_numpy(),
                                         preds["subset"].to_numpy()), "val_roc.png")
    results = json.loads((Path(checkpoint_dir) / "val_metrics.json").read_text())
    tracking.log_figure(plots.subset_accuracy_bars(results), "val_subset_accuracy.png")
    tracking.log_artifact_file(str(Path(checkpoint_dir) / "val_metrics.json"))
