"""`mpft sweep`: variants of one training job, each a Ray Train run inside a Ray Tune trial, compared in one table.

    parent MLflow run "sweep-<name>" (the sweep's settings, the comparison tables and plot)
      ├─ <name>-t00   child run: a whole `mpft train` run with the trial's overrides (+ its test evaluation)
      ├─ <name>-t01   ...
      └─ the best trial by a validation metric, registered as `challenger` if asked

The trials are the cross product of the grid's axes (``method.detector.mask.ratio: [0.25, 0.5]``) and, optionally,
named variants (``probe: {method.detector.trainable: probe, ...}``: several keys that change together). Ray Tune runs
them, at most ``max_concurrent`` at a time; each trial's function is the driver of one Ray Train run
(``jobs.train.run_train``), whose workers Ray places as for any training job. Nothing is tuned adaptively: a sweep
here is a comparison (an ablation), so every trial runs to the end and the best one is chosen on validation data.

After training, each trial's kept checkpoint is scored on the ``test`` sources (clean and under ``conditions``, e.g.
``aligned-jpeg96``): accuracy and AUC averaged over the generators the training data contains ("seen") and over
the others ("unseen"). The selection never reads those numbers. Where ``method.optim.seed`` is an axis, the summary
table groups the trials that differ only in the seed: mean ± standard deviation.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from jobs import plots, tracking
from jobs.config import TrainJobConfig, with_overrides
from mpft_core.config import InputError, StrictModel
from mpft_core.metrics import MEAN_KEY
from mpft_core.perturb import CLEAN, condition_from_name
from pipelines.sources import SourceConfig

log = logging.getLogger(__name__)

SEED_KEY = "method.optim.seed"
VARIANT_COLUMN = "variant"
TRIALS_TABLE = "sweep_trials"
SUMMARY_TABLE = "sweep_summary"
# Per trial, from the test evaluation: accuracy and AUC over seen and unseen generators, per condition.
TEST_METRICS = ("acc", "auc")


class SweepConfig(StrictModel):
    """What a sweep runs; saved as the parent run's ``config.yaml``."""

    name: str
    job: TrainJobConfig  # the base training job every trial changes
    grid: dict[str, list[Any]] = Field(default_factory=dict)  # dotted key -> values; trials are the cross product
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)  # name -> {dotted key: value}, crossed too
    test: list[SourceConfig] = Field(default_factory=list)  # scored after training: seen and unseen generators
    conditions: list[str] = Field(default_factory=list)  # test conditions besides clean, e.g. aligned-jpeg96
    select: str = f"val_{MEAN_KEY}_acc"  # a metric the training's kept checkpoint reported on validation
    select_mode: Literal["max", "min"] = "max"
    register_best: bool = False
    max_concurrent: Optional[int] = Field(None, ge=1)  # None: as many as the cluster's CPUs fit (at least 1)

    @field_validator("grid")
    @classmethod
    def _axes_have_values(cls, grid: dict) -> dict:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid axis {key} has no values")
        return grid

    @field_validator("select")
    @classmethod
    def _validation_metric(cls, name: str) -> str:
        if not name.startswith("val_"):
            raise ValueError(f"select must be a validation metric (val_...), not {name!r}: choosing on test figures "
                             "would make them a validation set")
        return name

    @model_validator(mode="after")
    def _one_source_per_setting(self) -> SweepConfig:
        for name, settings in self.variants.items():
            both = sorted(f"{a} / {b}" if a != b else a for a in settings for b in self.grid if _overlap(a, b))
            if both:
                raise ValueError(f"variant {name} and the grid both set {', '.join(both)}: set each key in one place")
        return self

    @field_validator("conditions")
    @classmethod
    def _known_conditions(cls, names: list) -> list:
        for name in names:
            condition_from_name(name)  # ValueError naming the condition
        return names

    def trials(self) -> list[Trial]:
        """Every combination of a variant (or none) and one value per axis, numbered in a stable order."""
        variants = list(self.variants.items()) or [("", {})]
        axes = list(self.grid.items())
        combos = itertools.product(variants, *[[(key, value) for value in values] for key, values in axes])
        trials = []
        for index, ((variant, settings), *point) in enumerate(combos):
            trials.append(Trial(index=index, name=f"{self.name}-t{index:02d}", variant=variant,
                                settings=dict(point), overrides={**settings, **dict(point)}))
        return trials


