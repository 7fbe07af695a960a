"""`mpft score`: driver side of batch scoring, and the quick in-process path for a person checking a few files.

The Ray job itself is pipelines/scoring.py; this module picks the model an output continues with (through
``jobs.tracking.resolve_model``), starts Ray, and logs the run summary to MLflow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Optional

import numpy as np
import pyarrow as pa

from pipelines.scoring import (
    DetectorScorer,
    ScoreJob,
    ScoreSummary,
    actor_pool_size,
    bundle_image_size,
    decode_settings,
    list_part_files,
    make_model_bundle,
    read_output_record,
    run_scoring,
)
from pipelines.scoring_spec import ResolvedModel
from pipelines.storage import StorageConfig

log = logging.getLogger(__name__)

SCORING_EXPERIMENT = "mpft-scoring"


def resolve_model_for_output(ref: str, output_uri: str,
                             storage_cfg: Optional[StorageConfig] = None) -> ResolvedModel:
    """The model to score ``output_uri`` with: ``ref`` resolved, except that a rerun with the alias reference
    (``models:/name@alias``) the output was started with continues with the version recorded then, wherever the
    alias points now, once the output holds parts (before, another model may take the output over anyway).

    Anything else is resolved as given (a relative checkpoint path from where this runs, not where the first run
    did); ``run_scoring`` accepts it only if it gives the recorded checkpoint files.
    """
    from jobs import tracking

    record = read_output_record(output_uri, storage_cfg)
    if (record is None or record.model_ref != ref or not tracking.is_alias_reference(ref)
            or not list_part_files(output_uri, storage_cfg)):
        return tracking.resolve_model(ref, storage_cfg)
    _warn_if_alias_moved(ref, record.model_uri, output_uri)
    return tracking.resolve_model(record.model_uri, storage_cfg)


def _warn_if_alias_moved(ref: str, recorded_uri: str, output_uri: str) -> None:
    from jobs import tracking

    now = tracking.alias_target(ref)
    if now is not None and now != recorded_uri:
        log.warning("%s now names %s, but %s was started with %s: continuing with %s (use a fresh --output to "
                    "score with %s)", ref, now, output_uri, recorded_uri, _version_label(recorded_uri), now)


def _version_label(uri: str) -> str:
    """``version 3`` for ``models:/name/3``, else the URI itself."""
    head, _, version = uri.rpartition("/")
    return f"version {version}" if head.startswith("models:/") and version.isdigit() else uri


# ------------------------------------------------------------------------------------------- a few files, no Ray


def score_in_process(model: ResolvedModel, paths: Sequence[str], *, max_pixels: int,
                     storage_cfg: Optional[StorageConfig] = None, batch_size: int = 16) -> pa.Table:
    """Score ``paths`` in this process with the same decode and scorer code as the Ray job (no Ray started)."""
    import os

    bundle = make_model_bundle(model)
    scorer = DetectorScorer(bundle, torch_threads=os.cpu_count() or 1,  # this process is the only consumer
                            decode=decode_settings(bundle_image_size(bundle), max_pixels, storage_cfg))
    tables = []
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        manifest_batch = {"path": np.array(chunk, dtype=object),
                          "label": np.array([None] * len(chunk), dtype=object),
                          "subset": np.array([None] * len(chunk), dtype=object),
                          "split": np.array([None] * len(chunk), dtype=object)}
        tables.append(scorer(manifest_batch))
    return pa.concat_tables(tables)


def format_table(table: pa.Table, base: Optional[str] = None) -> str:
    """A fixed-width table (path, score, verdict, error) for a terminal; paths shown relative to ``base``."""
    rows = []
    for row in table.select(["path", "score", "verdict", "error"]).to_pylist():
        path = row["path"]
        if base and path.startswith(base.rstrip("/") + "/"):
            path = path[len(base.rstrip("/")) + 1:]
        score = "" if row["score"] is None or math.isnan(row["score"]) else f"{row['score']:.4f}"
        rows.append((path, score, row["verdict"] or "error", row["error"] or ""))
    header = ("path", "score", "verdict", "error")
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    for r in rows:
        lines.append("  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].ljust(widths[2]), r[3]]).rstrip())
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- the Ray job


def run_score_job(job: ScoreJob, model: ResolvedModel, *, tracking_uri: Optional[str],
                  ray_address: Optional[str] = None, verbose: bool = False) -> ScoreSummary:
    """Run the streaming scoring job and log its summary as an MLflow run (when a tracking URI is given);
    ``verbose``: Ray's own progress on the console too."""
    from pipelines.runtime import init_ray

    init_ray(ray_address, verbose=verbose)
    summary = run_scoring(job, model)
    log.info("scored %d files (%d errors, %d skipped as already scored) in %.1f s: %.1f images/s -> %s",
             summary.n_written, summary.n_errors, summary.n_skipped_already_scored, summary.seconds,
             summary.images_per_s, summary.output_uri)
    if tracking_uri:
        log_summary(job, summary)
    return summary


