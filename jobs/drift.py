"""`mpft drift`: has the stream of images changed between two scoring runs of the same model?

Both sides are scoring outputs (an MLflow scoring run names its output in its params). Every row of each output
counts, as in the scoring run's own summary (``jobs.score_report``). The comparison:

- Population stability index of the scores of scored rows, on the ``jobs.score_report`` bins (``N_BINS`` equal
  bins fixed on [0, 1]):

      PSI = sum over bins i of (c_i - b_i) * ln(c_i / b_i)

  where b_i and c_i are the baseline's and the current run's share of scored rows in bin i, each raised to at least
  ``PSI_EPSILON`` so an empty bin contributes a large but finite term instead of infinity. PSI is symmetric in
  the two runs and 0 for identical histograms. Rule of thumb (credit scoring, where PSI comes from): below 0.1 no
  shift, 0.1-0.2 a moderate one, above 0.2 a significant one; hence `mpft drift`'s default threshold 0.2.
- Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical score distributions
  (bin-free; a complement to PSI for small shifts inside one bin).
- Shift in flagged share: share of scored rows with verdict ``generated``, current minus baseline. Error rows are
  left out of the shares (their share shift is reported as ``error_share_shift``), so a broken crawl does not read
  as fewer generated images.
- Sampling noise of PSI: two samples of one distribution still differ bin by bin, and their PSI is about

      psi_expected_noise = (B - 1) * (1 / n_b + 1 / n_c)

  on average (B bins, n_b and n_c scored rows; PSI is then close to a chi-square statistic with B - 1 degrees of
  freedom scaled by 1/n_b + 1/n_c). With 20 bins and 100 images a side that is 0.38: above the 0.2 threshold with
  no drift at all. The report gives it next to every PSI, and a warning when the overall noise exceeds half the
  threshold (too few images for a reliable PSI); ``mpft drift`` compares a group only with at least
  ``--min-group-size`` (default 1000, noise 0.038) scored rows on each side.
- The same PSI, KS and shift per group (``jobs.score_report`` groups: first folder below the input root, or host):
  the ``score_report.MAX_GROUPS`` largest groups (by current rows) that reach ``min_group_size`` scored rows on both
  sides, and ``other``, every other grouped row pooled, when it reaches that size too.

Model identity: the rows' ``model_uri`` is what names the model version that scored them (``models:/name/3`` for a
registry model, whatever an alias pointed to then; ``runs:/...``; an absolute checkpoint path; an ``s3://``
checkpoint prefix). Each output must hold exactly one, the same in both, and ``--model`` must name it:
``canonical_model_uri`` turns the reference into that form without downloading anything (an alias is looked up in
the registry, which needs a tracking server). When both outputs carry an output record (``_mpft_output.json``) with
checkpoint hashes, those must agree too, which catches a local checkpoint folder rewritten in place. Anything else
is refused (``InputError``: one line, exit status 2): scores of two model versions differ by the model as much as
by the images.

Labelling manifest: ``label_candidates`` picks, among the current run's scored rows that are new relative to the
baseline (path not in it; or, when both outputs have a ``content_hash`` column, bytes not in it), the N closest to
the decision threshold and the N highest-scoring of the rest, one row per ``content_hash`` (copies of one image
are labelled once). ``write_label_manifest`` writes them as CSV.

Either side without a single scored row (every row an error) is refused (``InputError``): its PSI would be NaN,
which must not read as "no drift".
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import score_report
from mpft_core.config import InputError

log = logging.getLogger(__name__)

DRIFT_EXPERIMENT = "mpft-drift"
PSI_EPSILON = 1e-4
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
LABEL_COLUMNS = ("path", "score", "verdict", "reason", "label")
REASON_UNCERTAIN = "uncertain"
REASON_TOP_SCORE = "top-score"


# -------------------------------------------------------------------------------------------------- statistics


def psi(baseline_counts, current_counts, epsilon: float = PSI_EPSILON) -> float:
    """Population stability index of two histograms on the same bins (the formula is in the module docstring);
    NaN when either side is empty."""
    base = np.asarray(baseline_counts, dtype=np.float64)
    curr = np.asarray(current_counts, dtype=np.float64)
    if base.shape != curr.shape:
        raise ValueError(f"histograms on different bins: {base.shape} vs {curr.shape}")
    if base.sum() == 0 or curr.sum() == 0:
        return float("nan")
    b = np.maximum(base / base.sum(), epsilon)
    c = np.maximum(curr / curr.sum(), epsilon)
    return float(np.sum((c - b) * np.log(c / b)))


def psi_expected_noise(n_baseline: int, n_current: int, n_bins: int = score_report.N_BINS) -> float:
    """The PSI two samples of one distribution show on average: ``(n_bins - 1) * (1/n_baseline + 1/n_current)``
    (module docstring); infinite when a side is empty."""
    if n_baseline <= 0 or n_current <= 0:
        return float("inf")
    return (n_bins - 1) * (1.0 / n_baseline + 1.0 / n_current)


def ks_statistic(baseline, current) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: max over x of |F_baseline(x) - F_current(x)|, the empirical
    distribution functions compared at every observed value; NaN when either side is empty."""
    a = np.sort(np.asarray(baseline, dtype=np.float64))
    b = np.sort(np.asarray(current, dtype=np.float64))
    if a.size == 0 or b.size == 0:
        return float("nan")
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / a.size
    cdf_b = np.searchsorted(b, points, side="right") / b.size
    return float(np.max(np.abs(cdf_a - cdf_b)))


