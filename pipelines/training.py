"""Distributed MPFT fine-tuning with Ray Train (V2 API).

    manifest ─▶ read + decode (Ray Data, CPU tasks) ─▶ streaming split ─▶ N workers: crop → TAM → detector → BCE
                                                                       └▶ rank 0: full validation every epoch

Design notes
- Every epoch ends with a checkpoint (weights as safetensors + optimiser state) and a report carrying `val_loss`;
  Ray keeps the best N by that. A crashed worker group restarts from the latest checkpoint (FailureConfig), and a
  re-run with the same run name finds Ray's run snapshot in storage and resumes the same way.
- Resuming checks the checkpoint first (``resume_checkpoint_path``): a truncated or unreadable latest checkpoint is
  skipped with a warning naming it and why, and the newest whole one of the run is used instead. When the run has
  checkpoints but none is whole the worker fails (``NoUsableCheckpoint``) rather than start from scratch: Ray's run
  snapshot would still rank the broken checkpoints among the new ones, and the run's step count would restart.
- Validation runs on rank 0 over the whole validation set, so the metrics are exact full-subset numbers
  (docs/METHOD.md); the other workers wait at the report. The validation predictions are stored in the checkpoint
  so the driver can draw plots and calibrate from the best epoch without another pass.
- Training rows may be larger windows than the model input (``AugmentConfig.crop_jitter``): each worker cuts a
  fresh random crop + flip of the input size every epoch (``mpft_core.transforms.crop_generator``), so augmentation
  varies per epoch even when the decoded set is cached, and a restarted epoch repeats its crops exactly. Optional
  per-sample degradations of each crop (``AugmentConfig.degrade``: downscale, blur, JPEG) draw from their own
  stream per (seed, epoch, rank) (``mpft_core.degrade.degrade_rng``), so they repeat too and change no crop.
- Device placement, DDP wrapping, checkpoint saving and the restore order live in ``mpft_core.distributed`` (plain
  torch.distributed), which ``make gpu-check`` drives on a GPU without Ray; this loop only adds Ray's data shards,
  Ray Train's per-worker device and the reports.
- MLflow never appears here: the driver hands in a `logger` object (see jobs/train.py) that rank 0 calls.
- What a person sees: rank 0 logs one line per epoch (loss, validation accuracy, images/s, time left). Unless
  ``LoopConfig.verbose``, that is all the workers say below warnings: Ray Train's own INFO lines stay in its log
  files (``RunConfig.logging_config``), other libraries' are not logged (``quiet_worker_console``).
"""

from __future__ import annotations

import json
import logging
import posixpath
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.train
import torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from mpft_core.checkpoint_format import META_FILE, WEIGHTS_FILE, check_safetensors_layout, parse_checkpoint_meta
from mpft_core.config import DegradeConfig, MethodConfig, ThresholdConfig
from mpft_core.degrade import degrade_batch, degrade_rng
from mpft_core.detector import MPFTDetector
from mpft_core.distributed import (
    TRAIN_STATE_FILE,
    TrainingSetup,
    broadcast_from_rank0,
    save_training_checkpoint,
    setup_training,
)
from mpft_core.metrics import (
    MEAN_KEY,
    RATE_METRICS,
    calibrate_real_threshold,
    calibrate_threshold,
    per_subset_metrics,
)
from mpft_core.optim import train_step
from mpft_core.tam import compute_mask
from mpft_core.transforms import crop_generator, normalize, random_crops
from pipelines import storage
from pipelines.ingest import TRAINING_COLUMNS

log = logging.getLogger(__name__)

VAL_PREDICTIONS_FILE = "val_predictions.parquet"
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train names each checkpoint folder checkpoint_<local date and time>


class NoUsableCheckpoint(RuntimeError):
    """A run's checkpoints exist but none can be loaded; resuming would silently start over."""