def _overlap(key: str, other: str) -> bool:
    """Whether two dotted keys set the same setting, or one a section holding the other."""
    return key == other or key.startswith(other + ".") or other.startswith(key + ".")


@dataclass
class Trial:
    index: int
    name: str  # the trial's training run name (MLflow child run and checkpoint folder)
    variant: str  # "" when the sweep has no variants
    settings: dict[str, Any]  # the grid axes' values
    overrides: dict[str, Any]  # what the trial changes in the base job: the variant's settings, then the axes'


@dataclass
class TrialOutcome:
    trial: Trial
    run_id: Optional[str] = None
    checkpoint: Optional[str] = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None


@dataclass
class SweepOutcome:
    parent_run_id: str
    trials: list[TrialOutcome]
    table: pd.DataFrame
    summary: pd.DataFrame
    best: Optional[TrialOutcome]
    model_version: Optional[str]

    @property
    def failed(self) -> list[TrialOutcome]:
        return [t for t in self.trials if t.error is not None]


def trial_job(base: TrainJobConfig, trial: Trial) -> TrainJobConfig:
    """The base job with the trial's overrides and name; never registered (the sweep registers its best)."""
    data = with_overrides(base.model_dump(mode="python"), list(trial.overrides.items()))
    data["name"] = trial.name
    cfg = TrainJobConfig.model_validate(data)
    cfg.tracking.registered_model = None
    return cfg


def check_trials(cfg: SweepConfig) -> list[Trial]:
    """Every trial's job validated before anything starts: a misspelt key or a bad value fails the sweep now."""
    from pydantic import ValidationError

    trials = cfg.trials()
    if len(trials) < 2:
        raise InputError("a sweep needs at least two trials: give a grid axis with two values, or two variants")
    for trial in trials:
        try:
            trial_job(cfg.job, trial)
        except ValidationError as err:
            raise InputError(f"trial {trial.name} ({describe(trial)}): {err.errors()[0]['msg']} at "
                             f"{'.'.join(str(p) for p in err.errors()[0]['loc'])}") from None
    return trials


def describe(trial: Trial) -> str:
    parts = [f"variant={trial.variant}"] if trial.variant else []
    return ", ".join(parts + [f"{key}={value}" for key, value in trial.settings.items()])


# ------------------------------------------------------------------------------------------------------ one trial


def run_trial(trial: Trial, base: TrainJobConfig, *, tracking_uri: str, parent_run_id: str,
              seen: Sequence[str], test: Sequence[SourceConfig], conditions: Sequence[str],
              verbose: bool = False) -> dict[str, float]:
    """Train the trial's job as a child run of the sweep, score its kept checkpoint on ``test``, and return the
    validation and test figures (also logged to the child run)."""
    from jobs.promote import default_evaluator
    from jobs.train import run_train

    cfg = trial_job(base, trial)
    outcome = run_train(cfg, tracking_uri, parent_run_id=parent_run_id, verbose=verbose)
    metrics = {key: float(value) for key, value in outcome.metrics.items() if _is_number(value)}
    if test:
        [results], _ = default_evaluator([outcome.checkpoint_dir], list(test), cfg.storage,
                                         [condition_from_name(name) for name in conditions])
        metrics.update(generator_figures(results, seen))
        tracking.log_metrics_to_run(tracking_uri, outcome.run_id, {
            f"test_{key}": value for key, value in metrics.items()
            if key.startswith(("seen_", "unseen_")) and not math.isnan(value)})
        tracking.finish_run_logging(tracking_uri, outcome.run_id)
    return {**metrics, "run_id": outcome.run_id, "checkpoint": outcome.checkpoint_dir}


def _drive_trial(*args, verbose: bool, **kwargs) -> dict:
    """``run_trial`` in a Ray task of its own, with the Ray Data settings of a job's driver."""
    from pipelines.runtime import prepare_data_driver

    prepare_data_driver(verbose=verbose)
    return run_trial(*args, verbose=verbose, **kwargs)