def flagged_share(table: pa.Table) -> float:
    """Share of scored rows whose verdict is ``generated`` (NaN when nothing was scored)."""
    counts = score_report.verdict_counts(table)
    scored = table.num_rows - counts[score_report.ERROR_BAND]
    return counts["generated"] / scored if scored else float("nan")


def error_share(table: pa.Table) -> float:
    return float(score_report.error_mask(table).mean()) if table.num_rows else float("nan")


def compare_tables(baseline: pa.Table, current: pa.Table, epsilon: float = PSI_EPSILON) -> dict:
    """PSI, KS, flagged-share and error-share shift of ``current`` against ``baseline``, with both histograms."""
    base_scores, curr_scores = score_report.scored_values(baseline), score_report.scored_values(current)
    base_hist, curr_hist = score_report.histogram(base_scores), score_report.histogram(curr_scores)
    base_flagged, curr_flagged = flagged_share(baseline), flagged_share(current)
    return {
        "psi": psi(base_hist, curr_hist, epsilon),
        "psi_expected_noise": psi_expected_noise(int(base_scores.size), int(curr_scores.size), len(base_hist)),
        "ks": ks_statistic(base_scores, curr_scores),
        "flagged_share_baseline": base_flagged,
        "flagged_share_current": curr_flagged,
        "flagged_share_shift": curr_flagged - base_flagged,
        "error_share_shift": error_share(current) - error_share(baseline),
        "n_scored_baseline": int(base_scores.size),
        "n_scored_current": int(curr_scores.size),
        "histogram_baseline": base_hist.tolist(),
        "histogram_current": curr_hist.tolist(),
    }


# ------------------------------------------------------------------------------------------------------ groups


def compare_groups(baseline: pa.Table, current: pa.Table, *, baseline_root: Optional[str],
                   current_root: Optional[str], min_group_size: int, max_groups: int = score_report.MAX_GROUPS,
                   epsilon: float = PSI_EPSILON) -> dict[str, dict]:
    """``compare_tables`` per group: the ``max_groups`` largest (current rows) of the groups with at least
    ``min_group_size`` scored rows on each side, largest first, then ``other`` (every other grouped row of each side
    pooled) when it reaches that size on both sides. Groups are found in each run below its own input root, so
    ``example.com`` of today's crawl folder meets ``example.com`` of yesterday's."""
    base_labels = score_report.group_labels(baseline, baseline_root)
    curr_labels = score_report.group_labels(current, current_root)
    base_sizes, curr_sizes = _scored_per_group(baseline, base_labels), _scored_per_group(current, curr_labels)
    eligible = {name for name, size in curr_sizes.items()
                if size >= min_group_size and base_sizes.get(name, 0) >= min_group_size}
    kept = _largest(curr_labels, eligible, max_groups)
    base_pooled, curr_pooled = _pool_others(base_labels, kept), _pool_others(curr_labels, kept)
    names = kept + [score_report.OTHER_GROUP] if kept else []  # with no group kept, `other` is the overall again
    base_groups, curr_groups = _split(baseline, base_pooled, names), _split(current, curr_pooled, names)
    return {name: compare_tables(base_groups[name], curr_groups[name], epsilon) for name in names
            if _n_scored(base_groups[name]) >= min_group_size and _n_scored(curr_groups[name]) >= min_group_size}