class RankZeroLogger(Protocol):
    """What the loop needs from experiment tracking; implemented in jobs/ (the only place that knows MLflow)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_training_masks(self, images: np.ndarray, masks: np.ndarray, grid_size: int) -> None: ...

    def close(self) -> None:
        """Send what an outage held back; report what still cannot be sent."""


@dataclass
class LoopConfig:
    """Everything a worker needs; plain data so Ray can ship it."""

    method: dict
    storage: dict
    steps_per_epoch: int
    log_every_steps: int = 10
    torch_threads: int = 1
    inject_failure_at_step: Optional[int] = None
    real_pairs: dict = field(default_factory=dict)  # {fake-only subset: real subset} of the validation sources
    verbose: bool = False  # every library's INFO lines on the workers' console too, not only the epoch lines


# --------------------------------------------------------------------------------------------------- worker side


def train_loop_per_worker(config: dict) -> None:
    logger: Optional[RankZeroLogger] = config.get("logger")
    try:
        _train(config, logger)
    finally:
        # Also when the loop fails (Ray then restarts the group): what an MLflow outage held back is sent or reported.
        if logger is not None and ray.train.get_context().get_world_rank() == 0:
            logger.close()


def _train(config: dict, logger: Optional[RankZeroLogger]) -> None:
    loop = LoopConfig(**{k: v for k, v in config.items() if k != "logger"})
    method = MethodConfig.from_dict(loop.method)
    torch.set_num_threads(loop.torch_threads)
    if not loop.verbose:
        quiet_worker_console()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(method.optim.seed + rank)

    storage_cfg = storage.StorageConfig.from_dict(loop.storage)
    setup = _setup_or_resume(method, loop, storage_cfg)
    detector, device = setup.detector, setup.device
    resumed_from_step = setup.global_step if setup.resumed else -1
    train_shard = ray.train.get_dataset_shard("train")
    val_iter = ray.train.get_dataset_shard("val")
    batch_size = method.optim.batch_size
    attempt_start = time.perf_counter()
    for epoch in range(setup.start_epoch, method.optim.epochs):
        setup.model.train()
        crops = crop_generator(method.optim.seed, epoch, rank)
        degradations = degrade_rng(method.optim.seed, epoch, rank)
        epoch_start, epoch_samples, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
        for batch in epoch_batches(train_shard, batch_size, device, shuffle_seed=method.optim.seed + epoch):
            images = training_crops(batch, detector.preprocess.image_size, crops,
                                    degrade=method.augment.degrade, degrade_stream=degradations)
            if rank == 0 and logger is not None and setup.global_step == 0:
                _log_mask_examples(detector, images, method, logger)
            loss = train_step(setup.model, images, batch["label"], setup.optimizer, scheduler=setup.scheduler,
                              scaler=setup.scaler)
            setup.global_step += 1
            epoch_samples += len(batch["label"])
            loss_sum, steps = loss_sum + loss, steps + 1
            if (not setup.resumed and loop.inject_failure_at_step is not None
                    and setup.global_step == loop.inject_failure_at_step):
                raise RuntimeError(f"injected failure at step {setup.global_step} (resilience drill)")
            if rank == 0 and logger is not None and setup.global_step % loop.log_every_steps == 0:
                logger.log_metrics({"train_loss": loss, "lr_head": setup.optimizer.param_groups[-1]["lr"]},
                                   setup.global_step)

        epoch_seconds = time.perf_counter() - epoch_start
        # Shards are equal (streaming_split(equal=True)), so rank 0's count times the world size is the total.
        throughput = {"epoch_train_s": epoch_seconds,
                      "train_samples_per_s": epoch_samples * ctx.get_world_size() / max(epoch_seconds, 1e-9)}
        summary = {}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                summary = _validate(detector, val_iter, method, batch_size, device, Path(tmp), loop.real_pairs)
                save_training_checkpoint(setup, Path(tmp), epoch=epoch)
                summary.update(throughput)
                if logger is not None:
                    logger.log_metrics({k: v for k, v in summary.items() if isinstance(v, float)}, setup.global_step)
                seconds_per_epoch = (time.perf_counter() - attempt_start) / (epoch + 1 - setup.start_epoch)
                log.info(epoch_line(epoch, method.optim.epochs, loss_sum / max(steps, 1), summary,
                                    seconds_left=seconds_per_epoch * (method.optim.epochs - epoch - 1)))
                checkpoint = Checkpoint.from_directory(tmp)
            summary = broadcast_from_rank0(summary)
            ray.train.report({**summary, "epoch": epoch, "global_step": setup.global_step,
                              "resumed_from_step": resumed_from_step}, checkpoint=checkpoint)


def quiet_worker_console() -> None:
    """Warnings only on this worker's console, besides this module's epoch lines. Ray Train sets the root logger to
    INFO, where open_clip narrates every model build and Ray Train logs every report (that logger is named after its
    file path, so ``RunConfig.logging_config`` does not reach it)."""
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO)


def epoch_line(epoch: int, epochs: int, train_loss: float, summary: dict, seconds_left: float) -> str:
    """What a person reads after each epoch: ``epoch 3/40: train loss 0.512, val acc 0.703, 412 images/s, 1 min 40 s
    left`` (``epoch`` counts from 0; ``summary`` holds ``val_mean_acc`` and ``train_samples_per_s``)."""
    return (f"epoch {epoch + 1}/{epochs}: train loss {train_loss:.3f}, val acc {summary[f'val_{MEAN_KEY}_acc']:.3f}, "
            f"{summary['train_samples_per_s']:.0f} images/s, {duration_text(seconds_left)} left")


def duration_text(seconds: float) -> str:
    """``42 s``, ``3 min 05 s`` or ``2 h 07 min``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _setup_or_resume(method: MethodConfig, loop: LoopConfig, storage_cfg) -> TrainingSetup:
    """The worker's training state on Ray Train's device for it, resumed from the newest whole checkpoint of the run
    if Ray hands one over (restart after a failure, or a same-name re-run)."""
    device = ray.train.torch.get_device()
    total_steps = loop.steps_per_epoch * method.optim.epochs
    resolve = lambda uri: str(storage.fetch_to_local(uri, storage_cfg))  # noqa: E731
    latest = ray.train.get_checkpoint()
    if latest is None:
        return setup_training(method, device, total_steps=total_steps, resolve_uri=resolve)
    chosen = Checkpoint(resume_checkpoint_path(latest.filesystem, latest.path), filesystem=latest.filesystem)
    with chosen.as_directory() as d:
        return setup_training(method, device, total_steps=total_steps, resolve_uri=resolve, resume_from=Path(d))


