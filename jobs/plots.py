"""Figures for MLflow runs. Each function returns a matplotlib Figure; ``jobs.tracking.log_figure`` logs and closes it.

The Agg backend is selected before pyplot is imported: jobs run headless (Ray workers, CI, containers) and an
interactive backend would try to open a display.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (must come after the backend choice)
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

if TYPE_CHECKING:
    from mpft_core.metrics import ReliabilityBins

ACCURACY_BARS = (("acc", "accuracy"), ("acc_real", "accuracy on real"), ("acc_fake", "accuracy on generated"))
MEAN_KEY = "mean"  # mpft_core.metrics.MEAN_KEY / POOLED_KEY (not imported: keeps this module free of torch)
POOLED_KEY = "all"
MASK_GREY = 128
LABEL_MARKERS = {0: ("o", "real"), 1: ("^", "generated")}
UNLABELLED_MARKER = ("x", "unlabelled")


def roc_curves(labels, scores, subsets) -> Figure:
    """One ROC curve per subset (AUC in the legend); subsets holding only one class have no ROC and are skipped."""
    labels, scores, subsets = np.asarray(labels), np.asarray(scores, dtype=float), np.asarray(subsets).astype(str)
    fig, ax = plt.subplots(figsize=(6, 6))
    skipped = []
    for name in sorted(set(subsets.tolist())):
        y, s = labels[subsets == name], scores[subsets == name]
        if len(set(y.tolist())) < 2:
            skipped.append(name)
            continue
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    ax.set(xlabel="false positive rate (real called generated)", ylabel="true positive rate (generated caught)",
           xlim=(0, 1), ylim=(0, 1.01), title="ROC per subset")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no subset holds both classes", ha="center", va="center", transform=ax.transAxes)
    if skipped:
        fig.text(0.01, 0.01, f"one class only, no ROC: {', '.join(skipped)}", fontsize="x-small", color="grey")
    fig.tight_layout()
    return fig


def subset_accuracy_bars(results: dict) -> Figure:
    """Grouped bars of acc / acc_real / acc_fake per subset and for the mean (``per_subset_metrics`` output).

    The pooled ``all`` row is left out: the figure is about how each generator fares. An undefined accuracy (class
    absent from a subset) is drawn as "n/a" instead of a zero-height bar that would read as 0 %.
    """
    names = [n for n in results if n not in (MEAN_KEY, POOLED_KEY)]
    if MEAN_KEY in results:
        names.append(MEAN_KEY)
    x = np.arange(len(names))
    width = 0.8 / len(ACCURACY_BARS)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.5))
    for i, (key, label) in enumerate(ACCURACY_BARS):
        values = np.array([float(results[n].get(key, np.nan)) for n in names])
        positions = x + (i - (len(ACCURACY_BARS) - 1) / 2) * width
        ax.bar(positions, np.nan_to_num(values, nan=0.0), width, label=label)
        for pos, value in zip(positions, values, strict=True):
            if np.isnan(value):
                ax.text(pos, 0.01, "n/a", ha="center", va="bottom", fontsize="x-small", rotation=90)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylim=(0, 1.05), ylabel="accuracy", title="Accuracy per subset")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    return fig


def sweep_comparison(summary, select: str) -> Figure:
    """Grouped bars per sweep group (``jobs.sweep.summary_table``): accuracy on seen and unseen generators (each
    condition) with the seeds' standard deviation as error bars; the validation metric ``select`` when the sweep had
    no test set."""
    keys = [c for c in summary.columns if not c.endswith((" mean", " std")) and c != "n"]
    figures = [c[: -len(" mean")] for c in summary.columns if c.endswith(" mean") and "_acc" in c
               and c.startswith(("seen_", "unseen_"))] or [select]
    labels = [" / ".join(str(row[k]) for k in keys) for _, row in summary.iterrows()]
    x = np.arange(len(labels))
    width = 0.8 / len(figures)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(labels) * len(figures) + 2), 4.8))
    for i, figure in enumerate(figures):
        means = summary[f"{figure} mean"].to_numpy(dtype=float)
        stds = np.nan_to_num(summary[f"{figure} std"].to_numpy(dtype=float), nan=0.0)
        ax.bar(x + (i - (len(figures) - 1) / 2) * width, np.nan_to_num(means, nan=0.0), width, yerr=stds,
               capsize=2, label=figure)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize="small")
    ax.set(ylim=(0, 1.05), ylabel="mean over seeds", title="Sweep: " + " / ".join(keys))
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.legend(fontsize="x-small", loc="lower right")
    fig.tight_layout()
    return fig


def reliability_diagram(bins: ReliabilityBins, title: str) -> Figure:
    """Observed fraction generated against mean predicted probability per non-empty score bin, beside the diagonal
    of perfect calibration, with the images per bin underneath and the ECE in the title.

    ``bins`` is ``mpft_core.metrics.reliability_bins`` output; every number drawn is taken from it as it is. A point
    below the diagonal means over-confident "generated" scores there, above it under-confident ones.
    """
    fig, (ax, counts_ax) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    filled = np.asarray(bins.count) > 0
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="perfectly calibrated")
    if filled.any():
        ax.plot(bins.mean_score[filled], bins.fraction_generated[filled], marker="o", label="observed")
    else:
        ax.text(0.5, 0.5, "no scored images", ha="center", va="center", transform=ax.transAxes)
    ece = "n/a" if np.isnan(bins.ece) else f"{bins.ece:.4f}"
    ax.set(ylabel="fraction generated", xlim=(0, 1), ylim=(-0.01, 1.01), title=f"{title} (ECE {ece})")
    ax.legend(loc="upper left", fontsize="small")
    counts_ax.bar(bins.lower, bins.count, width=bins.upper - bins.lower, align="edge", color="grey",
                  edgecolor="white")
    counts_ax.set(xlabel="predicted probability of generated", ylabel="images per bin")
    fig.tight_layout()
    return fig


def masked_copy(image: np.ndarray, mask: np.ndarray, grid_size: int) -> np.ndarray:
    """``image`` (uint8 HWC) with the patches where ``mask`` (bool, ``grid_size**2``, raster order) is True greyed."""
    patch = image.shape[0] // grid_size
    # Row-major patch grid -> pixel mask, as the detector's own fill does it; pixels past the last patch stay.
    pixel_mask = np.kron(np.asarray(mask, dtype=bool).reshape(grid_size, grid_size), np.ones((patch, patch), bool))
    out = image.copy()
    out[: pixel_mask.shape[0], : pixel_mask.shape[1]][pixel_mask] = MASK_GREY
    return out


def mask_grid(images: np.ndarray, masks: np.ndarray, grid_size: int) -> Figure:
    """Each training image (uint8 ``[N, S, S, 3]``) beside its TAM-masked version (masks bool ``[N, grid**2]``)."""
    images, masks = np.asarray(images), np.asarray(masks, dtype=bool)
    if images.ndim != 4 or masks.shape != (images.shape[0], grid_size * grid_size):
        raise ValueError(f"images {images.shape} / masks {masks.shape} do not match a {grid_size}x{grid_size} grid")
    n = images.shape[0]
    fig, axes = plt.subplots(n, 2, figsize=(4, 2 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i])
        axes[i, 1].imshow(masked_copy(images[i], masks[i], grid_size))
        axes[i, 1].set_title(f"masked {int(masks[i].sum())}/{masks.shape[1]}", fontsize="x-small")
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].set_title("input", fontsize="x-small")
    fig.tight_layout()
    return fig


def feature_space(embeddings: np.ndarray, subsets, labels, title: str) -> Figure:
    """2-D PCA of image embeddings: colour = subset, marker = label (real / generated / unlabelled)."""
    emb = np.asarray(embeddings, dtype=np.float64)
    subsets = np.asarray(subsets).astype(str)
    label_keys = np.array([_label_key(v) for v in labels], dtype=object)
    if emb.ndim != 2 or not len(emb) == len(subsets) == len(label_keys):
        raise ValueError(f"embeddings {emb.shape}, subsets ({len(subsets)}) and labels ({len(label_keys)}) disagree")
    coords, explained = _pca_2d(emb)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    colours = plt.get_cmap("tab10" if len(set(subsets.tolist())) <= 10 else "tab20")
    for ci, name in enumerate(sorted(set(subsets.tolist()))):
        for key in sorted(set(label_keys.tolist()), key=str):
            chosen = (subsets == name) & (label_keys == key)
            if chosen.any():
                marker, label_name = LABEL_MARKERS.get(key, UNLABELLED_MARKER)
                ax.scatter(coords[chosen, 0], coords[chosen, 1], marker=marker, s=18, alpha=0.8,
                           color=colours(ci % colours.N), label=f"{name} / {label_name}")
    ax.set(title=title, xlabel=f"PC1 ({explained[0]:.0%} of variance)", ylabel=f"PC2 ({explained[1]:.0%})")
    ax.legend(fontsize="x-small", loc="best", markerscale=1.2)
    fig.tight_layout()
    return fig


def _label_key(value):
    try:
        key = int(value)
    except (TypeError, ValueError):  # None, NaN, pd.NA: unlabelled
        return None
    return key if key in LABEL_MARKERS else None


def _pca_2d(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates ``[N, 2]`` and explained-variance ratios; degenerate inputs (N or D < 2) are padded with zeros."""
    components = min(2, emb.shape[0], emb.shape[1])
    coords = np.zeros((emb.shape[0], 2))
    explained = np.zeros(2)
    if components >= 1 and emb.shape[0] >= 2:
        pca = PCA(n_components=components, random_state=0)
        coords[:, :components] = pca.fit_transform(emb)
        explained[:components] = np.nan_to_num(pca.explained_variance_ratio_)
    return coords, explained


