"""What a scoring output holds, in numbers a person (and ``mpft drift``) can compare between runs.

Pure functions over the output table (``pipelines.scoring.OUTPUT_SCHEMA`` columns, as ``read_scores`` returns it):
no MLflow, no storage, no Ray. ``jobs.score.log_summary`` logs ``summarise``'s result; ``jobs.drift`` reuses the
histogram, the verdict bands and the grouping so both speak about the same bins and the same groups.

- Histogram: ``N_BINS`` equal bins fixed on [0, 1] (the last one closed), so any two runs' counts line up.
- Verdict bands: ``generated`` / ``uncertain`` / ``real`` as the rows' ``verdict`` says, and ``error`` for rows that
  could not be scored; shares are of all rows.
- Error kinds: ``error_kind`` maps the texts ``pipelines.decode.describe_error`` and ``mpft_core.imageio`` write to
  a handful of kinds (a per-message count would be one row per odd file).
- Groups: the first path component below the input root (``s3://crawl/day/example.com/x.jpg`` under
  ``s3://crawl/day`` -> ``example.com``), or the host of an ``http(s)://`` path; files directly under the root
  are group ``(root)``. Without a usable root (a manifest, or ``mpft drift`` on a bare output) the root is the
  deepest folder all paths share. An input has a grouping only if it yields at least two groups; at most
  ``MAX_GROUPS`` are kept (largest first), the rest pooled as ``other``.
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Optional
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

N_BINS = 20
BIN_EDGES = np.linspace(0.0, 1.0, N_BINS + 1)
VERDICT_BANDS = ("generated", "uncertain", "real", "error")
ERROR_BAND = "error"
MAX_GROUPS = 20
OTHER_GROUP = "other"
ROOT_GROUP = "(root)"

# (kind, the beginnings of the error texts of that kind), checked in order; anything else is "other".
ERROR_KINDS = (
    ("unreadable", ("cannot read file",)),
    ("too_large", ("file too large", "exceeds pixel limit")),
    ("empty", ("empty file", "image has no pixels")),
    ("not_an_image", ("not a recognised image format", "unsupported format", "no image bytes",
                      "image must be encoded bytes", "image is text")),
    ("corrupt", ("unreadable image header", "truncated or corrupt", "cannot decode")),
    ("timeout", ("decode time limit",)),
)
OTHER_ERROR = "other"


# ------------------------------------------------------------------------------------------------ histograms


def histogram(scores: np.ndarray) -> np.ndarray:
    """Counts of ``scores`` in the ``N_BINS`` fixed bins on [0, 1]; values outside are clipped into the end bins
    (a score is a probability, so that only catches rounding), NaN is dropped."""
    values = np.asarray(scores, dtype=np.float64)
    values = np.clip(values[~np.isnan(values)], 0.0, 1.0)
    counts, _ = np.histogram(values, bins=BIN_EDGES)
    return counts.astype(np.int64)


def scored_values(table: pa.Table) -> np.ndarray:
    """The scores of the rows that were scored (no error), as float64."""
    scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    return scores[~np.isnan(scores) & ~error_mask(table)]


def error_mask(table: pa.Table) -> np.ndarray:
    """True where a row could not be scored: its ``error`` is set, or it has no score."""
    failed = table.column("error").is_valid()
    no_score = table.column("score").is_null()
    return pc.or_(failed, no_score).to_numpy(zero_copy_only=False)


# ------------------------------------------------------------------------------------------------ verdict bands


def verdict_counts(table: pa.Table) -> dict[str, int]:
    """Rows per band of ``VERDICT_BANDS`` (every band present, zero if empty); an error row counts as ``error``
    whatever its verdict column holds, and a scored row with a verdict outside the bands is left out. Counted in
    Arrow (one count per distinct verdict), not row by row in Python."""
    failed = error_mask(table)
    counts = _value_counts(table.column("verdict").filter(pa.array(~failed, pa.bool_())))
    result = {band: int(counts.get(band, 0)) for band in VERDICT_BANDS if band != ERROR_BAND}
    result[ERROR_BAND] = int(failed.sum())
    return result


def _value_counts(values) -> dict:
    """``{value: rows}`` of an Arrow array or chunked array, nulls left out."""
    counted = pc.value_counts(values.drop_null())
    return dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True))


def shares(counts: dict[str, int], total: int) -> dict[str, float]:
    """``counts`` as fractions of ``total`` (0.0 for an empty table rather than NaN: nothing to share)."""
    return {name: (count / total if total else 0.0) for name, count in counts.items()}


# ------------------------------------------------------------------------------------------------ error kinds


def error_kind(message: str) -> str:
    """The kind of one error text (``ERROR_KINDS``), ``other`` for a text no kind starts like."""
    text = message.strip().lower()
    for kind, beginnings in ERROR_KINDS:
        if text.startswith(beginnings):
            return kind
    return OTHER_ERROR


def error_counts(table: pa.Table) -> dict[str, int]:
    """Error rows per kind, only kinds that occur, largest first; each distinct text is classified once."""
    kinds: Counter = Counter()
    for message, count in _value_counts(table.column("error")).items():
        kinds[error_kind(message)] += count
    return dict(kinds.most_common())


# ----------------------------------------------------------------------------------------------------- groups


def normalised_root(input_root: Optional[str]) -> Optional[str]:
    """``input_root`` as the output's paths begin: a full URI for ``s3://``/``http(s)://``, an absolute local path
    otherwise (the scoring job lists local files by their absolute path); no trailing slash."""
    if not input_root:
        return None
    if "://" in input_root and not input_root.startswith("file://"):
        return input_root.rstrip("/")
    return os.path.abspath(os.path.expanduser(input_root.removeprefix("file://"))).rstrip("/") or "/"


def shared_folder(paths: Sequence[str]) -> Optional[str]:
    """The deepest folder every path lies in (``s3://b/day`` for ``s3://b/day/x/1.jpg`` and ``s3://b/day/y/2.jpg``),
    None when they share none (no paths, different buckets or schemes)."""
    folders = [posixpath.dirname(p) for p in paths if p]
    if not folders:
        return None
    common = posixpath.commonpath(folders) if all(f.startswith("/") for f in folders) else _common_uri(folders)
    return common or None


def _common_uri(folders: Sequence[str]) -> str:
    """The common folder of URIs (``commonpath`` would fold ``s3://`` into ``s3:/``)."""
    split = [f.rstrip("/").split("/") for f in folders]
    shared = []
    for parts in zip(*split, strict=False):
        if any(part != parts[0] for part in parts):
            break
        shared.append(parts[0])
    common = "/".join(shared)
    return common if "://" in common and not common.endswith(":/") and not common.endswith(":") else ""


def group_root(input_root: Optional[str], paths: Sequence[str]) -> Optional[str]:
    """The folder groups are counted below: ``input_root`` when the paths lie below it, else their shared folder
    (a manifest input, whose rows may sit anywhere, or no input root known)."""
    root = normalised_root(input_root)
    if root is not None and any(p.startswith(root + "/") for p in paths[:1000]):
        return root
    return shared_folder(paths)


def group_of(path: str, root: Optional[str]) -> Optional[str]:
    """The group of ``path``: the host of an ``http(s)://`` URL, else its first component below ``root``
    (``ROOT_GROUP`` for a file directly under it); None for a path outside ``root``."""
    if path.startswith(("http://", "https://")):
        return urlparse(path).hostname or None
    if root is None or not path.startswith(root.rstrip("/") + "/"):
        return None
    below = path[len(root.rstrip("/")) + 1:]
    head, sep, _ = below.partition("/")
    return head if sep else ROOT_GROUP


def group_labels(table: pa.Table, input_root: Optional[str]) -> list[Optional[str]]:
    """Each row's group (``group_of``) under ``group_root``; all None when the input has no grouping (fewer than
    two groups)."""
    paths = table.column("path").to_pylist()
    root = group_root(input_root, paths)
    labels = [group_of(p, root) for p in paths]
    if len({label for label in labels if label is not None}) < 2:
        return [None] * len(labels)
    return labels


def capped_groups(labels: Iterable[Optional[str]], max_groups: int = MAX_GROUPS) -> list[Optional[str]]:
    """``labels`` with all but the ``max_groups`` largest groups (ties: by name) renamed ``OTHER_GROUP``."""
    labels = list(labels)
    counts = Counter(label for label in labels if label is not None)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kept = {name for name, _ in ranked[:max_groups]}
    return [None if label is None else (label if label in kept else OTHER_GROUP) for label in labels]


# ---------------------------------------------------------------------------------------------------- summary


def band_summary(table: pa.Table) -> dict:
    """Histogram, verdict bands and error kinds of ``table``'s rows (the part of ``summarise`` a group repeats)."""
    counts = verdict_counts(table)
    return {
        "n_rows": table.num_rows,
        "n_scored": table.num_rows - counts[ERROR_BAND],
        "histogram": histogram(scored_values(table)).tolist(),
        "verdicts": counts,
        "verdict_shares": shares(counts, table.num_rows),
        "errors": error_counts(table),
    }


def summarise(table: pa.Table, input_root: Optional[str] = None, max_groups: int = MAX_GROUPS) -> dict:
    """The summary of a whole scoring output: every row of ``table`` counts, including rows written by earlier
    (resumed) runs into the same output, so the numbers describe the output, not only the last run's share of it.

    Returns ``band_summary`` of all rows, plus ``bin_edges`` (shared by every histogram), ``threshold`` /
    ``real_threshold`` (the rows' decision thresholds; None for an empty output) and ``groups``: ``{group:
    band_summary}`` for at most ``max_groups`` groups plus ``other`` (empty when the input has no grouping).
    """
    summary = {"bin_edges": BIN_EDGES.tolist(), **band_summary(table),
               "threshold": _first_value(table, "threshold"), "real_threshold": _first_value(table, "real_threshold"),
               "groups": {}}
    labels = capped_groups(group_labels(table, input_root), max_groups)
    if any(label is not None for label in labels):
        column = pa.array(labels, pa.string())
        for name in _by_size(labels):
            summary["groups"][name] = band_summary(table.filter(pc.equal(column, name)))
    return summary


def _by_size(labels: Sequence[Optional[str]]) -> list[str]:
    """Group names, largest first, ``other`` last."""
    counts = Counter(label for label in labels if label is not None)
    named = sorted((n for n in counts if n != OTHER_GROUP), key=lambda n: (-counts[n], n))
    return named + ([OTHER_GROUP] if OTHER_GROUP in counts else [])


def _first_value(table: pa.Table, column: str) -> Optional[float]:
    """The first non-null value of ``column`` (the thresholds are the same on every row of one model's output)."""
    values = table.column(column).drop_null()
    return None if len(values) == 0 else float(values[0].as_py())


def summary_metrics(summary: dict) -> dict[str, float]:
    """``summarise``'s numbers as flat MLflow metrics: ``share_<band>``, ``count_<band>``, ``errors_<kind>``, and
    the same under ``group/<name>/`` per group."""
    metrics = _band_metrics(summary)
    for name, group in summary["groups"].items():
        metrics.update({f"group/{name}/{key}": value for key, value in _band_metrics(group).items()})
    return metrics


def _band_metrics(part: dict) -> dict[str, float]:
    metrics: dict[str, float] = {"n_rows": part["n_rows"]}
    metrics.update({f"share_{band}": share for band, share in part["verdict_shares"].items()})
    metrics.update({f"count_{band}": count for band, count in part["verdicts"].items()})
    metrics.update({f"errors_{kind}": count for kind, count in part["errors"].items()})
    return metrics


def histogram_rows(summary: dict) -> list[dict]:
    """The histograms as long-format rows (group, bin_low, bin_high, count); group ``all`` is every row."""
    edges = summary["bin_edges"]
    parts = {"all": summary, **summary["groups"]}
    return [{"group": name, "bin_low": edges[i], "bin_high": edges[i + 1], "count": count}
            for name, part in parts.items() for i, count in enumerate(part["histogram"])]
