"""Per-subset metrics agree with scikit-learn (ECE with a plain per-bin loop) computed independently; threshold rule,
ECE binning and threshold calibration are exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from mpft_core.metrics import (
    binary_metrics,
    calibrate_real_threshold,
    calibrate_threshold,
    expected_calibration_error,
    metrics_table,
    per_subset_metrics,
    reliability_bins,
    to_markdown,
)

# Imbalanced sizes and unequal difficulty on purpose: the mean over subsets must not be the pooled number.
SUBSET_SIZES = {"adm": (40, 10), "biggan": (5, 60), "glide": (25, 25), "midjourney": (70, 3)}  # (n_real, n_fake)
SEPARATION = {"adm": 0.5, "biggan": 0.1, "glide": 0.3, "midjourney": 0.4}


def random_eval_set(seed: int = 0):
    """Scores that are informative but noisy, so no metric is trivially 0 or 1."""
    rng = np.random.default_rng(seed)
    labels, scores, subsets = [], [], []
    for name, (n_real, n_fake) in SUBSET_SIZES.items():
        y = np.array([0] * n_real + [1] * n_fake)
        s = np.clip(rng.normal(0.5 + SEPARATION[name] * (y - 0.5), 0.2), 0.0, 1.0)
        labels.append(y), scores.append(s), subsets.append(np.full(y.size, name))
    order = rng.permutation(sum(a + b for a, b in SUBSET_SIZES.values()))  # subsets interleaved, as in real data
    return np.concatenate(labels)[order], np.concatenate(scores)[order], np.concatenate(subsets)[order]


def loop_ece(y, s, n_bins: int = 15) -> float:
    """ECE written out bin by bin: bin b holds scores in [b/n, (b+1)/n), the last bin also 1.0."""
    total = 0.0
    for b in range(n_bins):
        upper_ok = (s <= 1.0) if b == n_bins - 1 else (s < (b + 1) / n_bins)
        inside = (s >= b / n_bins) & upper_ok
        if inside.any():
            total += inside.sum() / s.size * abs(y[inside].mean() - s[inside].mean())
    return total


def sklearn_reference(labels, scores, subsets, threshold):
    reference = {}
    for name in SUBSET_SIZES:
        y, s = labels[subsets == name], scores[subsets == name]
        pred = (s >= threshold).astype(int)
        reference[name] = {
            "acc": accuracy_score(y, pred),
            "acc_real": accuracy_score(y[y == 0], pred[y == 0]),
            "acc_fake": accuracy_score(y[y == 1], pred[y == 1]),
            "ap": average_precision_score(y, s),
            "auc": roc_auc_score(y, s),
            "ece": loop_ece(y, s),
            "n": y.size,
            "n_real": int((y == 0).sum()),
            "n_fake": int((y == 1).sum()),
        }
    return reference


@pytest.mark.parametrize("threshold", [0.5, 0.42])
def test_per_subset_metrics_match_sklearn_on_each_full_subset(threshold):
    labels, scores, subsets = random_eval_set()
    result = per_subset_metrics(labels, scores, subsets, threshold=threshold)
    reference = sklearn_reference(labels, scores, subsets, threshold)

    for name, expected in reference.items():
        for metric, value in expected.items():
            assert result[name][metric] == pytest.approx(value, abs=1e-12), (name, metric)
    for metric in ("acc", "acc_real", "acc_fake", "ap", "auc", "ece"):
        assert result["mean"][metric] == pytest.approx(np.mean([r[metric] for r in reference.values()]), abs=1e-12)
    assert result["all"]["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["all"]["ece"] == pytest.approx(loop_ece(labels, scores), abs=1e-12)
    assert result["all"]["acc"] == pytest.approx(accuracy_score(labels, (scores >= threshold).astype(int)))
    # Imbalanced subsets: the paper's "mean accuracy" is not the pooled accuracy.
    assert abs(result["mean"]["acc"] - result["all"]["acc"]) > 1e-3
    assert result["mean"]["n"] == labels.size


def test_score_equal_to_threshold_counts_as_generated():
    result = binary_metrics([0, 1, 0, 1], [0.5, 0.5, 0.49999, 0.7], threshold=0.5)
    # 0.5 >= 0.5 -> generated: the real image at 0.5 is wrong, the fake at 0.5 is right.
    assert result["acc_real"] == 0.5
    assert result["acc_fake"] == 1.0
    assert result["acc"] == 0.75


def test_single_class_subset_gives_nan_ap_auc_without_crashing():
    labels = np.array([1, 1, 1, 0, 1])
    scores = np.array([0.9, 0.2, 0.8, 0.1, 0.7])
    subsets = np.array(["fakes_only", "fakes_only", "fakes_only", "mixed", "mixed"])
    result = per_subset_metrics(labels, scores, subsets)

    only_fakes = result["fakes_only"]
    assert math.isnan(only_fakes["ap"]) and math.isnan(only_fakes["auc"]) and math.isnan(only_fakes["acc_real"])
    assert only_fakes["acc"] == pytest.approx(2 / 3) and only_fakes["acc_fake"] == pytest.approx(2 / 3)
    # NaN-aware mean: the single-class subset does not poison the mean AP, it is just left out.
    assert result["mean"]["ap"] == pytest.approx(result["mixed"]["ap"])
    assert result["mean"]["acc"] == pytest.approx((2 / 3 + 1.0) / 2)


def test_metrics_table_and_markdown_show_every_subset_and_the_mean():
    labels, scores, subsets = random_eval_set()
    table = metrics_table(labels, scores, subsets)
    assert table["subset"].tolist() == sorted(SUBSET_SIZES) + ["mean"]
    assert list(table.columns) == ["subset", "n", "n_real", "n_fake", "acc", "acc_real", "acc_fake", "ap", "auc",
                                   "ece"]

    markdown = to_markdown(table)
    lines = markdown.strip().splitlines()
    assert lines[0].split("|")[1].strip() == "subset"
    assert len(lines) == 2 + len(SUBSET_SIZES) + 1
    expected_acc = per_subset_metrics(labels, scores, subsets)["glide"]["acc"]
    glide_row = next(line for line in lines if line.startswith("| glide "))
    assert f"{expected_acc:.4f}" in glide_row


def test_markdown_marks_undefined_values_and_escapes_pipes():
    table = metrics_table([1, 1, 0, 1], [0.9, 0.8, 0.1, 0.4], ["a|b", "a|b", "c", "c"])
    markdown = to_markdown(table)
    assert "a\\|b" in markdown
    a_row = next(line for line in markdown.splitlines() if "a\\|b" in line)
    assert "n/a" in a_row  # AP of a fakes-only subset


def test_ece_of_calibrated_scores_is_zero():
    # Of the images scored 0.25 one in four is generated, of those scored 0.75 three in four: calibrated.
    labels = [1, 0, 0, 0, 1, 1, 1, 0]
    scores = [0.25] * 4 + [0.75] * 4

    assert expected_calibration_error(labels, scores) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_a_constant_confident_score_on_half_real_images_is_the_gap():
    # Every image scored 0.9 but only half generated: |0.5 - 0.9| in the one filled bin.
    assert expected_calibration_error([0, 1] * 10, [0.9] * 20) == pytest.approx(0.4, abs=1e-12)


def test_ece_weights_each_bin_by_its_share_of_images():
    # Bin [0, 0.5): one fake scored 0.1 (gap 0.9); bin [0.5, 1]: three reals scored 0.6 (gap 0.6).
    ece = expected_calibration_error([1, 0, 0, 0], [0.1, 0.6, 0.6, 0.6], n_bins=2)
    assert ece == pytest.approx(0.25 * 0.9 + 0.75 * 0.6, abs=1e-12)


def test_reliability_bins_put_edge_scores_in_the_bin_above_and_one_in_the_last():
    bins = reliability_bins([1, 0, 1, 0], [0.0, 0.5, 1.0, 0.25], n_bins=2)

    np.testing.assert_array_equal(bins.lower, [0.0, 0.5])
    np.testing.assert_array_equal(bins.upper, [0.5, 1.0])
    np.testing.assert_array_equal(bins.count, [2, 2])  # 0.5 in [0.5, 1], 1.0 there too
    np.testing.assert_allclose(bins.mean_score, [0.125, 0.75])
    np.testing.assert_allclose(bins.fraction_generated, [0.5, 0.5])
    assert bins.ece == pytest.approx(0.5 * 0.375 + 0.5 * 0.25)

    fifteen = reliability_bins([1, 1, 0], [1.0, 14 / 15, 0.0])
    assert fifteen.count[-1] == 2 and fifteen.count[0] == 1 and fifteen.count.sum() == 3


def test_reliability_bins_mark_empty_bins_as_undefined_not_zero():
    bins = reliability_bins([1, 0], [0.95, 0.9], n_bins=4)

    np.testing.assert_array_equal(bins.count, [0, 0, 0, 2])
    assert np.isnan(bins.mean_score[:3]).all() and np.isnan(bins.fraction_generated[:3]).all()
    assert bins.mean_score[3] == pytest.approx(0.925) and bins.fraction_generated[3] == 0.5
    assert bins.ece == pytest.approx(0.425)


def test_ece_is_defined_on_a_single_class_subset():
    labels = np.array([1, 1, 1, 0, 1])
    scores = np.array([0.9, 0.7, 0.25, 0.1, 0.8])
    subsets = np.array(["fakes_only"] * 3 + ["mixed"] * 2)

    result = per_subset_metrics(labels, scores, subsets)

    # Fakes only: every bin's fraction generated is 1, so each image adds its distance from 1.
    assert result["fakes_only"]["ece"] == pytest.approx((0.1 + 0.3 + 0.75) / 3, abs=1e-12)
    assert math.isnan(result["fakes_only"]["ap"])
    assert result["mean"]["ece"] == pytest.approx((result["fakes_only"]["ece"] + result["mixed"]["ece"]) / 2)


def test_ece_of_no_images_is_undefined():
    assert math.isnan(expected_calibration_error([], []))
    assert math.isnan(binary_metrics([], [])["ece"])


@pytest.mark.parametrize("scores, n_bins, message", [
    ([0.5, 1.2], 15, r"\[0, 1\]"),
    ([-0.1, 0.5], 15, r"\[0, 1\]"),
    ([0.5, 0.6], 0, "n_bins"),
])
def test_ece_rejects_scores_that_are_not_probabilities_and_bad_bin_counts(scores, n_bins, message):
    with pytest.raises(ValueError, match=message):
        expected_calibration_error([0, 1], scores, n_bins=n_bins)


def ufd_like_eval_set(seed: int = 0):
    """UniversalFakeDetect's shape: progan holds both classes; guided and ldm_200 hold only fakes, imagenet and laion
    only real images (the real sets the benchmark pairs them with)."""
    rng = np.random.default_rng(seed)
    sizes = {"progan": (20, 20), "guided": (0, 15), "ldm_200": (0, 25), "imagenet": (12, 0), "laion": (30, 0)}
    labels = np.concatenate([[0] * r + [1] * f for r, f in sizes.values()])
    subsets = np.concatenate([[name] * (r + f) for name, (r, f) in sizes.items()])
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0.0, 1.0)
    return labels, scores, subsets


def test_fake_only_subsets_are_scored_together_with_their_paired_real_subset():
    labels, scores, subsets = ufd_like_eval_set()
    pairs = {"guided": "imagenet", "ldm_200": "laion", "dalle": "laion"}  # dalle absent: its pair is ignored

    result = per_subset_metrics(labels, scores, subsets, pairs=pairs)

    generators = ["guided", "ldm_200", "progan"]
    assert sorted(set(result) - {"mean", "all"}) == generators
    for fake, real in (("guided", "imagenet"), ("ldm_200", "laion"), ("progan", "progan")):
        rows = (subsets == fake) | (subsets == real)
        assert result[fake] == binary_metrics(labels[rows], scores[rows])
        assert result[fake]["n_real"] > 0 and result[fake]["n_fake"] > 0
        assert math.isfinite(result[fake]["ap"]) and math.isfinite(result[fake]["auc"])
    for metric in ("acc", "ap", "auc"):
        assert result["mean"][metric] == pytest.approx(np.mean([result[g][metric] for g in generators]))
    # Every image counts once in the totals, though laion's images stand behind one subset, imagenet's behind another.
    assert result["mean"]["n"] == result["all"]["n"] == labels.size
    assert metrics_table(labels, scores, subsets, pairs=pairs)["subset"].tolist() == generators + ["mean"]


def test_a_subset_cannot_be_both_paired_and_a_pair_s_real_subset():
    with pytest.raises(ValueError, match="laion"):
        per_subset_metrics([1, 0, 0], [0.9, 0.1, 0.2], ["dalle", "laion", "coco"],
                           pairs={"dalle": "laion", "laion": "coco"})


@pytest.mark.parametrize("subsets, labels, message", [
    (["guided", "progan", "progan"], [1, 0, 1], "'guided' is paired with real subset 'imagenet', which has no images"),
    (["imagenet", "progan", "progan"], [0, 0, 1], "'imagenet' .*'guided'.* has no images"),
    (["guided", "imagenet", "imagenet"], [1, 0, 1], "real subset 'imagenet' .*holds generated images"),
    (["guided", "guided", "imagenet"], [1, 0, 0], "subset 'guided' .*holds real images"),
])
def test_a_pair_with_one_side_absent_or_holding_the_other_class_is_an_error(subsets, labels, message):
    # Scored anyway, a fake-only set would have no AP/AUC but enter the mean accuracy, a lone real set would count
    # as a generator, and a mixed set would be merged unnoticed.
    with pytest.raises(ValueError, match=message):
        per_subset_metrics(labels, [0.5] * len(labels), subsets, pairs={"guided": "imagenet"})


def test_pairs_whose_subsets_are_both_absent_are_ignored():
    result = per_subset_metrics([0, 1], [0.2, 0.8], ["progan", "progan"], pairs={"guided": "imagenet"})

    assert set(result) == {"progan", "mean", "all"}


def test_reserved_subset_name_is_rejected():
    with pytest.raises(ValueError, match="reserved"):
        per_subset_metrics([0, 1], [0.1, 0.9], ["mean", "x"])


@pytest.mark.parametrize("target_fpr", [0.0, 0.01, 0.05, 0.1, 0.29, 0.5])
def test_calibrated_threshold_is_the_tightest_meeting_the_target(target_fpr):
    rng = np.random.default_rng(1)
    real = rng.uniform(0, 1, size=100).astype(np.float32)  # detector outputs are float32
    threshold = calibrate_threshold(real, target_fpr)

    assert _false_positive_rate(real, threshold) <= target_fpr
    # Any lower threshold, down to the next score below, breaks the target: nothing tighter exists.
    just_below = np.nextafter(np.float32(threshold), np.float32(-np.inf))
    assert _false_positive_rate(real, float(just_below)) > target_fpr
    # Distinct scores: the target is met exactly where it is reachable.
    assert _false_positive_rate(real, threshold) == pytest.approx(math.floor(target_fpr * 100 + 1e-9) / 100)
    # Same answer when compared in float32, as a torch scorer would.
    assert int((real >= np.float32(threshold)).sum()) == int((real >= threshold).sum())


def test_calibration_with_tied_scores_stays_under_the_target():
    real = np.array([0.9, 0.9, 0.9, 0.2, 0.1, 0.1, 0.05, 0.05, 0.01, 0.0])
    threshold = calibrate_threshold(real, 0.2)  # 2 allowed, but the top 3 tie: none can be flagged
    assert _false_positive_rate(real, threshold) == 0.0
    assert threshold == pytest.approx(0.9) and threshold > 0.9


def test_calibration_rejects_empty_and_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        calibrate_threshold([], 0.05)
    with pytest.raises(ValueError):
        calibrate_threshold([0.1, 0.2], 1.0)
    with pytest.raises(ValueError):
        calibrate_threshold([0.1, float("nan")], 0.05)


@pytest.mark.parametrize("target_miss_rate", [0.0, 0.01, 0.05, 0.1, 0.29, 0.5])
def test_calibrated_real_threshold_is_the_highest_meeting_the_miss_target(target_miss_rate):
    rng = np.random.default_rng(2)
    fake = rng.uniform(0, 1, size=100).astype(np.float32)  # detector outputs are float32
    real_threshold = calibrate_real_threshold(fake, target_miss_rate)

    assert _miss_rate(fake, real_threshold) <= target_miss_rate
    # Any higher threshold, up to the next float32 above, misses one more generated image: nothing higher exists.
    just_above = np.nextafter(np.float32(real_threshold), np.float32(np.inf))
    assert _miss_rate(fake, float(just_above)) > target_miss_rate
    # Distinct scores: the target is met exactly where it is reachable.
    assert _miss_rate(fake, real_threshold) == pytest.approx(math.floor(target_miss_rate * 100 + 1e-9) / 100)
    # Same answer when compared in float32, as a torch scorer would.
    assert int((fake < np.float32(real_threshold)).sum()) == int((fake < real_threshold).sum())


def test_real_threshold_calibration_with_tied_scores_stays_under_the_target():
    fake = np.array([0.1, 0.3, 0.3, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    real_threshold = calibrate_real_threshold(fake, 0.2)  # 2 misses allowed, but 0.3 is shared by 3: only 0.1 goes
    assert _miss_rate(fake, real_threshold) == pytest.approx(0.1)
    assert real_threshold == 0.3  # a score equal to the threshold is not called real


def test_real_threshold_calibration_rejects_empty_and_bad_inputs():
    with pytest.raises(ValueError, match="empty set of generated scores"):
        calibrate_real_threshold([], 0.05)
    with pytest.raises(ValueError, match="target_miss_rate"):
        calibrate_real_threshold([0.1, 0.2], 1.0)
    with pytest.raises(ValueError, match="target_miss_rate"):
        calibrate_real_threshold([0.1, 0.2], -0.1)
    with pytest.raises(ValueError, match="NaN"):
        calibrate_real_threshold([0.1, float("nan")], 0.05)


def test_mismatched_or_invalid_inputs_raise():
    with pytest.raises(ValueError):
        binary_metrics([0, 1], [0.3])
    with pytest.raises(ValueError):
        binary_metrics([0, 2], [0.3, 0.4])


def _false_positive_rate(real_scores, threshold: float) -> float:
    """Fraction of real images flagged as generated at ``threshold`` (the verdict rule: score >= threshold)."""
    return float((np.asarray(real_scores, dtype=np.float64) >= threshold).mean())


def _miss_rate(fake_scores, real_threshold: float) -> float:
    """Fraction of generated images called real at ``real_threshold`` (the verdict rule: score < real_threshold)."""
    return float((np.asarray(fake_scores, dtype=np.float64) < real_threshold).mean())
