"""The Ray Train loop on its own: two CPU workers learn, validation is exact, a crash resumes from the checkpoint.

Datasets here are built in memory with the ingest's decoded-row schema, so these tests isolate the training loop;
tests/test_train_job.py runs the whole job through S3, ingest and MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from mpft_core.checkpoint import load_checkpoint
from mpft_core.config import (
    BackboneConfig,
    DegradeConfig,
    DetectorConfig,
    MaskConfig,
    MethodConfig,
    OptimConfig,
    ThresholdConfig,
)
from mpft_core.metrics import calibrate_real_threshold, calibrate_threshold
from pipelines import training
from pipelines.storage import StorageConfig

pytestmark = pytest.mark.timeout(420)  # tests using ray_local are marked `ray` by conftest

SIZE = 32


def learnable_rows(n_per_class: int, seed: int, subset: str = "toy") -> list[dict]:
    """Smooth random colour fields (real) vs the same fields with fine horizontal stripes added (generated).

    Stripes rather than a checkerboard: the training loop flips images left-right at random, and a flip turns a
    checkerboard of even width into its negative, a different pattern for a tiny model to learn in three epochs.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    stripes = (yy % 2 * 2 - 1)[..., None] * 24.0
    rows = []
    for i in range(2 * n_per_class):
        label = i % 2
        base = rng.uniform(40, 215, size=3) + rng.normal(0, 3, size=(SIZE, SIZE, 3))
        ramp = (xx[..., None] * rng.uniform(-2, 2)) + (yy[..., None] * rng.uniform(-2, 2))
        image = base + ramp + (stripes if label else 0.0)
        rows.append({"path": f"mem://{subset}/{i:04d}.png", "label": label, "subset": subset,
                     "image": np.clip(image, 0, 255).astype(np.uint8), "view_height": SIZE, "view_width": SIZE})
    return rows


def method_config(epochs: int = 2, strategy: str = "tam", pretrained: str | None = None) -> MethodConfig:
    return MethodConfig(
        detector=DetectorConfig(backbone=BackboneConfig(name="mpft-tiny-32", pretrained=pretrained),
                                mask=MaskConfig(strategy=strategy, ratio=0.25), dropout=0.0),
        optim=OptimConfig(epochs=epochs, batch_size=16, backbone_lr=1e-3, head_lr=3e-3, schedule="constant"),
    )


def fit(tmp_path: Path, name: str, method: MethodConfig, *, inject_failure_at_step=None, n_per_class=64):
    train_ds = ray.data.from_items(learnable_rows(n_per_class, seed=1))
    val_ds = ray.data.from_items(learnable_rows(32, seed=2, subset="val_toy"))
    loop = training.LoopConfig(
        method=method.to_dict(), storage=StorageConfig().to_dict(reveal_secrets=True),
        steps_per_epoch=training.steps_per_epoch(2 * n_per_class, method.optim.batch_size, 2),
        inject_failure_at_step=inject_failure_at_step,
    )
    trainer = training.build_trainer(
        name=name, loop_config=loop, logger=None, train_ds=train_ds, val_ds=val_ds,
        checkpoint_root=str(tmp_path / "runs"), storage_cfg=StorageConfig(), num_workers=2, use_gpu=False,
        cpus_per_worker=0.5, keep_checkpoints=2, max_failures=1,
    )
    return trainer.fit()


def openai_like_weights(path: Path) -> str:
    """A stand-in for the OpenAI CLIP weights: random open_clip weights of a QuickGELU tower, in a weight file that
    says so, loaded through the same path as real pretrained files (minus the download)."""
    import open_clip

    from mpft_core.backbone import register_shipped_configs, save_clip_weights

    register_shipped_configs()
    save_clip_weights(open_clip.create_model("mpft-tiny-32", force_quick_gelu=True), path, "quick_gelu")
    return str(path)