def _scored_per_group(table: pa.Table, labels: list[Optional[str]]) -> Counter:
    """Scored rows per group label."""
    failed = score_report.error_mask(table)
    return Counter(label for label, bad in zip(labels, failed, strict=True) if label is not None and not bad)


def _largest(labels: list[Optional[str]], eligible: set[str], max_groups: int) -> list[str]:
    """The ``max_groups`` largest of the ``eligible`` groups in ``labels``, largest first (ties by name): the cap
    of ``score_report.capped_groups``, which the scoring run's summary uses too."""
    capped = score_report.capped_groups((label if label in eligible else None for label in labels), max_groups)
    sizes = Counter(label for label in capped if label is not None and label != score_report.OTHER_GROUP)
    return sorted(sizes, key=lambda name: (-sizes[name], name))


def _pool_others(labels: list[Optional[str]], kept: list[str]) -> list[Optional[str]]:
    """``labels`` with every group outside ``kept`` renamed ``other`` (rows outside any group stay None)."""
    keep = set(kept)
    return [None if label is None else (label if label in keep else score_report.OTHER_GROUP) for label in labels]


def _split(table: pa.Table, labels: list[Optional[str]], names: list[str]) -> dict[str, pa.Table]:
    """The rows of each of ``names`` (by ``labels``), found with one sort of the table rather than one scan per
    group."""
    code_of = {name: code for code, name in enumerate(names)}
    codes = np.fromiter((code_of.get(label, -1) for label in labels), dtype=np.int64, count=len(labels))
    order = np.argsort(codes, kind="stable")
    ordered_codes = codes[order]
    starts = np.searchsorted(ordered_codes, np.arange(len(names) + 1), side="left")
    ordered = table.take(pa.array(order, pa.int64()))
    return {name: ordered.slice(int(starts[code]), int(starts[code + 1] - starts[code]))
            for code, name in enumerate(names)}


def _n_scored(table: pa.Table) -> int:
    return int((~score_report.error_mask(table)).sum())


def check_scored(table: pa.Table, which: str, side: Side) -> None:
    """InputError when ``table`` has no scored row (every row an error): PSI against nothing is NaN, not "no
    drift"."""
    if _n_scored(table) == 0:
        raise InputError(f"{which} output has no scored rows ({side.given}: all {table.num_rows} rows are errors): "
                         "nothing to compare")


# --------------------------------------------------------------------------------------------------- decision


def exceeded(report: dict, threshold: float, group_threshold: Optional[float]) -> list[str]:
    """Why the comparison counts as drift: overall PSI above ``threshold``, or (with ``group_threshold``) a group's
    PSI above it; empty when it does not. A NaN PSI (an empty side) never counts as drift."""
    reasons = []
    if report["overall"]["psi"] > threshold:
        reasons.append(f"overall PSI {report['overall']['psi']:.4f} > {threshold}")
    if group_threshold is not None:
        reasons += [f"group {name} PSI {group['psi']:.4f} > {group_threshold}"
                    for name, group in report["groups"].items() if group["psi"] > group_threshold]
    return reasons


def noise_warnings(report: dict, threshold: float, group_threshold: Optional[float]) -> list[str]:
    """Where a PSI is too noisy to trust: its ``psi_expected_noise`` above half the threshold it is judged by (too
    few images; the noise alone comes near the threshold)."""
    found = []
    noise = report["overall"]["psi_expected_noise"]
    if noise > threshold / 2:
        found.append(f"too few images for a reliable PSI: expected noise {noise:.4f} (same distribution, "
                     f"{report['overall']['n_scored_baseline']} vs {report['overall']['n_scored_current']} scored) "
                     f"exceeds half the threshold {threshold}")
    if group_threshold is not None:
        found += [f"group {name}: expected PSI noise {group['psi_expected_noise']:.4f} exceeds half the group "
                  f"threshold {group_threshold}"
                  for name, group in report["groups"].items() if group["psi_expected_noise"] > group_threshold / 2]
    return found


# ------------------------------------------------------------------------------------------ sides and identity


@dataclass(frozen=True)
class Side:
    """One side of the comparison: the output it reads, and what is known about the run that wrote it."""

    given: str                       # as on the command line
    output_uri: str
    input_root: Optional[str] = None  # the scoring run's input (groups are counted below it), when known
    run_id: Optional[str] = None      # the MLflow scoring run, when one was named


def is_run_id(ref: str) -> bool:
    """Whether ``ref`` names an MLflow run (32 hex digits) rather than an output (a local folder by that name wins)."""
    return RUN_ID.match(ref) is not None and not Path(ref).exists()


