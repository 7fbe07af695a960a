"""`mpft drift --model REF --baseline RUN_OR_OUTPUT --current RUN_OR_OUTPUT [--threshold 0.2]`.

Compares the score distributions of two scoring runs of the same model version (``jobs/drift.py``: PSI and KS
overall and per group, shift in flagged share), prints the comparison as JSON and logs it to MLflow (experiment
``mpft-drift``) when a tracking URI is set.

Exit status (``EXIT_STATUSES``), so that a scheduler retrains on drift and on nothing else:

- 0: stable, the comparison was made and no PSI exceeds its threshold;
- 1: drift, the overall PSI exceeds --threshold, or a group's exceeds --group-threshold; the printed JSON says
  ``"drift": true``. Only the decision returns 1;
- 2: refused, bad usage or two runs that cannot be compared (different model versions, an output with no scores
  or no scored rows, an unknown run, a missing tracking URI): one line on stderr;
- 3: could not compute, anything failing on the way (the object store, a torn Parquet part, MLflow down, a bug):
  one line on stderr (the traceback with -v). ``main`` catches every such exception itself, because Python and
  ``jobs.cli`` exit 1 for some of them, which would read as drift.

PSI of small samples is noisy (``jobs.drift``: expected noise ``(bins - 1) * (1/n_b + 1/n_c)``); the JSON gives it
next to each PSI and a ``warnings`` entry when the overall noise exceeds half --threshold.

RUN_OR_OUTPUT: an MLflow run id of `mpft score` (32 hex digits; its params name the output and the input, whose
folders become the groups) or the output itself (a local folder or s3:// prefix; groups are then counted below the
deepest folder all paths share).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import TYPE_CHECKING, Optional

from jobs.common import UsageError, add_stack_arguments, connect_tracking, storage_from_args

if TYPE_CHECKING:
    import pyarrow as pa

    from jobs.drift import Side

log = logging.getLogger(__name__)

STABLE_STATUS = 0
DRIFT_STATUS = 1
REFUSED_STATUS = 2
FAILED_STATUS = 3
EXIT_STATUSES = f"""exit status:
  {STABLE_STATUS}  stable: no PSI above its threshold
  {DRIFT_STATUS}  drift: a PSI above its threshold (the JSON says "drift": true); nothing else exits {DRIFT_STATUS}
  {REFUSED_STATUS}  refused: bad usage, runs of different models, an output with no (scored) rows, an unknown run
  {FAILED_STATUS}  could not compute: the store, a Parquet part, MLflow or any other failure (one line on stderr)
Once the decision is made, failing to write the labelling manifest, the MLflow run or the plot is a warning on
stderr: the status is still the decision's."""
# PSI above 0.2 is the usual rule of thumb for a significant population shift (jobs/drift.py).
DEFAULT_THRESHOLD = 0.2
# PSI of two samples of one distribution is about (bins - 1) * (1/n_b + 1/n_c) (jobs/drift.py): 0.038 for 1000 a
# side with 20 bins, small against the thresholds; 100 a side would give 0.38, a false alarm by itself.
DEFAULT_MIN_GROUP_SIZE = 1000
DEFAULT_LABEL_SAMPLE = 50