@pytest.mark.slow  # a two-worker Ray Train run
def test_two_workers_learn_the_toy_task_and_checkpoint_the_best_epoch(tmp_path, ray_local):
    from mpft_core.backbone import tower_activation

    weights = openai_like_weights(tmp_path / "clip-tiny-openai-like.safetensors")
    method = method_config(epochs=3, pretrained=weights)
    method.threshold = ThresholdConfig(target_miss_rate=0.1)
    result = fit(tmp_path, "learns", method)

    assert result.error is None
    assert result.metrics["epoch"] == 2
    assert result.metrics["val_val_toy_acc"] >= 0.8, result.metrics
    with training.best_checkpoint(result) as best:
        detector = load_checkpoint(best.local_dir)
        per_subset = json.loads((best.local_dir / "val_metrics.json").read_text())
        val = pq.read_table(best.local_dir / training.VAL_PREDICTIONS_FILE).to_pydict()
    assert detector.preprocess.image_size == SIZE
    # Both thresholds are stored: 0.5 (no target_fpr) and the one at 10 % missed fakes, never above it.
    fake = np.array([s for s, label in zip(val["score"], val["label"], strict=True) if label == 1], dtype=np.float32)
    assert detector.threshold == 0.5
    assert detector.real_threshold == min(calibrate_real_threshold(fake, 0.1), 0.5)
    assert "real_threshold" in result.metrics
    assert tower_activation(detector.visual) == "quick_gelu"  # the function that was trained, not a GELU twin
    # Validation is exact: rank 0 saw every validation row once (64), not a per-worker shard.
    assert per_subset["val_toy"]["n"] == 64
    assert len(result.best_checkpoints) <= 2
    assert not best.local_dir.exists()  # the temporary copy is gone; the checkpoint stays in the run folder
    assert Path(best.location).is_relative_to(tmp_path / "runs" / "learns")
    stored = load_checkpoint(best.location)
    assert (stored.threshold, stored.real_threshold) == (detector.threshold, detector.real_threshold)


@pytest.mark.slow  # a two-worker Ray Train run
def test_a_crash_mid_epoch_resumes_from_the_last_checkpoint_and_continues_the_step_count(tmp_path, ray_local):
    method = method_config(epochs=2, strategy="random")
    # With degradation augmentation on, as a robust recipe would run: the loop degrades every batch's crops.
    method.augment.degrade = DegradeConfig.from_dict({"jpeg": {"p": 0.5}, "blur": {"p": 0.5},
                                                      "downscale": {"p": 0.5}})
    steps = training.steps_per_epoch(128, method.optim.batch_size, 2)
    # Fail in the second epoch, after the first epoch's checkpoint exists.
    result = fit(tmp_path, "crashes", method, inject_failure_at_step=steps + 2)

    assert result.error is None
    assert result.metrics["epoch"] == 1
    # The restarted workers started from the epoch-0 checkpoint's step count, not from zero.
    assert result.metrics["resumed_from_step"] == steps
    assert result.metrics["global_step"] == 2 * steps


@pytest.mark.slow  # a two-worker Ray Train run
def test_resuming_after_the_latest_checkpoint_was_truncated_continues_from_the_one_before(tmp_path, ray_local):
    method = method_config(epochs=2, strategy="random")
    steps = training.steps_per_epoch(128, method.optim.batch_size, 2)
    assert fit(tmp_path, "truncated", method).error is None
    latest = max(p for p in (tmp_path / "runs" / "truncated").glob("checkpoint_*") if p.is_dir())
    truncate(latest / "model.safetensors")  # e.g. a copy cut short when the disk filled up

    result = fit(tmp_path, "truncated", method_config(epochs=3, strategy="random"))  # same name: a re-run resumes

    # The workers skipped the broken checkpoint (their warning names it) and resumed from epoch 0's.
    assert result.error is None
    assert result.metrics["resumed_from_step"] == steps
    assert result.metrics["epoch"] == 2


def training_checkpoint(directory: Path, epoch: int) -> Path:
    """A real checkpoint as the training loop writes it (weights, metadata, optimiser state), built without Ray."""
    import torch

    from mpft_core.distributed import save_training_checkpoint, setup_training

    setup = setup_training(method_config(strategy="random"), torch.device("cpu"), total_steps=4)
    setup.global_step = 2 * (epoch + 1)
    return save_training_checkpoint(setup, directory, epoch=epoch)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture
def run_of_three_checkpoints(tmp_path) -> list[Path]:
    """A run folder with three whole checkpoints named as Ray Train names them, newest first."""
    return [training_checkpoint(tmp_path / "run" / f"checkpoint_2025-01-01_00-00-0{i}.000000", epoch=i)
            for i in (2, 1, 0)]


