"""`mpft train`: the driver side of a training run.

Builds the manifests, starts the Ray Train job, and does everything MLflow-related on the driver except the
per-epoch metrics, which rank 0 logs through `MlflowRankZeroLogger` while training runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import plots, tracking
from jobs.config import TrainJobConfig
from mpft_core.backbone import input_size, read_weights_metadata, resolve_architecture
from mpft_core.config import BackboneConfig
from pipelines import ingest, sources, storage, training
from pipelines.runtime import init_ray

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    run_id: str
    checkpoint_dir: str
    model_uri: Optional[str]
    model_version: Optional[str]
    metrics: dict


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


class RefusedToStart(ValueError):
    """A training job that cannot be right, found before Ray or MLflow start (the CLI prints it as one line)."""


class ValidationNotHeldOutError(RefusedToStart):
    """Validation images that are also training images: checkpoint choice and threshold would be biased."""


def run_train(cfg: TrainJobConfig, tracking_uri: str, parent_run_id: Optional[str] = None, *,
              verbose: bool = False) -> TrainOutcome:
    """Train, log to MLflow under ``parent_run_id`` if given, register the best checkpoint as ``challenger``.
    RefusedToStart, before Ray or MLflow start, for a job that cannot be right. ``verbose``: Ray's own progress and
    INFO lines on the console too (else one line per epoch)."""
    # Manifests first: a leaky validation set is refused before Ray or MLflow start.
    train_manifest = labelled_manifest(cfg.train, cfg.storage)
    val_manifest = labelled_manifest(cfg.val, cfg.storage)
    check_validation_is_held_out(train_manifest, val_manifest)
    val_pairs = validation_pairs(cfg.val, val_manifest)
    check_backbone_weights(cfg.method.detector.backbone, cfg.storage)
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
        result = trainer.fit()
        best_dir = training.best_checkpoint_dir(result)
        _log_validation_plots(best_dir)
        model_uri = version = None
        if cfg.tracking.registered_model:
            model_uri = tracking.log_detector_model(best_dir)
            version = tracking.register_model(model_uri, cfg.tracking.registered_model, tags={
                "train_run_id": run.info.run_id,
                "train_manifest_hash": sources.manifest_hash(train_manifest),
            })
            tracking.set_alias(cfg.tracking.registered_model, "challenger", version)
            log.info("registered %s version %s as challenger", cfg.tracking.registered_model, version)
        return TrainOutcome(run.info.run_id, best_dir, model_uri, version, dict(result.metrics or {}))


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
        raise ValueError(f"no labelled images in {[s.uri for s in source_list]}")
    return labelled


def _log_validation_plots(checkpoint_dir: str) -> None:
    preds = pq.read_table(Path(checkpoint_dir) / training.VAL_PREDICTIONS_FILE).to_pandas()
    tracking.log_figure(plots.roc_curves(preds["label"].to_numpy(), preds["score"].to_numpy(),
                                         preds["subset"].to_numpy()), "val_roc.png")
    results = json.loads((Path(checkpoint_dir) / "val_metrics.json").read_text())
    tracking.log_figure(plots.subset_accuracy_bars(results), "val_subset_accuracy.png")
    tracking.log_artifact_file(str(Path(checkpoint_dir) / "val_metrics.json"))