def resume_checkpoint_path(fs: pafs.FileSystem, latest: str) -> str:
    """``latest`` if it is a whole checkpoint, else the newest whole one beside it in the run folder, each skipped
    one named in a warning with the reason. NoUsableCheckpoint when none is whole."""
    problems = []
    for candidate in [latest] + older_checkpoints(fs, latest):
        problem = checkpoint_problem_at(fs, candidate)
        if problem is None:
            if problems:
                log.warning("resuming from the older checkpoint %s instead", candidate)
            return candidate
        log.warning("checkpoint %s is unusable, skipping it: %s", candidate, problem)
        problems.append(f"{posixpath.basename(candidate)}: {problem}")
    run_folder = posixpath.dirname(latest)
    raise NoUsableCheckpoint(
        f"no usable checkpoint in {run_folder} ({'; '.join(problems)}); start a new run under another name, or "
        "delete that folder to start this one over")


def older_checkpoints(fs: pafs.FileSystem, latest: str) -> list[str]:
    """The run's other checkpoint folders that are older than ``latest``, newest first."""
    name = posixpath.basename(latest)
    return [path for path in checkpoint_folders(fs, posixpath.dirname(latest)) if posixpath.basename(path) < name]


def checkpoint_folders(fs: pafs.FileSystem, run_folder: str) -> list[str]:
    """Every checkpoint folder of a run, newest first (Ray's names sort by time); empty for a run not yet started."""
    infos = fs.get_file_info(pafs.FileSelector(run_folder, allow_not_found=True))
    found = [i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, reverse=True)


def checkpoint_problem_at(fs: pafs.FileSystem, directory: str) -> Optional[str]:
    """Why the checkpoint folder ``directory`` cannot be resumed from (one line), or None. Reads the metadata, the
    weights' header and the training state's zip directory only, so a remote checkpoint is not downloaded."""
    try:
        with fs.open_input_file(posixpath.join(directory, META_FILE)) as f:
            parse_checkpoint_meta(f.read(), origin=META_FILE)
        with fs.open_input_file(posixpath.join(directory, WEIGHTS_FILE)) as f:
            check_safetensors_layout(f, f.size(), origin=WEIGHTS_FILE)
        with fs.open_input_file(posixpath.join(directory, TRAIN_STATE_FILE)) as f, zipfile.ZipFile(f) as archive:
            archive.namelist()
    except FileNotFoundError as err:
        return f"a file is missing ({err})"
    except zipfile.BadZipFile as err:
        return f"{TRAIN_STATE_FILE} is not a whole torch archive ({err})"
    except (ValueError, OSError) as err:
        return str(err)
    return None


def epoch_batches(shard, batch_size: int, device, *, shuffle_seed: int):
    """One epoch of a worker's training rows as torch batches on ``device`` (columns ``TRAINING_COLUMNS``)."""
    # A local shuffle buffer re-mixes rows every epoch without a global (all-to-all) shuffle of the images.
    return shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=str(device),
                                    dtypes={"image": torch.uint8, "label": torch.float32,
                                            "view_height": torch.int64, "view_width": torch.int64},
                                    local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=shuffle_seed)


