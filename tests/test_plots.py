"""Figures: what each plot shows must match the numbers it is drawn from."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from jobs import plots
from mpft_core.metrics import reliability_bins


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plots.plt.close("all")


def test_backend_is_headless():
    assert matplotlib.get_backend().lower() == "agg"


def test_roc_curves_one_curve_per_two_class_subset_with_its_auc():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 10 + [1] * 5)
    scores = rng.random(labels.size)
    subsets = np.array(["sd14"] * 10 + ["adm"] * 10 + ["biggan"] * 5)  # biggan: generated only

    fig = plots.roc_curves(labels, scores, subsets)

    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(legend) == 2  # biggan skipped: one class has no ROC
    for name in ("adm", "sd14"):
        chosen = subsets == name
        auc = roc_auc_score(labels[chosen], scores[chosen])
        assert f"{name} (AUC {auc:.3f})" in legend
    assert not any("biggan" in text for text in legend)


def test_roc_curves_without_any_two_class_subset_still_draws():
    fig = plots.roc_curves([1, 1, 0], [0.2, 0.9, 0.4], ["a", "a", "b"])
    assert fig.axes[0].get_legend() is None
    assert any("both classes" in t.get_text() for t in fig.axes[0].texts)


def test_subset_accuracy_bars_heights_are_the_accuracies_including_mean_not_pooled():
    results = {
        "adm": {"acc": 0.75, "acc_real": 0.5, "acc_fake": 1.0},
        "biggan": {"acc": 0.9, "acc_real": float("nan"), "acc_fake": 0.9},
        "mean": {"acc": 0.825, "acc_real": 0.5, "acc_fake": 0.95},
        "all": {"acc": 0.8, "acc_real": 0.5, "acc_fake": 0.93},
    }
    ax = plots.subset_accuracy_bars(results).axes[0]

    assert [t.get_text() for t in ax.get_xticklabels()] == ["adm", "biggan", "mean"]
    heights = [round(p.get_height(), 6) for p in ax.patches]
    # groups: acc for each subset, then acc_real, then acc_fake
    assert heights == [0.75, 0.9, 0.825, 0.5, 0.0, 0.5, 1.0, 0.9, 0.95]
    assert any(t.get_text() == "n/a" for t in ax.texts)  # biggan has no real images


def test_reliability_diagram_draws_each_filled_bin_the_diagonal_the_counts_and_the_ece():
    rng = np.random.default_rng(3)
    scores = rng.uniform(0.3, 1.0, 200)  # the lowest bins stay empty
    labels = (rng.uniform(size=200) < scores ** 2).astype(int)  # over-confident scores
    bins = reliability_bins(labels, scores, n_bins=10)

    fig = plots.reliability_diagram(bins, "Reliability, clean")
    fig.canvas.draw()
    ax, counts_ax = fig.axes

    filled = bins.count > 0
    diagonal, observed = ax.lines
    np.testing.assert_array_equal(diagonal.get_xdata(), [0, 1])
    np.testing.assert_array_equal(diagonal.get_ydata(), [0, 1])
    np.testing.assert_array_equal(observed.get_xdata(), bins.mean_score[filled])
    np.testing.assert_array_equal(observed.get_ydata(), bins.fraction_generated[filled])
    assert len(observed.get_xdata()) == 7 and bins.ece > 0.05
    assert ax.get_title() == f"Reliability, clean (ECE {bins.ece:.4f})"
    assert [p.get_height() for p in counts_ax.patches] == bins.count.tolist()


def test_reliability_diagram_without_images_says_so():
    ax = plots.reliability_diagram(reliability_bins([], []), "Reliability, blur3").axes[0]

    assert ax.get_title() == "Reliability, blur3 (ECE n/a)"
    assert len(ax.lines) == 1  # the diagonal only
    assert any("no scored images" in t.get_text() for t in ax.texts)


def test_mask_grid_greys_exactly_the_masked_patches():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    images[images == plots.MASK_GREY] = 0  # so "is grey" identifies masked pixels unambiguously
    masks = np.zeros((2, 16), dtype=bool)
    masks[0, [0, 5]] = True
    masks[1, 15] = True

    fig = plots.mask_grid(images, masks, grid_size=4)

    assert len(fig.axes) == 4
    original = np.asarray(fig.axes[0].images[0].get_array())
    masked = np.asarray(fig.axes[1].images[0].get_array())
    np.testing.assert_array_equal(original, images[0])
    grey = (masked == plots.MASK_GREY).all(axis=-1)
    expected = np.zeros((32, 32), bool)
    expected[0:8, 0:8] = True  # patch 0
    expected[8:16, 8:16] = True  # patch 5 = row 1, col 1
    np.testing.assert_array_equal(grey, expected)
    np.testing.assert_array_equal(masked[~expected], images[0][~expected])
    last = np.asarray(fig.axes[3].images[0].get_array())
    assert (last[24:, 24:] == plots.MASK_GREY).all() and (last[:24] == images[1][:24]).all()


def test_mask_grid_rejects_masks_of_another_grid():
    with pytest.raises(ValueError, match="grid"):
        plots.mask_grid(np.zeros((1, 32, 32, 3), np.uint8), np.zeros((1, 9), bool), grid_size=4)


def test_feature_space_plots_every_point_coloured_by_subset_marked_by_label():
    rng = np.random.default_rng(2)
    embeddings = rng.normal(size=(12, 8))
    subsets = ["a"] * 6 + ["b"] * 6
    labels = [0, 1, 0, 1, 0, 1, 0, 0, 0, 1, None, None]

    ax = plots.feature_space(embeddings, subsets, labels, "val features").axes[0]

    assert ax.get_title() == "val features"
    legend = sorted(t.get_text() for t in ax.get_legend().get_texts())
    assert legend == ["a / generated", "a / real", "b / generated", "b / real", "b / unlabelled"]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 12
    assert ax.get_xlabel().startswith("PC1")


def test_feature_space_handles_a_single_point():
    ax = plots.feature_space(np.ones((1, 4)), ["a"], [1], "one").axes[0]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 1