def score_histogram(bin_edges, counts, title: str, thresholds=()) -> Figure:
    """Images per score bin (``jobs.score_report`` counts on fixed bins), with the decision thresholds as
    vertical lines; ``thresholds`` are (value, label) pairs, None values skipped."""
    edges, counts = np.asarray(bin_edges, dtype=float), np.asarray(counts, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:blue", edgecolor="white")
    for value, label in thresholds:
        if value is not None:
            ax.axvline(value, color="tab:red", linestyle="--", linewidth=1, label=f"{label} {value:.3f}")
    if not counts.any():
        ax.text(0.5, 0.5, "no scored images", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="score (probability of generated)", ylabel="images", xlim=(0, 1),
           title=f"{title} ({int(counts.sum())} scored)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="upper center")
    fig.tight_layout()
    return fig


def drift_histograms(bin_edges, baseline_counts, current_counts, title: str) -> Figure:
    """Baseline and current score distributions side by side as shares per bin (the runs may differ in size), so
    the bins the population stability index weighs most are visible."""
    edges = np.asarray(bin_edges, dtype=float)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = np.diff(edges) / 2
    for offset, (counts, label, colour) in enumerate(((baseline_counts, "baseline", "tab:grey"),
                                                      (current_counts, "current", "tab:orange"))):
        counts = np.asarray(counts, dtype=float)
        share = counts / counts.sum() if counts.sum() else counts
        ax.bar(edges[:-1] + offset * width, share, width=width, align="edge", color=colour,
               label=f"{label} ({int(counts.sum())} scored)")
    ax.set(xlabel="score (probability of generated)", ylabel="share of scored images", xlim=(0, 1), title=title)
    ax.legend(fontsize="small", loc="upper center")
    fig.tight_layout()
    return fig