def log_summary(job: ScoreJob, summary: ScoreSummary) -> str:
    """One MLflow run per scoring job in experiment ``mpft-scoring``; returns its run id.

    Besides the job's params and counts, the run holds the summary of the whole output (``log_output_report``):
    score histogram, share per verdict band, errors by kind, and the same per group of the input."""
    from jobs import tracking

    scored_now = summary.n_inputs - summary.n_skipped_already_scored
    num_actors = actor_pool_size(job.resources, scored_now) if scored_now else 0  # as scored_dataset sized it
    with tracking.start_run(SCORING_EXPERIMENT, f"score-{job.run_id}") as run:
        tracking.log_params({
            # The rows' identity: on a resumed output, the model version the output was started with.
            "model_ref": job.model_ref, "model_uri": summary.model.uri, "model_name": summary.model.name or "",
            "model_version": summary.model.version or "", "input": job.input_uri, "output": job.output_uri,
            "layout": job.layout, "batch_size": job.resources.batch_size, "num_actors": num_actors,
            "actor_cpus": job.resources.actor_cpus, "torch_threads": job.resources.torch_threads,
            "use_gpu": job.resources.use_gpu,
            "scoring_run_id": job.run_id, "score_store": job.score_store or "",
        })
        tracking.log_metrics({
            "n_inputs": summary.n_inputs, "n_scored": summary.n_scored, "n_errors": summary.n_errors,
            "n_skipped_already_scored": summary.n_skipped_already_scored,
            "n_torn_parts_removed": summary.n_torn_parts_removed,
            "seconds": summary.seconds, "images_per_s": summary.images_per_s,
            "n_reused": summary.n_reused, "n_duplicates": summary.n_duplicates,
        })
        log_output_report(job)
        return run.info.run_id


def log_output_report(job: ScoreJob) -> None:
    """Into the active run: ``jobs.score_report.summarise`` of the whole output (every row, earlier resumed runs'
    too) as metrics, ``summary/score_histogram.png``, ``summary/score_summary.json`` (bin counts per group, for a
    person and dashboards) and ``summary/score_histogram.csv`` (the same counts as a table). ``mpft drift`` does not
    read this summary: it recomputes its numbers from the two outputs (the same bins and groups, ``jobs.score_report``),
    so that it can compare any two outputs, logged or not, by its own group cap and sizes."""
    import csv
    import json
    import tempfile
    from pathlib import Path

    from jobs import plots, score_report, tracking
    from pipelines.scoring import read_scores

    report = score_report.summarise(read_scores(job.output_uri, job.storage), job.input_uri)
    tracking.log_metrics(score_report.summary_metrics(report))
    tracking.log_figure(plots.score_histogram(report["bin_edges"], report["histogram"], f"scores in {job.output_uri}",
                                              _threshold_lines(report)),
                        "summary/score_histogram.png")
    with tempfile.TemporaryDirectory(prefix="mpft-summary-") as tmp:
        (Path(tmp) / "score_summary.json").write_text(json.dumps(report, indent=2))
        rows = score_report.histogram_rows(report)
        with (Path(tmp) / "score_histogram.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        for name in ("score_summary.json", "score_histogram.csv"):
            tracking.log_artifact_file(str(Path(tmp) / name), "summary")


def _threshold_lines(report: dict) -> list[tuple[float, str]]:
    """The decision thresholds to draw: "generated" from ``threshold``, "real" below ``real_threshold`` when the
    model has an uncertain band between them."""
    lines = [(report["threshold"], "generated from")]
    if report["real_threshold"] is not None and report["real_threshold"] != report["threshold"]:
        lines.append((report["real_threshold"], "real below"))
    return lines
