"""`mpft promote`: evaluate `challenger` and `champion` on a frozen holdout, apply the gate, move the alias.

    challenger ─┐
                ├─ same holdout manifest, same evaluation code as `mpft evaluate` ─▶ gate ─▶ tags on the challenger
    champion  ──┘                                                                        └▶ alias `champion` (if passed)

Both results are recorded as tags on the challenger version whether or not it passes, so the registry says why a
version was (not) promoted. `--dry-run` evaluates and prints the table but writes nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from jobs import tracking
from jobs.gate import GateConfig, GateDecision, decide
from mpft_core.metrics import MEAN_KEY, to_markdown
from pipelines.scoring_spec import ScoringResources
from pipelines.sources import SourceConfig
from pipelines.storage import StorageConfig

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
# The gate scores both models on CPU beside whatever else the cluster runs: one model replica, not one per core.
ONE_REPLICA = ScoringResources(num_actors=1)

# model refs, holdout sources, storage -> (per-subset results of each model, holdout manifest hash)
Evaluator = Callable[[list[str], list[SourceConfig], Optional[StorageConfig]], tuple[list[dict], str]]


@dataclass
class PromotionOutcome:
    decision: GateDecision
    challenger_version: str
    champion_version: Optional[str]
    promoted: bool
    holdout_hash: str


def default_evaluator(model_refs: list[str], holdout: list[SourceConfig], storage_cfg: Optional[StorageConfig]):
    """Clean per-subset metrics of registered versions, by the same code path as `mpft evaluate` (fake-only holdout
    subsets scored with the real subset their source pairs them with); the models are compared in one pass over the
    holdout (each image read and decoded once)."""
    from pipelines.evaluation import CLEAN, EvalOptions, build_eval_manifest, evaluate_many
    from pipelines.sources import manifest_hash

    manifest = build_eval_manifest(holdout, storage_cfg)
    results = evaluate_many([tracking.resolve_model(ref, storage_cfg) for ref in model_refs], holdout, storage_cfg,
                            options=EvalOptions(feature_space=False, resources=ONE_REPLICA), manifest=manifest)
    return [result.condition(CLEAN).results for result in results], manifest_hash(manifest)


def promote(model_name: str, holdout: list[SourceConfig], gate: GateConfig, *, storage_cfg=None,
            dry_run: bool = False, evaluator: Evaluator = default_evaluator) -> PromotionOutcome:
    challenger_version = tracking.get_alias_version(model_name, CHALLENGER)
    if challenger_version is None:
        raise LookupError(f"registered model {model_name!r} has no {CHALLENGER!r} alias: train one first")
    champion_version = tracking.get_alias_version(model_name, CHAMPION)

    refs = [f"models:/{model_name}/{challenger_version}"]
    if champion_version is not None and champion_version != challenger_version:
        refs.append(f"models:/{model_name}/{champion_version}")
    results, holdout_hash = evaluator(refs, holdout, storage_cfg)  # both on the same holdout, in one pass
    challenger, champion = results[0], (results[1] if len(results) > 1 else None)
    decision = decide(challenger, champion, gate)
    if champion_version == challenger_version:
        decision.reasons.append(f"version {challenger_version} is already the champion")
        decision.passed = False

    promoted = decision.passed and not dry_run
    if not dry_run:
        tracking.set_version_tags(model_name, challenger_version,
                                  _gate_tags(decision, challenger, champion, champion_version, holdout_hash, gate))
        if promoted:
            tracking.set_alias(model_name, CHAMPION, challenger_version)
            log.info("promoted %s version %s to %s", model_name, challenger_version, CHAMPION)
    return PromotionOutcome(decision, challenger_version, champion_version, promoted, holdout_hash)


def _gate_tags(decision: GateDecision, challenger: dict, champion: Optional[dict], champion_version: Optional[str],
               holdout_hash: str, gate: GateConfig) -> dict[str, str]:
    tags = {
        "gate.decision": "promoted" if decision.passed else "refused",
        "gate.reasons": "; ".join(decision.reasons) or "all rules pass",  # set_version_tags truncates
        "gate.config": json.dumps(gate.to_dict(), sort_keys=True),
        "gate.holdout_manifest_hash": holdout_hash,
        "gate.compared_to_version": champion_version or "none",
        "gate.challenger_mean_acc": f"{challenger[MEAN_KEY]['acc']:.6f}",
        "gate.challenger_mean_ap": f"{challenger[MEAN_KEY]['ap']:.6f}",
    }
    if champion is not None:
        tags["gate.champion_mean_acc"] = f"{champion[MEAN_KEY]['acc']:.6f}"
        tags["gate.champion_mean_ap"] = f"{champion[MEAN_KEY]['ap']:.6f}"
    return tags


def render_decision(outcome: PromotionOutcome, model_name: str, dry_run: bool) -> str:
    head = (f"model {model_name}: challenger v{outcome.challenger_version} vs champion "
            f"{'v' + outcome.champion_version if outcome.champion_version else '(none)'}"
            f"{'  [dry run: nothing changed]' if dry_run else ''}")
    return "\n".join([head, "", to_markdown(outcome.decision.table), outcome.decision.summary()])
