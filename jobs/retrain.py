"""`mpft retrain`: the scheduled flow when a new generator appears, as one parent MLflow run with three children.

    holdout leakage check (before anything starts): holdout images in the training data refuse the job, or warn
    parent run "retrain-<name>-<time>"
      ├─ train     existing training sources + the new generator's images → challenger
      ├─ evaluate  challenger on the frozen holdout → per-subset accuracy, AP and AUC as metrics
      └─ promote   the version trained above vs champion through the gate → alias moves, or the job exits non-zero

The promotion names the trained version explicitly: the `challenger` alias may have moved meanwhile (another job).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pydantic import Field

from jobs import tracking
from jobs.config import TrainJobConfig, load_yaml
from jobs.gate import GateConfig
from jobs.promote import PromotionOutcome, default_evaluator, promote, render_decision
from mpft_core.config import InputError, StrictModel
from mpft_core.metrics import MEAN_KEY
from mpft_core.perturb import CLEAN
from pipelines.leakage import LeakagePolicy, check_holdout_leakage
from pipelines.sources import SourceConfig

log = logging.getLogger(__name__)


class RetrainConfig(StrictModel):
    # The regular training job; its `train` sources are the data the current champion was trained on.
    train: TrainJobConfig
    # The new generator's images (and any fresh real images), merged into the training manifest.
    new_data: list[SourceConfig] = Field(default_factory=list)
    # Frozen holdout both challenger and champion are judged on; keep it fixed between retrains.
    holdout: list[SourceConfig]
    gate: GateConfig = Field(default_factory=GateConfig)
    # Holdout images in the training data (same path or same bytes): refuse the job (error) or only warn (warn).
    leakage: LeakagePolicy = "error"


@dataclass
class RetrainOutcome:
    parent_run_id: str
    model_version: str
    promotion: PromotionOutcome


def load_retrain_config(path: str | Path) -> RetrainConfig:
    return RetrainConfig.from_dict(load_yaml(path))


def holdout_metrics(results: dict[str, dict]) -> dict[str, float]:
    """Flat MLflow metrics of ``{condition: per-subset results}``: ``holdout_{subset}_{acc,ap,auc}`` on the clean
    holdout, ``holdout_{condition}_{subset}_{...}`` under each gated condition."""
    metrics = {}
    for condition, per_subset in results.items():
        prefix = "holdout_" if condition == CLEAN else f"holdout_{condition}_"
        metrics.update({f"{prefix}{subset}_{k}": v for subset, row in per_subset.items()
                        for k, v in row.items() if k in ("acc", "ap", "auc")})
    return metrics


def run_retrain(cfg: RetrainConfig, tracking_uri: str, *, stamp: Optional[str] = None,
                verbose: bool = False) -> RetrainOutcome:
    """The three child runs under one parent run named after ``stamp`` (default: now); ``verbose`` as for
    ``run_train``. HoldoutLeakError before anything starts when the holdout leaks into the training data and
    ``cfg.leakage`` is ``error``; ChampionMoved if the champion moved while the challenger was evaluated."""
    from jobs.train import run_train

    model_name = cfg.train.tracking.registered_model
    if not model_name:
        raise InputError("retraining needs train.tracking.registered_model: promotion works on the registry")
    training_sources = [*cfg.train.train, *cfg.new_data]
    check_holdout_leakage(training_sources, cfg.holdout, cfg.train.storage, cfg.leakage)  # before hours of training
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    experiment = cfg.train.tracking.experiment
    tracking.set_tracking(tracking_uri)
    with tracking.start_run(experiment, run_name=f"retrain-{cfg.train.name}-{stamp}") as parent:
        parent_id = parent.info.run_id
        tracking.log_config(cfg.to_dict())

        # A fresh run name per retrain: re-using the base name would resume the previous training run instead.
        train_cfg = cfg.train.model_copy(update={"name": f"{cfg.train.name}-{stamp}",
                                                 "train": training_sources})
        trained = run_train(train_cfg, tracking_uri, parent_run_id=parent_id, verbose=verbose)

        with tracking.start_run(experiment, run_name="evaluate", parent_run_id=parent_id):
            challenger_ref = f"models:/{model_name}/{trained.model_version}"
            [results], holdout_hash = default_evaluator([challenger_ref], cfg.holdout, cfg.train.storage,
                                                        cfg.gate.extra_conditions())
            tracking.log_params({"model_uri": challenger_ref, "holdout_manifest_hash": holdout_hash})
            tracking.log_metrics(holdout_metrics(results))

        def reuse_challenger_result(refs, holdout, storage_cfg, conditions):
            # promote() asks for [challenger] or [challenger, champion]; the challenger was just evaluated on this
            # holdout under the same conditions, so only the champion needs a pass.
            if len(refs) == 1:
                return [results], holdout_hash
            [champion], champion_hash = default_evaluator(refs[1:], holdout, storage_cfg, conditions)
            if champion_hash != holdout_hash:
                raise RuntimeError("the holdout changed between the challenger's and the champion's evaluation")
            return [results, champion], holdout_hash

        with tracking.start_run(experiment, run_name="promote", parent_run_id=parent_id):
            # The trained version, not whatever `challenger` points at by now; leakage was checked before training.
            outcome = promote(model_name, cfg.holdout, cfg.gate, storage_cfg=cfg.train.storage,
                              evaluator=reuse_challenger_result, challenger_version=trained.model_version,
                              leakage=None)
            tracking.log_params({"challenger_version": outcome.challenger_version,
                                 "champion_version_before": outcome.champion_version or "none"})
            tracking.log_metrics({"promoted": float(outcome.promoted),
                                  "challenger_mean_acc": results[CLEAN][MEAN_KEY]["acc"]})
            tracking.log_text(render_decision(outcome, model_name, dry_run=False), "gate.md")
        tracking.set_run_tags({"retrain.decision": "promoted" if outcome.promoted else "refused"})
    return RetrainOutcome(parent_id, trained.model_version, outcome)