def generator_figures(results: dict[str, dict], seen: Sequence[str]) -> dict[str, float]:
    """``{condition: per-subset results}`` -> ``seen_acc``, ``unseen_auc``, ``seen_acc_aligned-jpeg96``...: each
    metric averaged over the generators the training data contains and over the others (NaN when there are none)."""
    summary = {}
    for condition, per_subset in results.items():
        suffix = "" if condition == CLEAN else f"_{condition}"
        subsets = [name for name in per_subset if name != MEAN_KEY]
        groups = {"seen": [s for s in subsets if s in seen], "unseen": [s for s in subsets if s not in seen]}
        for group, members in groups.items():
            for metric in TEST_METRICS:
                values = [per_subset[s][metric] for s in members if _is_number(per_subset[s].get(metric))
                          and not math.isnan(per_subset[s][metric])]  # an AUC undefined for a one-class subset
                summary[f"{group}_{metric}{suffix}"] = float(np.mean(values)) if values else math.nan
    return summary


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -------------------------------------------------------------------------------------------------- the whole sweep


def run_sweep(cfg: SweepConfig, tracking_uri: str, *, verbose: bool = False) -> SweepOutcome:
    """Run every trial under Ray Tune below one parent MLflow run; log the comparison; register the best trial as
    ``challenger`` when ``cfg.register_best``. InputError before anything starts for a trial that cannot run."""
    from pipelines.runtime import init_ray

    trials = check_trials(cfg)
    if cfg.register_best and not cfg.job.tracking.registered_model:
        raise InputError("register_best needs job.tracking.registered_model")
    seen = seen_generators(cfg, trials)
    check_test_is_held_out(cfg, trials)
    init_ray(cfg.job.ray_address, verbose=verbose)
    tracking.set_tracking(tracking_uri)
    with tracking.start_run(cfg.job.tracking.experiment, run_name=f"sweep-{cfg.name}") as parent:
        tracking.log_config(cfg.to_dict())
        tracking.log_params({"sweep.trials": len(trials), "sweep.select": f"{cfg.select_mode} {cfg.select}",
                             "sweep.seen_subsets": "; ".join(sorted({",".join(s) for s in seen.values()}))})
        outcomes = _tune(cfg, trials, tracking_uri, parent.info.run_id, seen, verbose)
        table = trials_table(outcomes, cfg)
        summary = summary_table(table, cfg)
        tracking.log_table(table, TRIALS_TABLE)
        tracking.log_table(summary, SUMMARY_TABLE)
        tracking.log_text(to_markdown(summary), f"{SUMMARY_TABLE}.md")
        tracking.log_figure(plots.sweep_comparison(summary, cfg.select), "sweep_comparison.png")
        best = best_trial(outcomes, cfg.select, cfg.select_mode)
        if best is not None:
            tracking.set_run_tags({"sweep.best_trial": best.trial.name, "sweep.best_run_id": best.run_id or ""})
        result = SweepOutcome(parent.info.run_id, outcomes, table, summary, best, None)
        if cfg.register_best:
            # The best of some trials is not the best of the sweep: register only when every trial finished.
            if result.failed or best is None:
                log.warning("not registering a challenger: %s", "some trials did not finish" if result.failed
                            else f"no trial reported {cfg.select}")
            else:
                result.model_version = register_trial(best, cfg)
        return result


def seen_generators(cfg: SweepConfig, trials: Sequence[Trial]) -> dict[int, list[str]]:
    """Per trial, the subsets its training data holds (a trial may change the training sources)."""
    from jobs.train import labelled_manifest

    by_sources: dict[str, list[str]] = {}
    seen = {}
    for trial in trials:
        job = trial_job(cfg.job, trial)
        key = json.dumps([source.to_dict() for source in job.train], sort_keys=True)
        if key not in by_sources:
            by_sources[key] = sorted(set(labelled_manifest(job.train, job.storage).column("subset").to_pylist()))
        seen[trial.index] = by_sources[key]
    return seen


