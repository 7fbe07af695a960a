"""`mpft promote`: evaluate `challenger` and `champion` on a frozen holdout, apply the gate, move the alias.

    challenger ─┐
                ├─ same holdout manifest, same evaluation code as `mpft evaluate` ─▶ gate ─▶ tags on the challenger
    champion  ──┘                                                                        └▶ alias `champion` (if passed)

Both models are evaluated on the clean holdout and under every degraded or format-aligned condition the gate rules on
(``GateConfig.conditions``, e.g. ``aligned-jpeg96``). Both results are recorded as tags on the challenger version
whether or not it passes, so the registry says why a
version was (not) promoted. `--dry-run` evaluates and prints the table but writes nothing.

Before anything is evaluated, the holdout is checked against the challenger's training data (`pipelines.leakage`):
holdout images in it, by path or by identical bytes, refuse the promotion (or only warn, `leakage="warn"`). The
alias moves by compare-and-set: only if `champion` still points where it pointed when the evaluation started.
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
from mpft_core.perturb import CLEAN, Condition
from pipelines.leakage import LeakagePolicy, check_holdout_leakage
from pipelines.scoring_spec import ScoringResources
from pipelines.sources import SourceConfig
from pipelines.storage import StorageConfig

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
# The gate scores both models on CPU beside whatever else the cluster runs: one model replica, not one per core.
ONE_REPLICA = ScoringResources(num_actors=1)

# model refs, holdout sources, storage, conditions besides clean -> (per model {condition: per-subset results},
# holdout manifest hash)
Evaluator = Callable[[list[str], list[SourceConfig], Optional[StorageConfig], list[Condition]],
                     tuple[list[dict[str, dict]], str]]


class ChampionMoved(RuntimeError):
    """``champion`` moved while a promotion was evaluating; the alias was left where the other writer put it."""


@dataclass
class PromotionOutcome:
    decision: GateDecision
    challenger_version: str
    champion_version: Optional[str]
    promoted: bool
    holdout_hash: str


def default_evaluator(model_refs: list[str], holdout: list[SourceConfig], storage_cfg: Optional[StorageConfig],
                      conditions: list[Condition] = (), *, start_ray: Optional[Callable[[], None]] = None):
    """Per model, ``{condition: per-subset metrics}`` on the clean holdout and under each of ``conditions``
    (degradations, alignments), by the same code path as `mpft evaluate` (fake-only holdout subsets scored with the
    real subset their source pairs them with); the models are compared in one pass over the holdout (each image read
    and decoded once per condition). ``start_ray``: called once the holdout manifest is built and the models are
    resolved (None: Ray is up already)."""
    from pipelines.evaluation import EvalOptions, build_eval_manifest, evaluate_many
    from pipelines.sources import manifest_hash

    manifest = build_eval_manifest(holdout, storage_cfg)
    models = [tracking.resolve_model(ref, storage_cfg) for ref in model_refs]
    if start_ray is not None:
        start_ray()
    results = evaluate_many(models, holdout, storage_cfg, perturbations=list(conditions),
                            options=EvalOptions(feature_space=False, resources=ONE_REPLICA, format_check=False),
                            manifest=manifest)
    return [{cond.name: cond.results for cond in result.conditions} for result in results], manifest_hash(manifest)


def promote(model_name: str, holdout: list[SourceConfig], gate: GateConfig, *, storage_cfg=None,
            dry_run: bool = False, evaluator: Evaluator = default_evaluator,
            challenger_version: Optional[str] = None, leakage: Optional[LeakagePolicy] = "error",
            training_sources: Optional[list[SourceConfig]] = None) -> PromotionOutcome:
    """Gate ``challenger_version`` (default: the version the ``challenger`` alias points at) against the champion.

    ``leakage``: what holdout images in the challenger's training data do (``error``: HoldoutLeakError before any
    evaluation; ``warn``); None when the caller has checked these training sources already. ``training_sources``:
    the challenger's training data (default: the ``train`` sources its training run logged in ``config.yaml``).
    ChampionMoved if ``champion`` moved during the evaluation (nothing moved; the refusal is tagged).
    """
    challenger_version = str(challenger_version) if challenger_version else _challenger_from_alias(model_name)
    champion_version = tracking.get_alias_version(model_name, CHAMPION)  # must still hold when the alias moves
    if leakage is not None:
        _check_leakage(model_name, challenger_version, holdout, storage_cfg, leakage, training_sources)

    refs = [f"models:/{model_name}/{challenger_version}"]
    if champion_version is not None and champion_version != challenger_version:
        refs.append(f"models:/{model_name}/{champion_version}")
    # Both on the same holdout, in one pass, clean and under every condition the gate rules on.
    results, holdout_hash = evaluator(refs, holdout, storage_cfg, gate.extra_conditions())
    challenger, champion = results[0], (results[1] if len(results) > 1 else None)
    decision = decide(challenger, champion, gate)
    if champion_version == challenger_version:
        decision.reasons.append(f"version {challenger_version} is already the champion")
        decision.passed = False

    if dry_run:
        return PromotionOutcome(decision, challenger_version, champion_version, False, holdout_hash)
    tags = _gate_tags(decision, challenger, champion, champion_version, holdout_hash, gate)
    if decision.passed:
        try:
            set_champion_if_unchanged(model_name, challenger_version, expected=champion_version)
        except ChampionMoved as err:
            tracking.set_version_tags(model_name, challenger_version, _refused_tags(tags, str(err)))
            raise
        log.info("promoted %s version %s to %s", model_name, challenger_version, CHAMPION)
    tracking.set_version_tags(model_name, challenger_version, tags)
    return PromotionOutcome(decision, challenger_version, champion_version, decision.passed, holdout_hash)


def _challenger_from_alias(model_name: str) -> str:
    version = tracking.get_alias_version(model_name, CHALLENGER)
    if version is None:
        raise LookupError(f"registered model {model_name!r} has no {CHALLENGER!r} alias: train one first")
    return version


def set_champion_if_unchanged(model_name: str, version: str, expected: Optional[str]) -> None:
    """Point ``champion`` at ``version`` only if it still points at ``expected`` (None: there was no champion).

    MLflow has no atomic compare-and-set on aliases, so this is check-then-set done as tightly as possible: the
    alias is re-read immediately before it is set, with nothing in between. A writer that moves the alias inside
    that window (between the re-read and the set: two registry requests) is not detected; one that moves it at any
    earlier time, e.g. during the minutes of evaluation, is refused with ChampionMoved and the alias is not touched.
    """
    current = tracking.get_alias_version(model_name, CHAMPION)
    if current != expected:
        raise ChampionMoved(f"{CHAMPION!r} of {model_name!r} moved from {_named(expected)} to {_named(current)} while "
                            f"version {version} was being evaluated; left it at {_named(current)}: run the "
                            "promotion again to compare against the new champion")
    tracking.set_alias(model_name, CHAMPION, version)


def _named(version: Optional[str]) -> str:
    return f"version {version}" if version is not None else "no version"


def _check_leakage(model_name: str, version: str, holdout: list[SourceConfig], storage_cfg,
                   policy: LeakagePolicy, training_sources: Optional[list[SourceConfig]]) -> None:
    sources = training_sources if training_sources is not None else training_sources_of(model_name, version)
    if sources is None:
        log.warning("cannot check the holdout for leakage: the training data of %s version %s is unknown (no "
                    "training run with a config.yaml)", model_name, version)
        return
    check_holdout_leakage(sources, holdout, storage_cfg, policy)


def training_sources_of(model_name: str, version: str) -> Optional[list[SourceConfig]]:
    """The ``train`` sources in the ``config.yaml`` of the run that trained ``version``; None when there is no such
    run or config, or it is not a training job's."""
    from pydantic import ValidationError

    config = tracking.training_config_of(model_name, version)
    train = config.get("train") if isinstance(config, dict) else None
    try:
        return [SourceConfig.from_dict(s) for s in ([train] if isinstance(train, dict) else train or [])] or None
    except ValidationError:
        return None


