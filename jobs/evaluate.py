"""`mpft evaluate`: driver side — resolve the model, run pipelines.evaluation, write the table, log to MLflow."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from mpft_core.metrics import to_markdown
from mpft_core.perturb import Alignment, Condition
from pipelines import storage
from pipelines.evaluation import CLEAN, EvalOptions, EvalResult, evaluate, finite_metrics
from pipelines.storage import StorageConfig

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

EVALUATION_EXPERIMENT = "mpft-evaluation"
TABLE_NAME = "eval_metrics"
SIDE_BY_SIDE_NAME = "eval_conditions"  # acc / AP / AUC per subset, one column per condition
SCORES_FILE = "eval_scores.parquet"


def run_evaluate(model_ref: str, sources: Sequence, *, storage_cfg: Optional[StorageConfig] = None,
                 perturbations: Sequence[Condition] = (), options: Optional[EvalOptions] = None,
                 output_uri: Optional[str] = None, tracking_uri: Optional[str] = None,
                 ray_address: Optional[str] = None, run_name: Optional[str] = None,
                 verbose: bool = False) -> tuple[EvalResult, Optional[str]]:
    """Evaluate clean and under each of ``perturbations`` (degradations and alignments, ``mpft_core.perturb``; the
    sources' manifests are read, and refused, before Ray starts); write table + scores under
    ``output_uri`` if given; log to MLflow if a tracking URI is given;
    ``verbose``: Ray's own progress on the console too.

    Returns the result and the MLflow run id (None when not logged).
    """
    from jobs.tracking import resolve_model
    from pipelines.evaluation import build_eval_manifest
    from pipelines.runtime import init_ray

    manifest = build_eval_manifest(sources, storage_cfg)  # bad labels, rows outside the corpus: refused before Ray
    model = resolve_model(model_ref, storage_cfg)
    init_ray(ray_address, verbose=verbose)
    result = evaluate(model, sources, storage_cfg, perturbations, options, manifest=manifest)
    print(to_markdown(result.table))
    if len(result.conditions) > 1:
        print(to_markdown(result.side_by_side()))
    if output_uri:
        write_outputs(result, output_uri, storage_cfg)
    run_id = None
    if tracking_uri:
        run_id = log_evaluation(result, model_ref, sources, perturbations, run_name)
    return result, run_id


def all_scores(result: EvalResult) -> pa.Table:
    """Every condition's score rows in one table with a ``condition`` column (embeddings left out)."""
    tables = []
    for cond in result.conditions:
        scores = cond.scores.drop_columns([c for c in ("embedding",) if c in cond.scores.column_names])
        tables.append(scores.add_column(0, "condition", pa.array([cond.name] * scores.num_rows, pa.string())))
    return pa.concat_tables(tables)


def write_outputs(result: EvalResult, output_uri: str, storage_cfg: Optional[StorageConfig] = None) -> None:
    """``eval_metrics.{parquet,md}`` (long), ``eval_conditions.{parquet,md}`` (conditions side by side) and
    ``eval_scores.parquet`` under ``output_uri``."""
    for name, table in ((TABLE_NAME, result.table), (SIDE_BY_SIDE_NAME, result.side_by_side())):
        storage.write_bytes(storage.join(output_uri, f"{name}.parquet"), _parquet_bytes(pa.Table.from_pandas(
            table, preserve_index=False)), storage_cfg)
        storage.write_bytes(storage.join(output_uri, f"{name}.md"), to_markdown(table).encode(), storage_cfg)
    storage.write_bytes(storage.join(output_uri, SCORES_FILE), _parquet_bytes(all_scores(result)), storage_cfg)
    log.info("evaluation table and scores written to %s", output_uri)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def log_evaluation(result: EvalResult, model_ref: str, sources: Sequence, perturbations: Sequence[Condition],
                   run_name: Optional[str] = None) -> str:
    """An MLflow run in ``mpft-evaluation``: params, flat metrics, the long and the side-by-side tables, the scores,
    and the ROC, accuracy, reliability and feature-space plots."""
    from jobs import tracking

    model = result.model
    name = run_name or f"evaluate-{model.name or 'checkpoint'}-{model.version or 'local'}"
    with tracking.start_run(EVALUATION_EXPERIMENT, name) as run:
        tracking.log_params({
            "model_ref": model_ref, "model_uri": model.uri, "model_name": model.name or "",
            "model_version": model.version or "", "threshold": result.threshold,
            "sources": "; ".join(f"{s.uri} ({s.layout}, split={s.split})" for s in sources),
            "perturbations": ",".join(p.name for p in perturbations if not isinstance(p, Alignment)) or "none",
            "alignments": ",".join(p.name for p in perturbations if isinstance(p, Alignment)) or "none",
            "real_pairs": ", ".join(f"{fake}+{real}" for fake, real in sorted(result.real_pairs.items())) or "none",
        })
        tracking.log_metrics(finite_metrics(result))
        tracking.log_table(result.table, TABLE_NAME)
        tracking.log_table(result.side_by_side(), SIDE_BY_SIDE_NAME)
        if result.format_mix is not None:
            tracking.log_table(result.format_mix.table(), "format_mix")
            if not math.isnan(result.format_mix.distance):
                tracking.log_metrics({"format_mix_distance": result.format_mix.distance})
        tracking.log_table(all_scores(result).to_pandas(), "eval_scores")
        for artifact_file, fig in _evaluation_figures(result):
            tracking.log_figure(fig, artifact_file)  # closes the figure
        return run.info.run_id


def _evaluation_figures(result: EvalResult) -> Iterator[tuple[str, Figure]]:
    """(artefact name, figure) of the ROC, per-condition accuracy and reliability, and feature-space plots, each
    drawn only when the previous one has been handed over, so that no figure is left open if logging one fails.

    A condition's reliability diagram pools all its scored images (each once, paired real subsets included)."""
    from jobs import plots
    from mpft_core.metrics import reliability_bins

    clean = result.condition(CLEAN).scores
    scored = clean.filter(clean.column("error").is_null())
    yield "roc_clean.png", plots.roc_curves(scored.column("label").to_numpy(zero_copy_only=False),
                                            scored.column("score").to_numpy(zero_copy_only=False),
                                            scored.column("subset").to_pylist())
    for cond in result.conditions:
        yield f"accuracy_{cond.name}.png", plots.subset_accuracy_bars(cond.results)
    for cond in result.conditions:
        scored = cond.scores.filter(cond.scores.column("error").is_null())
        bins = reliability_bins(scored.column("label").to_numpy(zero_copy_only=False),
                                scored.column("score").to_numpy(zero_copy_only=False))
        yield f"reliability_{cond.name}.png", plots.reliability_diagram(bins, f"Reliability, {cond.name}")
    for i, space in enumerate(result.feature_spaces):
        kind = "frozen" if i == 0 else "finetuned"
        yield f"feature_space_{kind}.png", plots.feature_space(space.embeddings, space.subsets, space.labels,
                                                               space.title)
