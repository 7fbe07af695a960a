"""Scoring images with a loaded detector: the one kernel behind the Ray scoring actor (``pipelines/scoring.py``) and
the registered MLflow model (``jobs/mlflow_model.py``), so both give the same scores, verdicts and error texts.

    encoded image ─decode_views─▶ uint8 view [S, S, 3] | error text ─score_rows─▶ probability of "generated"
                                                                     ─verdicts─▶ "generated" / "uncertain" / "real"
                                                                                 (None on error)

A view is the image tiled if smaller than the model input, then centre-cropped to it, never resized
(``mpft_core.transforms.eval_view``). An image that cannot be scored gets an error text, no score and no verdict; it
never raises, so one bad file cannot fail a batch.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Optional

import numpy as np

from mpft_core.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_rgb
from mpft_core.transforms import eval_view

VERDICT_GENERATED = "generated"
VERDICT_UNCERTAIN = "uncertain"
VERDICT_REAL = "real"


def describe_failure(err: BaseException) -> str:
    """The error text of an image that could not be scored: an ``ImageDecodeError``'s message as it is (written for
    people), anything else its type and message."""
    if isinstance(err, ImageDecodeError):
        return str(err) or "undecodable image"
    return f"{type(err).__name__}: {err}"


def encoded_bytes(value) -> bytes:
    """The bytes of an encoded image given as bytes-like, or as base64 text (how JSON transports such as MLflow's REST
    scoring protocol carry binary columns); ``ImageDecodeError`` for anything else."""
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ImageDecodeError("image is text but not base64-encoded bytes") from err
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise ImageDecodeError("no image bytes in this row")
    raise ImageDecodeError(f"image must be encoded bytes, got {type(value).__name__}")


def decode_views(encoded: Sequence, image_size: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[Optional[str]]]:
    """(views uint8 ``[N, image_size, image_size, 3]``, per image its error text or None) of encoded images
    (``encoded_bytes`` forms); a failed image's view is zeros. Never raises for a bad image."""
    views = np.zeros((len(encoded), image_size, image_size, 3), dtype=np.uint8)
    errors: list[Optional[str]] = [None] * len(encoded)
    for i, value in enumerate(encoded):
        try:
            views[i] = eval_view(decode_rgb(encoded_bytes(value), max_pixels), image_size)
        except Exception as err:  # noqa: BLE001 - any per-image failure must become an error row
            errors[i] = describe_failure(err)
    return views, errors


def score_rows(detector, views: np.ndarray, errors: Sequence[Optional[str]]) -> np.ndarray:
    """float32 probability of "generated" per row of ``views`` (uint8 NHWC), NaN on rows with an error; the rows
    without one go through ``detector.score_uint8`` together, in one call."""
    import torch  # here, not at import: the decode side of a pipeline never runs the model

    ok = scored_mask(errors)
    scores = np.full(len(errors), np.nan, dtype=np.float32)
    if ok.any():
        pixels = torch.from_numpy(np.ascontiguousarray(views[ok], dtype=np.uint8))
        scores[ok] = detector.score_uint8(pixels).numpy()
    return scores


def scored_mask(errors: Sequence[Optional[str]]) -> np.ndarray:
    """True for each row without an error: the rows that get a score and a verdict."""
    return np.array([err is None for err in errors], dtype=bool)


def verdicts(scores: np.ndarray, errors: Optional[Sequence[Optional[str]]], threshold: float,
             real_threshold: Optional[float] = None) -> list[Optional[str]]:
    """"generated" where ``score >= threshold``, "real" where ``score < real_threshold``, "uncertain" in between;
    None on rows with an error (``errors`` None: no row has one). ``real_threshold`` None (or equal to
    ``threshold``) leaves no band: every scored row is "generated" or "real". Compared in float64, as the metrics
    compare, whatever the scores' dtype (a float32 score next to a float64 threshold). Vectorised: a scoring job
    labels millions of copied rows at once.

    Raises:
        ValueError: ``real_threshold`` above ``threshold`` (the bands would overlap).
    """
    real_threshold = threshold if real_threshold is None else real_threshold
    if real_threshold > threshold:
        raise ValueError(f"real_threshold {real_threshold} is above threshold {threshold}")
    values = np.asarray(scores, dtype=np.float64)
    labels = np.where(values >= threshold, VERDICT_GENERATED,
                      np.where(values < real_threshold, VERDICT_REAL, VERDICT_UNCERTAIN)).astype(object)
    if errors is not None:
        labels[~scored_mask(errors)] = None
    return labels.tolist()