def check_test_is_held_out(cfg: SweepConfig, trials: Sequence[Trial]) -> None:
    """HoldoutLeakError (one line) before anything starts when a test image is also a training or validation image
    of some trial (same path or same bytes)."""
    from pipelines.leakage import find_holdout_leaks, sources_manifest

    if not cfg.test:
        return
    sources = {json.dumps(s.to_dict(), sort_keys=True): s for trial in trials
               for job in [trial_job(cfg.job, trial)] for s in [*job.train, *job.val]}
    storage_cfg = cfg.job.storage
    leaks = find_holdout_leaks(sources_manifest(list(sources.values()), storage_cfg),
                               sources_manifest(cfg.test, storage_cfg), storage_cfg)
    if leaks:
        raise InputError(f"{leaks.describe()}: the test figures would score images a trial trained or validated on; "
                         "take them out of the test sources (--test) or of the job's train/val sources")


def _tune(cfg: SweepConfig, trials: list[Trial], tracking_uri: str, parent_run_id: str, seen: dict[int, list[str]],
          verbose: bool) -> list[TrialOutcome]:
    """The trials as one Ray Tune grid; a trial that fails is kept with its error, the others go on."""
    import ray
    from ray import tune
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from pipelines import storage

    by_index = {t.index: t for t in trials}
    # Tune places a trial's process in a placement group that captures what it starts: Ray Data's tasks and the
    # evaluation's actors would have to fit its small bundle (seen: decoding stalled at a budget of 0 CPU). The
    # trial's work runs as a task outside it, and asks for its CPUs like any job.
    drive = ray.remote(_drive_trial).options(
        num_cpus=0, max_retries=0, scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))

    def trial_function(config: dict) -> dict:
        return ray.get(drive.remote(by_index[config["trial"]], cfg.job, tracking_uri=tracking_uri,
                                    parent_run_id=parent_run_id, seen=seen[config["trial"]], test=cfg.test,
                                    conditions=cfg.conditions, verbose=verbose))

    fs, root = storage.resolve(storage.join(cfg.job.checkpoint_root, f"{cfg.name}-tune"), cfg.job.storage)
    if fs.type_name == "local":
        from pathlib import Path

        Path(root).mkdir(parents=True, exist_ok=True)
    fitting = default_concurrency(cfg.job, ray)
    if cfg.max_concurrent and cfg.max_concurrent > fitting:
        log.warning("max_concurrent %d is more than the cluster's CPUs hold (%d trials): concurrent trials may wait on "
                    "each other's decoding forever", cfg.max_concurrent, fitting)
    tuner = tune.Tuner(
        tune.with_resources(trial_function, {"cpu": 0.01}),  # it only waits on the task
        param_space={"trial": tune.grid_search([t.index for t in trials])},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent or fitting),
        run_config=tune.RunConfig(name=f"{cfg.name}-tune", storage_path=root, storage_filesystem=fs,
                                  verbose=1 if verbose else 0),
    )
    grid = tuner.fit()
    # A trial that never reported (Tune stopped by Ctrl-C, or never started) keeps this error.
    outcomes = {t.index: TrialOutcome(t, error="did not finish") for t in trials}
    for result in grid:
        outcome = outcomes[result.config["trial"]]
        metrics = dict(result.metrics or {})
        if result.error is not None:
            outcome.error = _last_line(result.error)
        elif "run_id" in metrics:
            outcome.error = None
            outcome.run_id, outcome.checkpoint = metrics.pop("run_id"), metrics.pop("checkpoint", None)
            outcome.metrics = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        if outcome.error is not None:
            log.warning("trial %s (%s) failed: %s", outcome.trial.name, describe(outcome.trial), outcome.error)
    return [outcomes[t.index] for t in trials]


def default_concurrency(job: TrainJobConfig, ray) -> int:
    """As many trials as the cluster's CPUs hold training workers for, leaving a CPU per trial for decoding."""
    per_trial = job.scaling.num_workers * job.scaling.cpus_per_worker + 1
    return max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))


