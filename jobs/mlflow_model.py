"""The registry artefact: an MLflow pyfunc that scores raw encoded images with an MPFT safetensors checkpoint.

    model = mlflow.pyfunc.load_model("models:/mpft-detector@champion")
    model.predict(pd.DataFrame({"image": [png_bytes, jpeg_bytes, webp_bytes]}))
    #    score  verdict    threshold  real_threshold  error
    # 0  0.912  generated  0.37       0.21            None
    # 1  0.294  uncertain  0.37       0.21            None
    # 2  0.103  real       0.37       0.21            None

Preprocessing travels with the model, in ``mpft_core.scoring`` (the kernel of the Ray scoring actor too): decode
(``mpft_core.imageio.decode_rgb``, EXIF applied, pixel limit enforced), tile + centre crop to the model's input size
(``mpft_core.transforms.eval_view``, never a resize), then ``detector.score_uint8``. The weights are the project's
own checkpoint files (``model.safetensors`` + ``mpft.json``), logged as a pyfunc artifact and rebuilt with
``load_checkpoint`` in ``load_context``: nothing torch-related is pickled. An image that cannot be decoded becomes a
row with an ``error`` message and a NaN score, never an exception, so one corrupt upload cannot fail a whole batch.

This module imports mlflow only because the pyfunc class must subclass ``mlflow.pyfunc.PythonModel``; everything
else about MLflow lives in ``jobs/tracking.py``.
"""

from __future__ import annotations

from typing import Optional

import mlflow.pyfunc
import numpy as np
import pandas as pd

from mpft_core.imageio import DEFAULT_MAX_PIXELS
from mpft_core.scoring import decode_views, score_rows, verdicts

# Name of the pyfunc artifact holding model.safetensors + mpft.json (jobs.tracking logs and resolves it).
CHECKPOINT_ARTIFACT = "checkpoint"
IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = ("score", "verdict", "threshold", "real_threshold", "error")
# Rows decoded and scored together: bounds memory for large inputs while keeping the model's matmuls batched.
SCORE_BATCH_SIZE = 32


class MPFTImageScorer(mlflow.pyfunc.PythonModel):
    """pyfunc model: DataFrame with an ``image`` column of encoded bytes -> score / verdict / threshold /
    real_threshold / error."""

    def load_context(self, context) -> None:
        # Imported here so that unpickling the (stateless) model object does not need the checkpoint machinery.
        from mpft_core.checkpoint import load_checkpoint
        from mpft_core.detector import pick_device

        self.detector = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT], map_location=pick_device())

    # The DataFrame annotation tells MLflow not to derive a signature from type hints (the logged one is explicit).
    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict] = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if IMAGE_COLUMN not in frame.columns:
            raise ValueError(f"input needs a column {IMAGE_COLUMN!r} of encoded image bytes; got {list(frame.columns)}")
        max_pixels = int((params or {}).get("max_pixels", DEFAULT_MAX_PIXELS))
        return score_encoded_images(self.detector, frame[IMAGE_COLUMN].tolist(), max_pixels=max_pixels,
                                    index=frame.index)


def score_encoded_images(detector, images: list, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                         batch_size: int = SCORE_BATCH_SIZE, index=None) -> pd.DataFrame:
    """Score encoded images (bytes-like, or base64 text as sent through MLflow's REST API) in input order.

    Returns a DataFrame with ``OUTPUT_COLUMNS``; an undecodable image gives score NaN, verdict None and a message in
    ``error`` (None on every good row). The verdict is "generated" from ``threshold`` up, "real" below
    ``real_threshold``, "uncertain" in between (``mpft_core.scoring.verdicts``).
    """
    threshold, real_threshold = float(detector.threshold), float(detector.real_threshold)
    scores = np.full(len(images), np.nan, dtype=np.float64)
    errors: list[Optional[str]] = [None] * len(images)
    for start in range(0, len(images), batch_size):
        chunk = slice(start, start + batch_size)
        views, chunk_errors = decode_views(images[chunk], detector.preprocess.image_size, max_pixels)
        errors[chunk] = chunk_errors
        # float32 -> float64 is exact, so the output equals the detector's own numbers bit for bit.
        scores[chunk] = score_rows(detector, views, chunk_errors)
    return pd.DataFrame(
        {"score": scores, "verdict": verdicts(scores, errors, threshold, real_threshold),
         "threshold": np.full(len(images), threshold), "real_threshold": np.full(len(images), real_threshold),
         "error": errors},
        index=index if index is not None else pd.RangeIndex(len(images)),
        columns=list(OUTPUT_COLUMNS),
    )