def resume_path(latest: Path) -> Path:
    import pyarrow.fs as pafs

    return Path(training.resume_checkpoint_path(pafs.LocalFileSystem(), str(latest)))


def test_resume_uses_the_latest_checkpoint_when_it_is_whole(run_of_three_checkpoints):
    assert resume_path(run_of_three_checkpoints[0]) == run_of_three_checkpoints[0]


@pytest.mark.parametrize("damage, reason", [
    (lambda d: truncate(d / "model.safetensors"), "truncated"),
    (lambda d: (d / "mpft.json").write_text("{"), "not valid JSON"),
    (lambda d: (d / "mpft.json").unlink(), "missing"),
    (lambda d: truncate(d / "train_state.pt"), "train_state.pt is not a whole torch archive"),
])
def test_resume_skips_a_broken_latest_checkpoint_with_a_warning_naming_it_and_why(run_of_three_checkpoints, caplog,
                                                                                  damage, reason):
    latest, previous, _ = run_of_three_checkpoints
    damage(latest)

    with caplog.at_level("WARNING", logger="pipelines.training"):
        assert resume_path(latest) == previous
    [skipped, fallback] = [r.getMessage() for r in caplog.records]
    assert latest.name in skipped and reason in skipped
    assert previous.name in fallback


def test_resume_walks_back_past_every_broken_checkpoint(run_of_three_checkpoints):
    latest, previous, oldest = run_of_three_checkpoints
    truncate(latest / "model.safetensors")
    (previous / "mpft.json").unlink()

    assert resume_path(latest) == oldest


def test_resume_refuses_to_start_over_when_no_checkpoint_of_the_run_is_whole(run_of_three_checkpoints):
    for checkpoint in run_of_three_checkpoints:
        truncate(checkpoint / "model.safetensors")

    expected = (r"no usable checkpoint in .*run \(checkpoint_2025-01-01_00-00-02.*truncated.*; "
                r"checkpoint_2025-01-01_00-00-00.*new run")
    with pytest.raises(training.NoUsableCheckpoint, match=expected):
        resume_path(run_of_three_checkpoints[0])


def test_the_epoch_line_says_where_training_stands_in_words():
    summary = {"val_mean_acc": 0.70312, "train_samples_per_s": 411.6}
    assert (training.epoch_line(2, 40, 0.5123, summary, seconds_left=100)
            == "epoch 3/40: train loss 0.512, val acc 0.703, 412 images/s, 1 min 40 s left")
    assert [training.duration_text(s) for s in (0.4, 42.4, 3599.6, 7620)] == ["0 s", "42 s", "1 h 00 min", "2 h 07 min"]