def training_crops(batch: dict, size: int, generator: torch.Generator, *, degrade: Optional[DegradeConfig] = None,
                   degrade_stream: Optional[np.random.Generator] = None) -> torch.Tensor:
    """This epoch's random crops + flips of a batch's windows, inside each picture's extent (never its padding),
    then each crop degraded per ``degrade`` with draws from ``degrade_stream`` (``mpft_core.degrade``; the labels
    are never read, so both classes are degraded alike).

    Degrading the uint8 crop, before normalisation, means TAM ranks the patches by the texture of the degraded
    image, the one the model is shown (a blurred patch is no longer the most textured one). Disabled degradations
    cost nothing: the crops stay where they are, unconverted."""
    crops = random_crops(batch["image"], size, generator, heights=batch["view_height"], widths=batch["view_width"])
    if degrade is None or not degrade.enabled:
        return crops
    if degrade_stream is None:
        raise ValueError("degradations are enabled but no degrade_stream was given (mpft_core.degrade.degrade_rng)")
    # PIL works on host memory: the crop batch (uint8, a few MB) goes there and back once per batch.
    degraded = degrade_batch(crops.cpu().numpy(), degrade, degrade_stream)
    return torch.from_numpy(degraded).to(crops.device)


def _log_mask_examples(detector: MPFTDetector, images: torch.Tensor, method: MethodConfig, logger) -> None:
    """A picture of what TAM hides on the very first batch: the quickest sanity check of the method."""
    if method.detector.mask.strategy == "none":
        return
    shown = images[:8].cpu()
    pixels01 = shown.permute(0, 3, 1, 2).float() / 255.0
    masks = compute_mask(pixels01, detector.patch_size, method.detector.mask)
    logger.log_training_masks(shown.numpy(), masks.numpy(), detector.grid_size)


@torch.inference_mode()
def predict_batches(detector: MPFTDetector, batches, device) -> dict[str, np.ndarray]:
    """Scores and BCE loss terms for every row of an iterable of decoded batches (error rows already removed)."""
    detector.eval()
    cols: dict[str, list] = {"path": [], "label": [], "subset": [], "score": [], "loss": []}
    for batch in batches:
        x = normalize(batch["image"].to(device), detector.preprocess.mean, detector.preprocess.std)
        logits = detector(x).float()
        labels = torch.as_tensor(batch["label"], dtype=torch.float32, device=logits.device)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        cols["score"].append(torch.sigmoid(logits).cpu().numpy())
        cols["loss"].append(loss.cpu().numpy())
        cols["label"].append(labels.cpu().numpy().astype(np.int8))
        cols["path"].append(np.asarray(batch["path"]))
        cols["subset"].append(np.asarray(batch["subset"]))
    return {k: (np.concatenate(v) if v else np.array([])) for k, v in cols.items()}


def _calibrated_thresholds(labels: np.ndarray, scores: np.ndarray, config: ThresholdConfig) -> tuple[float, float]:
    """(threshold, real_threshold) from the validation scores: ``threshold`` at ``target_fpr`` on the real images
    (0.5 without one), ``real_threshold`` at ``target_miss_rate`` on the generated ones (``threshold`` without one).

    A real_threshold above threshold is lowered to it: at these targets the classes separate on validation, so no
    score needs the "uncertain" verdict. A target set for a class the split lacks raises the calibration's
    ValueError (empty set of scores)."""
    threshold = 0.5
    if config.target_fpr is not None:
        threshold = calibrate_threshold(scores[labels == 0], config.target_fpr)
    if config.target_miss_rate is None:
        return float(threshold), float(threshold)
    real_threshold = calibrate_real_threshold(scores[labels == 1], config.target_miss_rate)
    if real_threshold > threshold:
        log.info("real_threshold %.6g at target_miss_rate %g lies above threshold %.6g: the classes separate on "
                 "validation, so the uncertain band is empty (real_threshold = threshold)", real_threshold,
                 config.target_miss_rate, threshold)
        real_threshold = threshold
    return float(threshold), float(real_threshold)