def side_from_run(ref: str, params: dict) -> Side:
    """The side a scoring run's params describe; InputError when they are not a scoring run's."""
    if "output" not in params or "model_uri" not in params:
        raise InputError(f"MLflow run {ref} is not an `mpft score` run (its params name no output and model_uri)")
    return Side(given=ref, output_uri=params["output"], input_root=params.get("input"), run_id=ref)


def canonical_model_uri(ref: str, alias_target=None) -> str:
    """``ref`` in the form scoring rows name their model (``ResolvedModel.uri``), without downloading it: an alias
    becomes ``models:/name/<version it points to now>`` (``alias_target``, e.g. ``jobs.tracking.alias_target``), a
    local folder its absolute path; registry versions, run URIs and ``s3://`` prefixes stay as given."""
    if re.match(r"^models:/[^/@]+@[^/]+$", ref):
        target = alias_target(ref) if alias_target is not None else None
        if target is None:
            raise InputError(f"--model {ref}: the alias is not set in the registry")
        return target
    if ref.startswith(("models:/", "runs:/", "mlflow-artifacts:/", "s3://")):
        return ref
    return str(Path(ref.removeprefix("file://")).expanduser().resolve())


def model_uris(table: pa.Table) -> set[str]:
    return {uri for uri in pc.unique(table.column("model_uri")).to_pylist() if uri is not None}


def check_same_model(model_uri: str, baseline: pa.Table, current: pa.Table, baseline_side: Side, current_side: Side,
                     fingerprints: tuple[Optional[dict], Optional[dict]] = (None, None)) -> None:
    """InputError unless every row of both outputs was scored by ``model_uri`` (and, when both records hold
    checkpoint hashes, by the same checkpoint bytes)."""
    for side, table in ((baseline_side, baseline), (current_side, current)):
        found = model_uris(table)
        if found != {model_uri}:
            named = ", ".join(sorted(found)) or "no model"
            raise InputError(f"{side.given} holds scores of {named}, not of --model {model_uri}: drift compares two "
                             "runs of the same model version")
    base_print, curr_print = fingerprints
    if base_print and curr_print and base_print != curr_print:
        raise InputError(f"{baseline_side.given} and {current_side.given} name the same model {model_uri} but their "
                         "output records hold different checkpoint hashes: the checkpoint changed in between")


def load_scores(side: Side, storage_cfg) -> pa.Table:
    """Every row of ``side``'s output (one per path); InputError when it holds none."""
    from pipelines.scoring import read_scores

    table = read_scores(side.output_uri, storage_cfg)
    if table.num_rows == 0:
        raise InputError(f"no scores under {side.output_uri} ({side.given})")
    return table


# ------------------------------------------------------------------------------------------------- the report


def drift_report(baseline: pa.Table, current: pa.Table, baseline_side: Side, current_side: Side, *,
                 min_group_size: int, epsilon: float = PSI_EPSILON) -> dict:
    """The whole comparison: ``overall`` and ``groups`` (``compare_tables`` results), the bin edges, the outputs.
    InputError when a side has no scored row (``check_scored``)."""
    check_scored(baseline, "baseline", baseline_side)
    check_scored(current, "current", current_side)
    return {
        "baseline": baseline_side.output_uri,
        "current": current_side.output_uri,
        "bin_edges": score_report.BIN_EDGES.tolist(),
        "overall": compare_tables(baseline, current, epsilon),
        "groups": compare_groups(baseline, current, baseline_root=baseline_side.input_root,
                                 current_root=current_side.input_root, min_group_size=min_group_size,
                                 epsilon=epsilon),
    }


def report_metrics(report: dict) -> dict[str, float]:
    """The report's numbers as flat MLflow metrics (``psi``, ``ks``, ..., ``group/<name>/psi``); histograms are
    left to the artefacts."""
    def numbers(part: dict) -> dict[str, float]:
        return {k: v for k, v in part.items() if not k.startswith("histogram_") and not _is_nan(v)}

    metrics = numbers(report["overall"])
    for name, group in report["groups"].items():
        metrics.update({f"group/{name}/{k}": v for k, v in numbers(group).items()})
    return metrics


def _is_nan(value) -> bool:
    return isinstance(value, float) and np.isnan(value)


