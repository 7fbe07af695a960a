"""MPFT core: the method as a plain library (no Ray, no MLflow).

    from mpft_core import DetectorConfig, build_detector, compute_mask, save_checkpoint, load_checkpoint

Entry points are imported lazily, so ``import mpft_core.config`` (driver side) does not pull in torch or open_clip.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BackboneConfig": "config",
    "DetectorConfig": "config",
    "MaskConfig": "config",
    "MethodConfig": "config",
    "OptimConfig": "config",
    "ThresholdConfig": "config",
    "Preprocess": "transforms",
    "create_backbone": "backbone",
    "shipped_config_names": "backbone",
    "input_size": "backbone",
    "texture_scores": "tam",
    "select_masked_patches": "tam",
    "compute_mask": "tam",
    "MPFTDetector": "detector",
    "build_detector": "detector",
    "pick_device": "detector",
    "make_optimizer": "optim",
    "make_scheduler": "optim",
    "make_grad_scaler": "optim",
    "train_step": "optim",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "read_checkpoint_meta": "checkpoint_format",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mpft_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
