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


def probe_checkpoint(directory: Path, *, threshold: float = 0.5, seed: int = 0) -> Path:
    """``tiny_checkpoint`` with its head set to a logistic probe separating photo crops (0) from the suite's
    synthetic fakes (1) on the tower's embeddings (a second or so): a detector that tells the two apart. The
    probe's images use seed 1, which tests of what it learned should not use."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from mpft_core import load_checkpoint, save_checkpoint
    from mpft_core.transforms import normalize
    from tests.helpers.images import fake_images, real_photo_crops

    detector = load_checkpoint(tiny_checkpoint(directory, threshold=threshold, seed=seed))
    side = detector.preprocess.image_size
    pixels = np.stack(real_photo_crops(64, side, seed=1) + fake_images(64, side, seed=1))
    prep = detector.preprocess
    with torch.no_grad():
        embeddings = detector.embed(normalize(torch.from_numpy(pixels), prep.mean, prep.std)).numpy()
    probe = LogisticRegression(C=10, max_iter=2000).fit(embeddings, np.r_[np.zeros(64), np.ones(64)])
    with torch.no_grad():
        detector.head.weight.copy_(torch.from_numpy(probe.coef_).float())
        detector.head.bias.copy_(torch.from_numpy(probe.intercept_).float())
    return save_checkpoint(detector, directory)
