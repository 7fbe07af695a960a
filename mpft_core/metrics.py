"""Detection metrics per subset (generator), calibration of the scores, and decision-threshold calibration.

Conventions used throughout:

* ``labels``: 1 = generated (fake), 0 = real.
* ``scores``: the detector's probability that an image is generated.
* Prediction rule: an image is called *generated* iff ``score >= threshold``; otherwise *real*.

Every number is computed once on the full subset (docs/METHOD.md): no resampling, no averaging of per-batch values.
Average precision and ROC AUC need both classes, so they are NaN on a subset that holds only one class (a common case:
a test folder of one generator's fakes only); per-class accuracies are NaN when that class is absent. Benchmarks that
ship fake-only test sets pair each with a real-only set (UniversalFakeDetect: guided with ImageNet, LDM / Glide /
DALL-E with LAION): ``pairs`` scores a fake-only subset together with its real subset's images.

Expected calibration error (``ece``) asks whether the scores can be read as probabilities: among images scored about
0.8, are about 80 % generated? It needs no threshold and is defined on a single-class subset too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

RATE_METRICS = ("acc", "acc_real", "acc_fake", "ap", "auc", "ece")
COUNT_FIELDS = ("n", "n_real", "n_fake")
MEAN_KEY = "mean"
POOLED_KEY = "all"
TABLE_COLUMNS = ("subset",) + COUNT_FIELDS + RATE_METRICS
CALIBRATION_BINS = 15  # as in Guo et al. 2017 ("On Calibration of Modern Neural Networks"), so ECEs compare


# --- input checks -------------------------------------------------------------------------------------------------
def _as_labels(labels) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError("labels must be 0 (real) or 1 (generated)")
    return arr.astype(np.int64)


def _as_scores(scores) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("scores contain NaN or infinite values")
    return arr


def _as_probabilities(scores) -> np.ndarray:
    arr = _as_scores(scores)
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"calibration needs probabilities in [0, 1], got scores in [{arr.min()}, {arr.max()}]")
    return arr


def _checked_pair(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y, s = _as_labels(labels), _as_scores(scores)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    return y, s


# --- one set of images --------------------------------------------------------------------------------------------
def _fraction_correct(correct: np.ndarray) -> float:
    return float(correct.mean()) if correct.size else math.nan


def binary_metrics(labels, scores, threshold: float = 0.5) -> dict:
    """Accuracy (overall / real only / fake only) at ``threshold``, AP, ROC AUC, expected calibration error (which
    ignores ``threshold``) and counts for one set of images.

    Returns a dict with keys ``acc, acc_real, acc_fake, ap, auc, ece, n, n_real, n_fake``. Rates are floats and may
    be NaN (see module docstring; ``ece`` only when there are no images); counts are ints. ValueError if a score is
    outside [0, 1].
    """
    # Imported here: scikit-learn costs ~0.8 s to import, and most importers (config checks, decode workers) never
    # rank anything.
    from sklearn.metrics import average_precision_score, roc_auc_score

    y, s = _checked_pair(labels, scores)
    predicted = (s >= threshold).astype(np.int64)
    correct = predicted == y
    is_fake = y == 1
    both_classes = bool(is_fake.any() and (~is_fake).any())
    return {
        "acc": _fraction_correct(correct),
        "acc_real": _fraction_correct(correct[~is_fake]),
        "acc_fake": _fraction_correct(correct[is_fake]),
        "ap": float(average_precision_score(y, s)) if both_classes else math.nan,
        "auc": float(roc_auc_score(y, s)) if both_classes else math.nan,
        "ece": expected_calibration_error(y, s),
        "n": int(y.size),
        "n_real": int((~is_fake).sum()),
        "n_fake": int(is_fake.sum()),
    }


# --- calibration of the scores ------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ReliabilityBins:
    """Images grouped by score into equal-width bins on [0, 1]: the data behind a reliability diagram.

    Arrays of one entry per bin, lowest scores first. A bin holds the scores in ``[lower, upper)``; the last one also
    holds 1.0. ``mean_score`` and ``fraction_generated`` are NaN for a bin without images.
    """

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    mean_score: np.ndarray
    fraction_generated: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error of the binned images (see ``expected_calibration_error``); NaN if none."""
        total = int(self.count.sum())
        if total == 0:
            return math.nan
        filled = self.count > 0
        gaps = np.abs(self.fraction_generated[filled] - self.mean_score[filled])
        return float(np.sum(self.count[filled] * gaps) / total)


