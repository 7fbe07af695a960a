"""Tiny detector checkpoints written by the tests themselves (no weights are committed or downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_checkpoint(directory: Path, *, threshold: float, seed: int = 0) -> Path:
    """A random-init 32-px detector with a stored threshold, saved as training saves it."""
    from mpft_core import BackboneConfig, DetectorConfig, build_detector, save_checkpoint

    torch.manual_seed(seed)
    detector = build_detector(DetectorConfig(backbone=BackboneConfig(name="mpft-tiny-32", pretrained=None)))
    detector.threshold = threshold
    return save_checkpoint(detector, directory)