class InMemoryShard:
    """What validation reads from Ray's validation shard: numpy batches of decoded rows."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def iter_batches(self, batch_size: int, batch_format: str):
        for start in range(0, len(self.rows), batch_size):
            rows = self.rows[start:start + batch_size]
            yield {key: np.stack([row[key] for row in rows]) for key in rows[0]}


@pytest.mark.timeout(120)
def test_validation_scores_a_fake_only_subset_with_its_paired_real_subset(tmp_path):
    from mpft_core.detector import build_detector

    method = method_config()
    rows = learnable_rows(8, seed=3)
    rows = [{**row, "subset": "guided" if row["label"] else "imagenet"} for row in rows]

    summary = training._validate(build_detector(method.detector), InMemoryShard(rows), method, 16, "cpu", tmp_path,
                                 real_pairs={"guided": "imagenet"})

    assert np.isfinite(summary["val_guided_auc"]) and not any(key.startswith("val_imagenet") for key in summary)
    assert json.loads((tmp_path / "val_metrics.json").read_text())["guided"]["n"] == 16


def validate_with_targets(tmp_path: Path, rows: list[dict], **targets) -> tuple[dict, object]:
    """``_validate`` of a seeded random-init detector on ``rows`` with these threshold targets: (summary, detector)."""
    from mpft_core.detector import build_detector

    method = method_config()
    method.threshold = ThresholdConfig(**targets)
    torch.manual_seed(0)
    detector = build_detector(method.detector)
    return training._validate(detector, InMemoryShard(rows), method, 16, "cpu", tmp_path), detector


def validation_scores(out: Path, label: int) -> np.ndarray:
    val = pq.read_table(out / training.VAL_PREDICTIONS_FILE).to_pydict()
    return np.array([s for s, y in zip(val["score"], val["label"], strict=True) if y == label], dtype=np.float32)


@pytest.mark.timeout(120)
def test_validation_calibrates_an_uncertain_band_below_the_threshold(tmp_path):
    # An untrained detector: real and generated scores overlap, so the band between the thresholds is not empty.
    summary, detector = validate_with_targets(tmp_path, learnable_rows(8, seed=3), target_fpr=0.125,
                                              target_miss_rate=0.125)

    threshold = calibrate_threshold(validation_scores(tmp_path, 0), 0.125)
    real_threshold = calibrate_real_threshold(validation_scores(tmp_path, 1), 0.125)
    assert (summary["threshold"], summary["real_threshold"]) == (threshold, real_threshold)
    assert (detector.threshold, detector.real_threshold) == (threshold, real_threshold)
    assert real_threshold < threshold


@pytest.mark.timeout(120)
def test_a_real_threshold_that_lands_above_the_threshold_is_lowered_to_it_and_logged(tmp_path, caplog):
    # 87.5 % of real images may be flagged and 87.5 % of fakes missed: the two targets cross.
    with caplog.at_level("INFO", logger="pipelines.training"):
        summary, detector = validate_with_targets(tmp_path, learnable_rows(8, seed=3), target_fpr=0.875,
                                                  target_miss_rate=0.875)

    assert calibrate_real_threshold(validation_scores(tmp_path, 1), 0.875) > summary["threshold"]
    assert summary["real_threshold"] == summary["threshold"] == detector.real_threshold
    assert any("uncertain band is empty" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(120)
def test_a_miss_rate_target_without_generated_validation_images_is_an_error(tmp_path):
    real_only = [row for row in learnable_rows(8, seed=3) if row["label"] == 0]
    with pytest.raises(ValueError, match="empty set of generated scores"):
        validate_with_targets(tmp_path, real_only, target_miss_rate=0.1)
    # Without the target such a split still validates, with no band.
    summary, _ = validate_with_targets(tmp_path, real_only)
    assert summary["real_threshold"] == summary["threshold"] == 0.5


def padded_window_rows(n: int, window: int = 40) -> list[dict]:
    """Training windows as the decode stage makes them for pictures larger than the input but smaller than the
    window: the picture top-left, zeros around it, its extent in view_height / view_width."""
    rng = np.random.default_rng(4)
    rows = []
    for i in range(n):
        height, width = int(rng.integers(SIZE, window)), int(rng.integers(SIZE, window))
        image = np.zeros((window, window, 3), dtype=np.uint8)
        image[:height, :width] = rng.integers(1, 256, (height, width, 3), dtype=np.uint8)  # never 0 inside
        rows.append({"image": image, "label": i % 2, "view_height": height, "view_width": width,
                     "path": f"mem://{i}", "subset": "toy"})
    return rows


@pytest.mark.timeout(120)
def test_worker_crops_never_contain_the_padding_of_a_window(ray_local):
    from mpft_core.transforms import crop_generator

    rows = padded_window_rows(32)
    datasets = training.training_datasets(ray.data.from_items(rows), ray.data.from_items(rows))
    for epoch in range(3):
        crops = crop_generator(0, epoch, 0)
        for batch in training.epoch_batches(datasets["train"], 8, "cpu", shuffle_seed=epoch):
            images = training.training_crops(batch, SIZE, crops)
            assert images.shape[1:] == (SIZE, SIZE, 3)
            assert bool((images.reshape(len(images), -1, 3) > 0).any(dim=2).all()), "a crop reached the padding"


@pytest.mark.timeout(120)
def test_training_rows_without_a_picture_extent_are_refused(ray_local):
    rows = [{k: v for k, v in r.items() if k not in ("view_height", "view_width")} for r in padded_window_rows(4)]
    with pytest.raises(Exception, match="view_height"):
        training.training_datasets(ray.data.from_items(rows), ray.data.from_items(rows))["train"].take(1)