class Unavailable(Exception):
    """A service the comparison needs did not answer: nothing the flags can fix, so status 3, not 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXIT_STATUSES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", required=True,
                        help="the model both runs were scored with: models:/name@alias (the version it names now), "
                             "models:/name/version, runs:/<id>/model, or a checkpoint directory")
    parser.add_argument("--baseline", required=True, metavar="RUN_OR_OUTPUT",
                        help="MLflow run id of an `mpft score` run, or its output folder / s3:// prefix")
    parser.add_argument("--current", required=True, metavar="RUN_OR_OUTPUT", help="the run to check, as --baseline")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="exit 1 when the overall PSI exceeds this (default: %(default)s, the usual rule of "
                             "thumb for a significant shift)")
    parser.add_argument("--group-threshold", type=float, default=None,
                        help="also exit 1 when any group's PSI exceeds this (default: groups do not decide)")
    parser.add_argument("--min-group-size", type=int, default=DEFAULT_MIN_GROUP_SIZE,
                        help="compare a group only with at least this many scored images on each side "
                             "(default: %(default)s; fewer make PSI noise: (bins-1)*(1/n_b+1/n_c))")
    parser.add_argument("--output-plot", default=None, metavar="PNG",
                        help="also write the baseline-vs-current histogram here (it is logged to MLflow anyway)")
    parser.add_argument("--label-manifest", default=None, metavar="CSV",
                        help="write a labelling manifest (.csv, local or s3://) of the current run's new images: "
                             "the most uncertain and the highest-scoring, with an empty label column")
    parser.add_argument("--label-sample", type=int, default=DEFAULT_LABEL_SAMPLE,
                        help="images per kind in the labelling manifest (default: %(default)s)")
    add_stack_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """0 stable, 1 drift, 2 refused (re-raised for ``jobs.cli`` to print), 3 for any other failure, printed here as
    one line: an uncaught exception would exit 1, which a scheduler reads as drift."""
    try:
        return compare(args)
    except Exception as err:
        if is_refusal(err):
            raise  # jobs.cli prints its one line and exits 2
        return report_failure(err)


def compare(args: argparse.Namespace) -> int:
    """The comparison itself: prints the JSON, logs the run, returns ``STABLE_STATUS`` or ``DRIFT_STATUS``."""
    from jobs import drift

    check_numbers(args)
    storage_cfg = storage_from_args(args)
    needs_mlflow = drift.is_run_id(args.baseline) or drift.is_run_id(args.current) or "@" in args.model
    tracking_uri = tracking_connection(args, needs_mlflow)
    baseline_side, current_side = side_of(args.baseline), side_of(args.current)
    model_uri = drift.canonical_model_uri(args.model, alias_target=_alias_lookup(tracking_uri))
    baseline = drift.load_scores(baseline_side, storage_cfg)
    current = drift.load_scores(current_side, storage_cfg)
    drift.check_same_model(model_uri, baseline, current, baseline_side, current_side,
                           (fingerprint(baseline_side, storage_cfg), fingerprint(current_side, storage_cfg)))
    report = drift.drift_report(baseline, current, baseline_side, current_side, min_group_size=args.min_group_size)
    decision = drift.exceeded(report, args.threshold, args.group_threshold)
    # Once decided, a failing extra (manifest, MLflow run, plot) is a warning: it must not hide a drift.
    candidates = after_decision("write the labelling manifest", label_manifest, args, baseline, current, storage_cfg)
    if tracking_uri:
        # MLflow writes the run's link to stdout; stdout is the JSON a scheduler parses, so the link goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            after_decision("log the MLflow run", log_drift_run, args, model_uri, report, decision, candidates)
    if args.output_plot:
        after_decision("save the plot", save_plot, report, args.output_plot)
    print(drift.printable(report, decision, args.threshold, args.group_threshold))
    return DRIFT_STATUS if decision else STABLE_STATUS


def after_decision(what: str, action, *args):
    """``action(*args)``, or None with a one-line warning on stderr when it fails."""
    try:
        return action(*args)
    except Exception as err:  # noqa: BLE001 - any failure here is reported, never the decision's
        log.warning("mpft drift: could not %s: %s", what, " ".join(str(err).split())[:300])
        return None


def tracking_connection(args: argparse.Namespace, required: bool) -> Optional[str]:
    """``connect_tracking``, with a server that does not answer raised as ``Unavailable`` (status 3: MLflow down
    is no usage error); a missing URI stays a usage error (SystemExit, status 2)."""
    try:
        return connect_tracking(args, required=required)
    except UsageError as err:
        raise Unavailable(str(err)) from err


def is_refusal(err: Exception) -> bool:
    """Whether ``err`` is a refusal a person can fix (status 2): this project's InputError or UsageError, or
    MLflow's word that a run or model version does not exist. A failing store is never one, even when its error
    is an OSError ``jobs.cli`` would print as a usage error."""
    from jobs.cli import mlflow_refusal
    from mpft_core.config import InputError
    from pipelines.store_errors import store_failure

    if isinstance(err, Unavailable) or store_failure(err) is not None:
        return False
    return isinstance(err, (InputError, UsageError)) or mlflow_refusal(err) is not None


def report_failure(err: Exception) -> int:
    """One line on stderr for a comparison that could not be made (the traceback with -v); ``FAILED_STATUS``."""
    from pipelines.store_errors import store_failure

    log.debug("mpft drift could not compute the comparison", exc_info=err)
    reason = store_failure(err) or (str(err) if isinstance(err, Unavailable) else f"{type(err).__name__}: {err}")
    print(f"mpft drift: could not compute the comparison (exit {FAILED_STATUS}, not drift): {' '.join(reason.split())}",
          file=sys.stderr)
    return FAILED_STATUS


def check_numbers(args: argparse.Namespace) -> None:
    """SystemExit (status 2, one line) for thresholds or sizes that cannot mean anything."""
    if args.threshold < 0 or (args.group_threshold is not None and args.group_threshold < 0):
        raise SystemExit("--threshold and --group-threshold are PSI values: 0 or more")
    if args.min_group_size < 1 or args.label_sample < 1:
        raise SystemExit("--min-group-size and --label-sample must be at least 1")


def side_of(ref: str) -> Side:
    """A run id becomes the output and input its params name; anything else is taken for an output."""
    from jobs import drift

    if not drift.is_run_id(ref):
        from jobs.common import check_location_scheme

        check_location_scheme(ref, "--baseline/--current")
        return drift.Side(given=ref, output_uri=ref)
    from jobs import tracking

    return drift.side_from_run(ref, tracking.run_params(ref))


def _alias_lookup(tracking_uri: Optional[str]):
    """``jobs.tracking.alias_target`` when a tracking server is set (an alias needs the registry), else None."""
    if not tracking_uri:
        return None
    from jobs import tracking

    return tracking.alias_target


def fingerprint(side: Side, storage_cfg) -> Optional[dict]:
    """The checkpoint hashes the output's record holds, None without a record."""
    from pipelines.scoring import read_output_record

    record = read_output_record(side.output_uri, storage_cfg)
    return None if record is None else record.checkpoint_sha256


