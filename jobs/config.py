"""Job configs: what a user writes in YAML for `mpft train` / `mpft retrain`, validated once by the CLI.

The method part (`method:`) is mpft_core's MethodConfig; the rest says where data, checkpoints, the cluster and MLflow
are. The resolved config is saved with every run (secrets masked by StorageConfig).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import Field, field_validator

from mpft_core.config import InputError, MethodConfig, StrictModel
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


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainJobConfig:
    """The job YAML at ``path`` with ``key=value`` overrides (``--set``) applied, validated once."""
    return TrainJobConfig.from_dict(with_overrides(load_yaml(path), [parse_override(text) for text in overrides]))


def parse_override(text: str) -> tuple[str, Any]:
    """``method.detector.mask.ratio=0.25`` -> (dotted key, value); the value is read as YAML, so ``0.25`` is a
    number, ``null`` is None, ``[a, b]`` a list and anything else a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise InputError(f"an override is KEY=VALUE (e.g. method.detector.mask.ratio=0.25, or null), not {text!r}")
    if any(not part for part in key.split(".")):
        raise InputError(f"override key {key!r} has an empty part")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise InputError(f"override {key}: value {raw!r} is not valid YAML ({err.problem})") from None


def with_overrides(data: dict, overrides: Sequence[tuple[str, Any]]) -> dict:
    """A copy of a job dict with each (dotted key, value) set, creating the sections a key passes through; the
    config's validation then refuses a key that names no setting."""
    result = copy.deepcopy(data)
    for key, value in overrides:
        *sections, leaf = key.split(".")
        node = result
        for depth, name in enumerate(sections):
            child = node.get(name)
            if child is None:  # a section left unset, in YAML or as null in a dumped config
                child = node[name] = {}
            if not isinstance(child, dict):
                raise InputError(f"override {key}: {'.'.join(sections[: depth + 1])} is a value, not a section")
            node = child
        node[leaf] = value
    return result
