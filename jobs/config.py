"""Job configs: what a user writes in YAML for `mpft train` / `mpft retrain`, validated once by the CLI.

The method part (`method:`) is mpft_core's MethodConfig; the rest says where data, checkpoints, the cluster and MLflow
are. The resolved config is saved with every run (secrets masked by StorageConfig).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml
from pydantic import Field, field_validator

from mpft_core.config import MethodConfig, StrictModel
from mpft_core.imageio import DEFAULT_MAX_PIXELS
from pipelines.sources import SourceConfig
from pipelines.storage import StorageConfig


class ScalingSection(StrictModel):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    # Fractional CPUs leave room for Ray Data's read/decode tasks on small machines (docs/PLATFORM.md).
    cpus_per_worker: float = Field(0.5, gt=0)
    torch_threads: int = Field(1, ge=1)


class TrackingSection(StrictModel):
    # None: the MLFLOW_TRACKING_URI environment variable, read by the CLI.
    uri: Optional[str] = None
    experiment: str = "mpft"
    registered_model: Optional[str] = "mpft-detector"


class TrainJobConfig(StrictModel):
    # The run name identifies the checkpoint folder and the MLflow run: re-running the same name resumes.
    name: str
    method: MethodConfig = Field(default_factory=MethodConfig)
    # One or more sources each; several are merged into one manifest (how retraining adds a new generator).
    train: list[SourceConfig]
    val: list[SourceConfig]
    storage: StorageConfig = Field(default_factory=StorageConfig)
    # Local folder or s3://bucket/prefix; the run's checkpoints go to <checkpoint_root>/<name>.
    checkpoint_root: str = "./runs"
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    ray_address: Optional[str] = None
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # larger images become error rows (decompression bombs)
    log_every_steps: int = Field(10, ge=1)
    # Decode the train/val images once and keep them in Ray's object store for every epoch. For corpora that fit in
    # memory (the demo, small-data fine-tuning). Augmentation is unchanged by it: the decoded training windows are
    # seeded per path either way, and the loop draws each epoch's crop and flip from them anew.
    cache_decoded: bool = False
    # Resilience drill: raise once inside the loop at this global step on a fresh (not resumed) attempt, to check
    # that FailureConfig restarts from the last checkpoint. Off by default.
    inject_failure_at_step: Optional[int] = None

    @field_validator("train", "val", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, dict) or isinstance(value, SourceConfig) else value


def load_yaml(path: str | Path) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh) or {}


def load_train_config(path: str | Path) -> TrainJobConfig:
    return TrainJobConfig.from_dict(load_yaml(path))