def _validate(detector, val_iter, method: MethodConfig, batch_size: int, device, out: Path,
              real_pairs: Optional[dict] = None) -> dict[str, float]:
    """Score the whole validation set, calibrate the thresholds, and write predictions and metrics into ``out``
    (fake-only subsets scored with the real subset ``real_pairs`` pairs them with)."""
    batches = val_iter.iter_batches(batch_size=batch_size, batch_format="numpy")
    batches = ({**b, "image": torch.from_numpy(b["image"])} for b in batches)
    preds = predict_batches(detector, batches, device)
    if len(preds["score"]) == 0:
        raise RuntimeError("the validation split has no decodable images")
    threshold, real_threshold = _calibrated_thresholds(preds["label"], preds["score"], method.threshold)
    detector.threshold = threshold
    detector.real_threshold = real_threshold
    per_subset = per_subset_metrics(preds["label"], preds["score"], preds["subset"], threshold=threshold,
                                    pairs=real_pairs)

    pq.write_table(pa.table({k: preds[k] for k in ("path", "label", "subset", "score")}), out / VAL_PREDICTIONS_FILE)
    (out / "val_metrics.json").write_text(json.dumps(per_subset, indent=2, default=float))

    summary = {"val_loss": float(np.mean(preds["loss"])), "threshold": threshold, "real_threshold": real_threshold}
    for subset, metrics in per_subset.items():
        for name, value in metrics.items():
            if name in RATE_METRICS:
                summary[f"val_{subset}_{name}"] = float(value)
    return summary


# --------------------------------------------------------------------------------------------------- driver side


def build_trainer(*, name: str, loop_config: LoopConfig, logger: Optional[RankZeroLogger], train_ds, val_ds,
                  checkpoint_root: str, storage_cfg, num_workers: int, use_gpu: bool, cpus_per_worker: float,
                  keep_checkpoints: int, max_failures: int) -> TorchTrainer:
    """A TorchTrainer wired for MPFT: best-N checkpoints by val loss, retries, storage on a local path or S3."""
    fs, root = storage.resolve(checkpoint_root, storage_cfg)
    if fs.type_name == "local":
        Path(root).mkdir(parents=True, exist_ok=True)
        root = str(Path(root).resolve())
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    run_config = RunConfig(
        name=name,
        storage_path=root,
        storage_filesystem=fs,
        checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints, checkpoint_score_attribute="val_loss",
                                           checkpoint_score_order="min"),
        failure_config=FailureConfig(max_failures=max_failures),
        logging_config=LoggingConfig(log_level="INFO" if loop_config.verbose else "WARNING"),
    )
    config: dict[str, Any] = {**loop_config.__dict__, "logger": logger}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=run_config,
        datasets=training_datasets(train_ds, val_ds),
        # Validation is not split: rank 0 scores all of it so the metrics are exact full-subset numbers.
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def training_datasets(train_ds, val_ds) -> dict:
    """What the workers get: training rows reduced to ``TRAINING_COLUMNS`` (a missing column fails here, not as a
    silently uncropped batch), validation rows whole (rank 0 needs paths and subsets for the metrics)."""
    return {"train": train_ds.select_columns(TRAINING_COLUMNS), "val": val_ds}


@dataclass(frozen=True)
class BestCheckpoint:
    local_dir: Path  # a temporary copy, removed when the ``best_checkpoint`` block ends
    location: str  # where it stays: a local folder or an s3:// URI
    metrics: dict  # what the epoch that wrote it reported (val_loss, val_mean_acc, ...)


@contextmanager
def best_checkpoint(result) -> Iterator[BestCheckpoint]:
    """The best whole checkpoint (lowest val loss) of a finished run, copied into a temporary folder for the block.
    A broken one is skipped with a warning, like on resume; RuntimeError when the run has no whole checkpoint."""
    ranked = sorted(result.best_checkpoints or [], key=lambda cm: cm[1]["val_loss"])
    for checkpoint, metrics in ranked + ([(result.checkpoint, result.metrics)] if result.checkpoint else []):
        problem = checkpoint_problem_at(checkpoint.filesystem, checkpoint.path)
        if problem is not None:
            log.warning("checkpoint %s is unusable, skipping it: %s", checkpoint.path, problem)
            continue
        with tempfile.TemporaryDirectory(prefix="mpft-best-") as tmp:
            yield BestCheckpoint(Path(checkpoint.to_directory(tmp)), checkpoint_location(checkpoint),
                                 dict(metrics or {}))
        return
    raise RuntimeError("training finished without a usable checkpoint")


def checkpoint_location(checkpoint: Checkpoint) -> str:
    """The checkpoint's folder as a user names it: a local path or an ``s3://`` URI."""
    scheme = "s3://" if checkpoint.filesystem.type_name == "s3" else ""
    return scheme + checkpoint.path


def steps_per_epoch(n_train_rows: int, batch_size: int, num_workers: int) -> int:
    """Batches each worker runs per epoch: the split gives equal shards and the loop drops the last partial batch."""
    return max(1, (n_train_rows // num_workers) // batch_size)