def label_manifest(args: argparse.Namespace, baseline: pa.Table, current: pa.Table, storage_cfg) -> Optional[pa.Table]:
    """Write ``--label-manifest`` when asked; the rows written (None when not asked)."""
    if not args.label_manifest:
        return None
    from jobs import drift

    candidates = drift.label_candidates(baseline, current, args.label_sample)
    drift.write_label_manifest(candidates, args.label_manifest, storage_cfg)
    return candidates


def save_plot(report: dict, path: str) -> None:
    from pathlib import Path

    from jobs import plots

    fig = drift_figure(report, plots)
    Path(path).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plots.plt.close(fig)  # pyplot as jobs.plots imported it, after choosing the headless backend


def drift_figure(report: dict, plots):
    overall = report["overall"]
    return plots.drift_histograms(report["bin_edges"], overall["histogram_baseline"], overall["histogram_current"],
                                  f"PSI {overall['psi']:.3f}, KS {overall['ks']:.3f}")


def log_drift_run(args: argparse.Namespace, model_uri: str, report: dict, decision: list[str],
                  candidates: Optional[pa.Table]) -> str:
    """One run in ``mpft-drift``: the sides and thresholds as params, the numbers as metrics, the decision as a tag,
    the plot, the full report (``drift.json``, histograms included) and the labelling manifest as artefacts."""
    import json
    import tempfile
    from pathlib import Path

    from jobs import drift, plots, tracking

    with tracking.start_run(drift.DRIFT_EXPERIMENT, "drift") as run:
        tracking.log_params({"model": args.model, "model_uri": model_uri, "baseline": args.baseline,
                             "current": args.current, "baseline_output": report["baseline"],
                             "current_output": report["current"], "threshold": args.threshold,
                             "group_threshold": args.group_threshold, "min_group_size": args.min_group_size,
                             "label_manifest": args.label_manifest})
        tracking.log_metrics({**drift.report_metrics(report), "drift": int(bool(decision)),
                              "n_groups_compared": len(report["groups"])})
        tracking.set_run_tags({"drift.decision": "drift" if decision else "stable"})
        tracking.log_figure(drift_figure(report, plots), "drift.png")
        with tempfile.TemporaryDirectory(prefix="mpft-drift-") as tmp:
            (Path(tmp) / "drift.json").write_text(json.dumps(report, indent=2))
            tracking.log_artifact_file(str(Path(tmp) / "drift.json"))
            if candidates is not None:
                (Path(tmp) / "label_manifest.csv").write_bytes(drift.label_manifest_csv(candidates))
                tracking.log_artifact_file(str(Path(tmp) / "label_manifest.csv"))
        return run.info.run_id