def _check_bin_count(n_bins) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def _mean_per_bin(totals: np.ndarray, count: np.ndarray) -> np.ndarray:
    means = np.full(count.shape, math.nan)
    np.divide(totals, count, out=means, where=count > 0)
    return means


def reliability_bins(labels, scores, n_bins: int = CALIBRATION_BINS) -> ReliabilityBins:
    """Per equal-width score bin on [0, 1]: its bounds, how many images fall in it, their mean score and the
    fraction of them that is generated (``ReliabilityBins``).

    ``scores`` are the probability of "generated" (label 1); a score of exactly 1.0 goes in the last bin, a score on
    an inner edge in the bin above it. ValueError on a score outside [0, 1] or ``n_bins`` < 1.
    """
    _check_bin_count(n_bins)
    y, s = _as_labels(labels), _as_probabilities(scores)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Against the very edges reported as bounds, so a score is always inside the bin it is counted in.
    index = np.minimum(np.searchsorted(edges, s, side="right") - 1, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    return ReliabilityBins(
        lower=edges[:-1],
        upper=edges[1:],
        count=count,
        mean_score=_mean_per_bin(np.bincount(index, weights=s, minlength=n_bins), count),
        fraction_generated=_mean_per_bin(np.bincount(index, weights=y, minlength=n_bins), count),
    )


def expected_calibration_error(labels, scores, n_bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error of the scores as probabilities of "generated", in [0, 1] (0 = calibrated).

    The standard binary-class definition on the positive-class probability: the scores are put in ``n_bins``
    equal-width bins on [0, 1] (a score of exactly 1.0 in the last), and
    ``ECE = sum over bins of (images in bin / n) * |fraction generated in bin - mean score in bin|``.
    It is not the multi-class "top-label confidence" ECE, which would bin max(score, 1 - score) instead.
    No threshold is involved. On a single-class subset it stays defined (the fraction generated is then 0 or 1 in
    every bin); it is NaN only when there are no images. ValueError on a score outside [0, 1] or ``n_bins`` < 1.
    """
    return reliability_bins(labels, scores, n_bins).ece


# --- several subsets ----------------------------------------------------------------------------------------------
def _nan_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    # np.nanmean warns on an all-NaN slice; a metric undefined everywhere is simply undefined on average.
    return float(np.mean(finite)) if finite else math.nan


def _mean_over_subsets(per_subset: dict[str, dict], pooled: dict) -> dict:
    """Unweighted mean of each rate over subsets (NaNs skipped); counts are those of all images (each counted once,
    though a paired real subset stands behind several subsets) so the row still says how much data is behind it."""
    rows = list(per_subset.values())
    mean = {name: _nan_mean([row[name] for row in rows]) for name in RATE_METRICS}
    mean.update({name: pooled[name] for name in COUNT_FIELDS})
    return mean


def pairing_problem(labels, subsets, pairs: Optional[Mapping[str, str]]) -> Optional[str]:
    """Why ``pairs`` cannot score these images as pairs, or None.

    Both subsets of a pair must hold images, or neither (a fake-only set scored alone has no AP/AUC yet enters the
    mean accuracy; a real set scored alone counts as a generator); a pair's real subset must hold real images only
    and the paired subset generated images only; no subset may be on both sides of a pair.
    """
    pairs = dict(pairs or {})
    both = sorted(set(pairs) & set(pairs.values()))
    if both:
        return f"subsets {both} are paired with a real subset and are a pair's real subset themselves"
    y, names = np.asarray(labels), np.asarray(subsets).astype(str)
    present = set(names.tolist())
    for fake, real in sorted(pairs.items()):
        if fake in present and real not in present:
            return f"subset {fake!r} is paired with real subset {real!r}, which has no images"
    for real in sorted(present & set(pairs.values())):
        fakes = sorted(fake for fake, paired in pairs.items() if paired == real)
        if not present & set(fakes):
            return f"real subset {real!r} is paired with {', '.join(map(repr, fakes))}, which has no images"
        if (y[names == real] == 1).any():
            return f"real subset {real!r} (paired with {', '.join(map(repr, fakes))}) holds generated images"
    for fake, real in sorted(pairs.items()):
        if (y[names == fake] == 0).any():
            return f"subset {fake!r} (paired with real subset {real!r}) holds real images"
    return None


def per_subset_metrics(labels, scores, subsets, threshold: float = 0.5,
                       pairs: Optional[Mapping[str, str]] = None) -> dict[str, dict]:
    """``binary_metrics`` on each subset (sorted by name), plus ``"mean"`` and ``"all"``.

    ``pairs`` ({fake-only subset: real-only subset}): a paired subset is scored on its own images plus its real
    subset's; a real subset that some present subset is paired with is not reported on its own (nor in the mean).
    Pairs whose subsets are both absent are ignored; ValueError on any ``pairing_problem``.

    ``"mean"`` is the unweighted, NaN-skipping mean over the reported subsets of each rate — the number papers report
    as "mean accuracy" — with the counts of all images. ``"all"`` is ``binary_metrics`` on the pooled images.
    """
    y, s = _checked_pair(labels, scores)
    names = np.asarray(subsets).astype(str)
    if names.shape != y.shape:
        raise ValueError(f"subsets ({names.size}) and labels ({y.size}) differ in length")
    if y.size == 0:
        raise ValueError("no images to evaluate")
    reserved = {MEAN_KEY, POOLED_KEY} & set(names.tolist())
    if reserved:
        raise ValueError(f"subset names {sorted(reserved)} are reserved for the summary rows")

    problem = pairing_problem(y, names, pairs)
    if problem:
        raise ValueError(f"{problem}: score both subsets of each pair together, or leave the pair out of `pairs`")
    present = set(names.tolist())
    pairs = {fake: real for fake, real in (pairs or {}).items() if fake in present}
    results = {}
    for name in sorted(present - set(pairs.values())):
        rows = (names == name) | (names == pairs[name]) if name in pairs else names == name
        results[name] = binary_metrics(y[rows], s[rows], threshold)
    pooled = binary_metrics(y, s, threshold)
    return {**results, MEAN_KEY: _mean_over_subsets(results, pooled), POOLED_KEY: pooled}


def metrics_table(labels, scores, subsets, threshold: float = 0.5, include_pooled: bool = False,
                  pairs: Optional[Mapping[str, str]] = None) -> pd.DataFrame:
    """One row per subset, then the ``mean`` row (and the pooled ``all`` row if asked); columns ``TABLE_COLUMNS``."""
    return table_from_results(per_subset_metrics(labels, scores, subsets, threshold, pairs), include_pooled)


def table_from_results(results: dict[str, dict], include_pooled: bool = False) -> pd.DataFrame:
    """The DataFrame of ``metrics_table`` from an existing ``per_subset_metrics`` result (no recomputation)."""
    rows = [{"subset": name, **values} for name, values in results.items() if name != POOLED_KEY or include_pooled]
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


# --- markdown -----------------------------------------------------------------------------------------------------
def _format_cell(value, float_digits: int) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "n/a" if math.isnan(value) else f"{float(value):.{float_digits}f}"
    # A literal pipe would split the cell; newlines would break the row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame, float_digits: int = 4) -> str:
    """A GitHub-flavoured markdown table of ``df`` (index not included); numbers right-aligned, NaN as ``n/a``."""
    header = [_format_cell(str(col), float_digits) for col in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[col]) for col in df.columns]
    align = ["---:" if is_num else ":---" for is_num in numeric]
    body = [[_format_cell(value, float_digits) for value in row] for row in df.itertuples(index=False, name=None)]
    lines = [header, align, *body]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


# --- threshold calibration ----------------------------------------------------------------------------------------
def _just_above(value: float, float32_exact: bool) -> float:
    """The smallest float strictly greater than ``value``.

    When the scores are float32 numbers (the detector's output) the step is taken in float32, so the threshold keeps
    its meaning if a consumer compares in float32 too (a float64 step would round back onto ``value``).
    """
    if float32_exact:
        return float(np.nextafter(np.float32(value), np.float32(np.inf)))
    return float(np.nextafter(value, np.inf))


def calibrate_threshold(real_scores, target_fpr: float) -> float:
    """The lowest threshold at which at most ``target_fpr`` of these real images would be flagged as generated.

    With the rule "generated iff score >= threshold", flagging at most ``k = floor(target_fpr * n)`` of ``n`` real
    images requires a threshold strictly above the (k+1)-th highest real score; the result is the next representable
    number above it, i.e. the tightest such threshold. Ties are never split: if several real images share that score
    they are all let through (FPR may land below the target). The result may exceed 1.0 when ``target_fpr`` is so
    small that even the top score (possibly 1.0) must pass as real.

    Use validation images only — never test labels (docs/METHOD.md).

    Raises:
        ValueError: no scores, non-finite scores, or ``target_fpr`` outside [0, 1).
    """
    scores, allowed = _scores_and_allowance(real_scores, target_fpr, "target_fpr", "a threshold", "real")
    highest_first = np.sort(scores)[::-1]
    highest_passing = highest_first[allowed]
    float32_exact = bool((scores.astype(np.float32).astype(np.float64) == scores).all())
    return _just_above(float(highest_passing), float32_exact)


def calibrate_real_threshold(fake_scores, target_miss_rate: float) -> float:
    """The highest threshold below which at most ``target_miss_rate`` of these generated images would score, i.e.
    be called real.

    With the rule "real iff score < real_threshold", missing at most ``k = floor(target_miss_rate * n)`` of ``n``
    generated images allows a threshold up to the (k+1)-th lowest generated score and no higher (a score equal to
    the threshold is not below it); the result is that score itself. Ties are never split: if several generated
    images share that score none of them is missed (the miss rate may land below the target).

    Being one of the scores, the result is a float32 number whenever the scores are (the detector's output), so a
    consumer comparing in float32 draws the same line as one comparing in float64; no step is needed, unlike
    ``calibrate_threshold``.

    Use validation images only — never test labels (docs/METHOD.md).

    Raises:
        ValueError: no scores, non-finite scores, or ``target_miss_rate`` outside [0, 1).
    """
    scores, allowed = _scores_and_allowance(fake_scores, target_miss_rate, "target_miss_rate", "a real threshold",
                                            "generated")
    return float(np.sort(scores)[allowed])


def _scores_and_allowance(scores, rate: float, rate_name: str, what: str, kind: str) -> tuple[np.ndarray, int]:
    """(the checked scores, how many of them a calibration at ``rate`` may put on the wrong side: floor(rate * n),
    at most n - 1); ValueError on no scores, non-finite scores or a rate outside [0, 1)."""
    checked = _as_scores(scores)
    if checked.size == 0:
        raise ValueError(f"cannot calibrate {what} on an empty set of {kind} scores")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{rate_name} must be in [0, 1), got {rate}")
    # The epsilon keeps products like 0.29 * 100 = 28.999999999999996 from losing an allowed image.
    return checked, min(int(math.floor(rate * checked.size + 1e-9)), checked.size - 1)