def _refused_tags(tags: dict[str, str], reason: str) -> dict[str, str]:
    return {**tags, "gate.decision": "refused", "gate.reasons": reason}  # the gate's rules passed: this is the reason


def _gate_tags(decision: GateDecision, challenger: dict, champion: Optional[dict], champion_version: Optional[str],
               holdout_hash: str, gate: GateConfig) -> dict[str, str]:
    """The registry's record of a decision: its rules and reasons, and each model's mean accuracy and AP on each gated
    condition (``gate.challenger_mean_acc`` on clean images, ``gate.aligned-jpeg96.challenger_mean_acc``, ...)."""
    tags = {
        "gate.decision": "promoted" if decision.passed else "refused",
        "gate.reasons": "; ".join(decision.reasons) or "all rules pass",  # set_version_tags truncates
        "gate.config": json.dumps(gate.to_dict(), sort_keys=True),
        "gate.holdout_manifest_hash": holdout_hash,
        "gate.compared_to_version": champion_version or "none",
    }
    for condition in gate.rules():
        prefix = "gate." if condition == CLEAN else f"gate.{condition}."
        for role, results in (("challenger", challenger), ("champion", champion)):
            if results is not None:
                tags[f"{prefix}{role}_mean_acc"] = f"{results[condition][MEAN_KEY]['acc']:.6f}"
                tags[f"{prefix}{role}_mean_ap"] = f"{results[condition][MEAN_KEY]['ap']:.6f}"
    return tags


def render_decision(outcome: PromotionOutcome, model_name: str, dry_run: bool) -> str:
    head = (f"model {model_name}: challenger v{outcome.challenger_version} vs champion "
            f"{'v' + outcome.champion_version if outcome.champion_version else '(none)'}"
            f"{'  [dry run: nothing changed]' if dry_run else ''}")
    return "\n".join([head, "", to_markdown(outcome.decision.table), outcome.decision.summary()])