def _last_line(err: BaseException) -> str:
    """The error's last line: a Ray task error's text ends with the cause."""
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def best_trial(outcomes: Sequence[TrialOutcome], metric: str, mode: str) -> Optional[TrialOutcome]:
    """The finished trial with the best ``metric`` (ties: the lower validation loss, then the lower trial number);
    None when none reported it."""
    scored = [t for t in outcomes if t.error is None and _is_number(t.metrics.get(metric))
              and not math.isnan(t.metrics[metric])]
    if not scored:
        return None
    sign = -1 if mode == "max" else 1
    return min(scored, key=lambda t: (sign * t.metrics[metric], t.metrics.get("val_loss", math.inf), t.trial.index))


def register_trial(best: TrialOutcome, cfg: SweepConfig) -> str:
    """Log the best trial's checkpoint as a model in its own run, register it and point ``challenger`` at it."""
    name = cfg.job.tracking.registered_model
    resolved = tracking.resolve_model(best.checkpoint, cfg.job.storage)
    with tracking.continue_run(best.run_id) as run:
        model_uri = tracking.log_detector_model(resolved.checkpoint_dir)
        manifest_hash = run.data.params.get("data.train_manifest_hash", "")
    version = tracking.register_model(model_uri, name, tags={"train_run_id": best.run_id, "sweep": cfg.name,
                                                             "train_manifest_hash": manifest_hash})
    tracking.set_alias(name, "challenger", version)
    log.info("registered the best trial %s as %s version %s (challenger)", best.trial.name, name, version)
    return version


# ------------------------------------------------------------------------------------------------------- tables


def trials_table(outcomes: Sequence[TrialOutcome], cfg: SweepConfig) -> pd.DataFrame:
    """One row per trial: its name, variant, axis values, status, the selection metric and the test figures."""
    rows = []
    for outcome in outcomes:
        row = {"trial": outcome.trial.name}
        if cfg.variants:
            row[VARIANT_COLUMN] = outcome.trial.variant
        row.update({key: _shown(value) for key, value in outcome.trial.settings.items()})
        row["status"] = "ok" if outcome.error is None else f"failed: {outcome.error}"
        row[cfg.select] = outcome.metrics.get(cfg.select, math.nan)
        row.update({key: value for key, value in outcome.metrics.items() if key.startswith(("seen_", "unseen_"))})
        rows.append(row)
    return pd.DataFrame(rows)


def _shown(value) -> str:
    """A setting as a table cell: ``null`` for None (a random-init backbone), else its text."""
    return "null" if value is None else str(value)


def summary_table(table: pd.DataFrame, cfg: SweepConfig) -> pd.DataFrame:
    """The trials that differ only in ``method.optim.seed`` grouped: ``n`` finished trials, and each figure's mean and
    standard deviation (``mean`` / ``std`` columns); without a seed axis, one group per trial."""
    keys = ([VARIANT_COLUMN] if cfg.variants else []) + [key for key in cfg.grid if key != SEED_KEY]
    figures = [c for c in table.columns if c == cfg.select or c.startswith(("seen_", "unseen_"))]
    finished = table[table["status"] == "ok"]
    if not keys:  # the seed is the only axis: one group of every trial
        table = table.assign(sweep="all")
        keys = ["sweep"]
    rows = []
    for group, members in table.groupby(keys, sort=False):
        done = finished.loc[finished.index.intersection(members.index)]
        row = dict(zip(keys, group if isinstance(group, tuple) else (group,), strict=True))
        row["n"] = len(done)
        for figure in figures:
            values = done[figure].dropna().to_numpy(dtype=float)
            row[f"{figure} mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{figure} std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table, each figure as ``mean ± std`` (``mean`` alone for a single trial)."""
    keys = [c for c in summary.columns if not c.endswith((" mean", " std"))]
    figures = [c[: -len(" mean")] for c in summary.columns if c.endswith(" mean")]
    header = keys + figures
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.iterrows():
        cells = [str(row[k]) for k in keys]
        for figure in figures:
            mean, std = row[f"{figure} mean"], row[f"{figure} std"]
            cells.append("n/a" if math.isnan(mean) else f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stamped_name(base: str, stamp: Optional[str] = None) -> str:
    return f"{base}-{stamp or time.strftime('%Y%m%d-%H%M%S')}"