def printable(report: dict, decision: list[str], threshold: float, group_threshold: Optional[float]) -> str:
    """The JSON a person or a scheduler reads: the numbers without the histograms, the decision, and the
    ``noise_warnings``."""
    def strip(part: dict) -> dict:
        return {k: (None if _is_nan(v) else v) for k, v in part.items() if not k.startswith("histogram_")}

    return json.dumps({
        "baseline": report["baseline"], "current": report["current"],
        "drift": bool(decision), "reasons": decision, "threshold": threshold, "group_threshold": group_threshold,
        "warnings": noise_warnings(report, threshold, group_threshold),
        "overall": strip(report["overall"]),
        "groups": {name: strip(group) for name, group in report["groups"].items()},
    }, indent=2)


# ---------------------------------------------------------------------------------------- labelling manifest


def new_rows(baseline: pa.Table, current: pa.Table) -> pa.Table:
    """The current rows that are new relative to the baseline: by content hash when both outputs have a filled
    ``content_hash`` column (the same bytes under a new name are not new), else by path."""
    key = "content_hash" if _has_values(baseline, "content_hash") and _has_values(current, "content_hash") else "path"
    seen = pc.is_in(current.column(key), value_set=baseline.column(key).drop_null().unique())
    return current.filter(pc.invert(pc.fill_null(seen, False)))


def _has_values(table: pa.Table, column: str) -> bool:
    return column in table.column_names and table.column(column).null_count < table.num_rows


def label_candidates(baseline: pa.Table, current: pa.Table, n: int) -> pa.Table:
    """Columns ``LABEL_COLUMNS``: among the current run's scored rows new relative to the baseline, the ``n``
    closest to their decision threshold (reason ``uncertain``) and the ``n`` highest-scoring of the others (reason
    ``top-score``), one per image content (``one_row_per_content``); ``label`` empty, for a person to fill with 0
    (real) or 1 (generated)."""
    fresh = new_rows(baseline, current)
    fresh = one_row_per_content(fresh.filter(pc.invert(pa.array(score_report.error_mask(fresh), pa.bool_()))))
    scores = fresh.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    thresholds = fresh.column("threshold").to_numpy(zero_copy_only=False).astype(np.float64)
    uncertain = np.argsort(np.abs(scores - thresholds), kind="stable")[:n]
    rest = np.setdiff1d(np.arange(len(scores)), uncertain)
    top = rest[np.argsort(-scores[rest], kind="stable")[:n]]
    picked = np.concatenate([uncertain, top]).astype(np.int64)
    reasons = [REASON_UNCERTAIN] * len(uncertain) + [REASON_TOP_SCORE] * len(top)
    chosen = fresh.take(pa.array(picked, pa.int64()))
    return pa.table({"path": chosen.column("path"), "score": chosen.column("score"),
                     "verdict": chosen.column("verdict"), "reason": pa.array(reasons, pa.string()),
                     "label": pa.nulls(len(picked), pa.int8())})


def one_row_per_content(table: pa.Table) -> pa.Table:
    """``table`` ordered by path, with only the first path of each non-null ``content_hash``: copies of one image
    (the score store's duplicates) are one image to label. Rows without a hash are all kept."""
    from pipelines.score_store import first_per_hash

    ordered = table.take(pc.sort_indices(table, sort_keys=[("path", "ascending")]))
    if not _has_values(ordered, "content_hash"):
        return ordered
    hashed = ordered.column("content_hash").is_valid()
    kept = pa.concat_tables([first_per_hash(ordered.filter(hashed)), ordered.filter(pc.invert(hashed))])
    return kept.take(pc.sort_indices(kept, sort_keys=[("path", "ascending")]))


def label_manifest_csv(candidates: pa.Table) -> bytes:
    """``candidates`` as CSV, the format ``--layout manifest`` reads: an empty ``label`` cell is an unlabelled row."""
    import pyarrow.csv as pacsv

    sink = io.BytesIO()
    pacsv.write_csv(candidates.select(list(LABEL_COLUMNS)), sink)
    # Arrow quotes every string and writes nulls as empty cells; both read back as `--layout manifest` expects.
    return sink.getvalue()


def write_label_manifest(candidates: pa.Table, uri: str, storage_cfg=None) -> None:
    """Write the labelling manifest (CSV) to a local path or ``s3://`` key, whole or not at all."""
    from pipelines import storage

    if not uri.lower().endswith(".csv"):
        raise InputError(f"--label-manifest {uri}: name a .csv file (what `--layout manifest` reads)")
    if not storage.is_remote(uri):
        Path(uri).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    storage.write_atomic(uri, label_manifest_csv(candidates), storage_cfg)
