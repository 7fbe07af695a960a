"""The scoring kernel shared by the Ray scoring actor and the registered MLflow model: views, errors, scores,
verdicts."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from mpft_core.imageio import ImageDecodeError, decode_rgb
from mpft_core.scoring import decode_views, describe_failure, score_rows, verdicts
from mpft_core.transforms import eval_view


@pytest.fixture(scope="module")
def detector():
    from mpft_core import BackboneConfig, DetectorConfig, build_detector

    torch.manual_seed(0)
    return build_detector(DetectorConfig(backbone=BackboneConfig(name="mpft-tiny-32", pretrained=None))).eval()


def _png(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_failures_become_texts_for_people():
    assert describe_failure(ImageDecodeError("truncated JPEG")) == "truncated JPEG"
    assert describe_failure(ImageDecodeError()) == "undecodable image"
    assert describe_failure(OSError("disk gone")) == "OSError: disk gone"


def test_each_encoded_form_gives_the_centre_view_or_an_error_row():
    png = _png(40, 20, seed=1)  # smaller than 32 on one side: tiled, then cropped
    encoded = [png, base64.b64encode(png).decode("ascii"), memoryview(png), b"not an image", None,
               "not base64 ~~", 7]

    views, errors = decode_views(encoded, 32)

    expected = eval_view(decode_rgb(png), 32)
    for i in range(3):
        np.testing.assert_array_equal(views[i], expected)
    assert errors[:3] == [None, None, None]
    assert errors[3]  # the decoder's own message
    assert errors[4:] == ["no image bytes in this row", "image is text but not base64-encoded bytes",
                          "image must be encoded bytes, got int"]
    assert views.shape == (7, 32, 32, 3) and views.dtype == np.uint8 and not views[3:].any()


def test_rows_with_an_error_get_nan_and_never_reach_the_model(detector):
    views = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    errors = [None, "truncated JPEG", None, None]

    scores = score_rows(detector, views, errors)
    other_pixels_in_the_error_row = views.copy()
    other_pixels_in_the_error_row[1] = 0

    assert scores.dtype == np.float32 and np.isnan(scores[1])
    np.testing.assert_array_equal(scores[[0, 2, 3]], detector.score_uint8(torch.from_numpy(views[[0, 2, 3]])).numpy())
    np.testing.assert_array_equal(score_rows(detector, other_pixels_in_the_error_row, errors), scores)
    assert np.isnan(score_rows(detector, views[:1], ["broken"])).all()


def test_the_verdict_is_generated_from_the_threshold_up_compared_in_float64():
    scores = np.array([0.5, 0.4999, 0.9, np.float32(0.47)], dtype=np.float32)
    errors = [None, None, "truncated JPEG", None]

    # float32(0.47) is 0.46999999880...: below a float64 threshold of 0.47, although equal to it in float32.
    assert verdicts(scores, errors, 0.5) == ["generated", "real", None, "real"]
    assert verdicts(scores, errors, 0.47) == ["generated", "generated", None, "real"]


def test_scores_between_the_two_thresholds_are_uncertain_with_each_boundary_on_its_side():
    scores = np.array([0.9, 0.7, 0.5, 0.3, 0.29, 0.1, 0.6], dtype=np.float64)
    errors = [None, None, None, None, None, None, "truncated JPEG"]

    # threshold itself is "generated", real_threshold itself "uncertain": only scores strictly below it are "real".
    assert verdicts(scores, errors, 0.7, real_threshold=0.3) == [
        "generated", "generated", "uncertain", "uncertain", "real", "real", None]


def test_without_a_real_threshold_or_with_it_at_threshold_there_is_no_uncertain_band():
    scores = np.array([0.5, 0.4999, 0.9, np.float32(0.47)], dtype=np.float32)
    errors = [None, None, "truncated JPEG", None]
    two_verdicts = ["generated", "real", None, "real"]

    assert verdicts(scores, errors, 0.5) == two_verdicts
    assert verdicts(scores, errors, 0.5, real_threshold=None) == two_verdicts
    assert verdicts(scores, errors, 0.5, real_threshold=0.5) == two_verdicts


def test_the_band_edge_compares_float32_scores_in_float64():
    score = np.float32(0.3)  # 0.30000001192...: above a float64 real_threshold of 0.3
    assert verdicts(np.array([score]), [None], 0.5, real_threshold=0.3) == ["uncertain"]
    assert verdicts(np.array([score]), [None], 0.5, real_threshold=float(score)) == ["uncertain"]
    assert verdicts(np.array([score]), [None], 0.5, real_threshold=0.30000002) == ["real"]


def test_a_real_threshold_above_the_threshold_is_refused():
    with pytest.raises(ValueError, match="real_threshold 0.6 is above threshold 0.5"):
        verdicts(np.array([0.55]), [None], 0.5, real_threshold=0.6)
