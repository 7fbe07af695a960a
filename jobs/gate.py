"""The promotion gate: is the challenger better than the champion without getting worse anywhere?

Pure logic on per-condition, per-subset results (``{condition: mpft_core.metrics.per_subset_metrics output}``, both
models computed on the same frozen holdout); no MLflow, no Ray, so every rule is unit-tested on plain dicts.

The clean images are always gated. ``GateConfig.conditions`` adds degraded or format-aligned conditions (names as in
the evaluation tables: ``jpeg65``, ``blur3``, ``aligned-jpeg96``) with rules of their own: a challenger that gains on
pristine files by learning their format, and loses once both classes are re-encoded the same way, is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd
from pydantic import Field, field_validator, model_validator

from mpft_core.config import StrictModel
from mpft_core.metrics import MEAN_KEY, POOLED_KEY
from mpft_core.perturb import CLEAN, Condition, condition_from_name


class ConditionRules(StrictModel):
    """Rules on one condition. Differences are challenger minus champion, as fractions (0.01 = 1 point)."""

    # Mean accuracy over subsets may not drop by more than this (0 = must not be lower).
    mean_acc_tolerance: float = Field(0.0, ge=0.0)
    # No single subset's accuracy may drop by more than this.
    max_subset_acc_drop: float = Field(0.02, ge=0.0)
    # Mean average precision may not drop by more than this.
    mean_ap_tolerance: float = Field(0.0, ge=0.0)
    # With no champion, the challenger must still reach this mean accuracy here (None: no floor on this condition).
    min_mean_acc: Optional[float] = Field(None, ge=0.0, le=1.0)


REGRESSION_RULES = ("mean_acc_tolerance", "max_subset_acc_drop", "mean_ap_tolerance")


class GateConfig(ConditionRules):
    """The rules on the clean images, and the conditions gated besides them."""

    # With no champion, the challenger must still reach this mean accuracy to become the first champion.
    min_mean_acc: float = Field(0.5, ge=0.0, le=1.0)
    # {condition name: its rules}; both models are evaluated under each (e.g. {"aligned-jpeg96": {}}); a rule not
    # given for a condition is the clean one above.
    conditions: dict[str, ConditionRules] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _conditions_inherit_the_clean_rules(cls, data):
        """A condition's unset regression rules are the clean ones (YAML and ``mpft promote --condition`` alike);
        ``min_mean_acc`` is not inherited: a floor for a first champion applies where it is written."""
        if not isinstance(data, dict) or not isinstance(data.get("conditions"), dict):
            return data
        shared = {rule: data[rule] for rule in REGRESSION_RULES if rule in data}
        conditions = {}
        for name, rules in data["conditions"].items():
            if isinstance(rules, ConditionRules):  # kept an instance: assignments re-run this validator
                conditions[name] = ConditionRules(**{**shared, **rules.model_dump(exclude_unset=True)})
            else:
                conditions[name] = {**shared, **rules} if isinstance(rules, dict) else rules
        return {**data, "conditions": conditions}

    @field_validator("conditions")
    @classmethod
    def _known_conditions(cls, value: dict) -> dict:
        for name in value:
            if name == CLEAN:
                raise ValueError("the clean images are always gated by the top-level rules; name other conditions")
            condition_from_name(name)  # ValueError naming the accepted forms
        return value

    def rules(self) -> dict[str, ConditionRules]:
        """``{condition name: rules}``, the clean images first."""
        return {CLEAN: self, **self.conditions}

    def extra_conditions(self) -> list[Condition]:
        """The perturbations and alignments to evaluate besides the clean images."""
        return [condition_from_name(name) for name in self.conditions]


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    table: pd.DataFrame = field(default_factory=pd.DataFrame)

    def summary(self) -> str:
        verdict = "PROMOTE" if self.passed else "REFUSE"
        return f"{verdict}: " + ("; ".join(self.reasons) if self.reasons else "all gate rules pass")


def _subsets(results: dict) -> list[str]:
    return sorted(k for k in results if k not in (MEAN_KEY, POOLED_KEY))


def comparison_table(challenger: dict, champion: Optional[dict]) -> pd.DataFrame:
    """Per condition, one row per subset and the mean: accuracy and AP of both models and their differences."""
    rows = []
    for condition, new_results in challenger.items():
        old_results = (champion or {}).get(condition) or {}
        for subset in _subsets(new_results) + [MEAN_KEY]:
            new, old = new_results[subset], old_results.get(subset)
            row = {"condition": condition, "subset": subset,
                   "challenger_acc": new["acc"], "challenger_ap": new["ap"],
                   "champion_acc": old["acc"] if old else math.nan, "champion_ap": old["ap"] if old else math.nan}
            row["delta_acc"] = row["challenger_acc"] - row["champion_acc"]
            row["delta_ap"] = row["challenger_ap"] - row["champion_ap"]
            rows.append(row)
    return pd.DataFrame(rows)


def decide(challenger: dict, champion: Optional[dict], gate: GateConfig) -> GateDecision:
    """Apply the gate to ``{condition: per-subset results}`` of both models (``champion`` None: there is none yet);
    every failed rule adds a reason naming the condition (unless clean), the subset and the numbers.

    Raises:
        ValueError: a gated condition is missing from a model's results (the evaluation did not run it).
    """
    for name in gate.rules():
        for role, results in (("challenger", challenger), ("champion", champion)):
            if results is not None and name not in results:
                raise ValueError(f"the {role}'s evaluation has no {name!r} condition, which the gate rules on")
    reasons: list[str] = []
    for name, rules in gate.rules().items():
        prefix = "" if name == CLEAN else f"[{name}] "
        if champion is None:
            found = _first_champion_problems(challenger[name], rules)
        else:
            found = _regressions(challenger[name], champion[name], rules)
        reasons.extend(prefix + reason for reason in found)
    table = comparison_table({name: challenger[name] for name in gate.rules()},
                             None if champion is None else {name: champion[name] for name in gate.rules()})
    return GateDecision(passed=not reasons, reasons=reasons, table=table)


def _first_champion_problems(new: dict, rules: ConditionRules) -> list[str]:
    mean_acc = new[MEAN_KEY]["acc"]
    if rules.min_mean_acc is not None and not mean_acc >= rules.min_mean_acc:
        return [f"no champion yet and mean accuracy {mean_acc:.4f} < minimum {rules.min_mean_acc}"]
    return []


def _regressions(new: dict, old: dict, rules: ConditionRules) -> list[str]:
    reasons = []
    missing = sorted(set(_subsets(old)) - set(_subsets(new)))
    if missing:
        reasons.append(f"holdout subsets {missing} were evaluated for the champion but not the challenger")
    new_mean, old_mean = new[MEAN_KEY], old[MEAN_KEY]
    if new_mean["acc"] < old_mean["acc"] - rules.mean_acc_tolerance:
        reasons.append(f"mean accuracy {new_mean['acc']:.4f} < champion {old_mean['acc']:.4f}"
                       f" (tolerance {rules.mean_acc_tolerance})")
    if _comparable(new_mean["ap"], old_mean["ap"]) and new_mean["ap"] < old_mean["ap"] - rules.mean_ap_tolerance:
        reasons.append(f"mean AP {new_mean['ap']:.4f} < champion {old_mean['ap']:.4f}"
                       f" (tolerance {rules.mean_ap_tolerance})")
    for subset in _subsets(new):
        if subset not in old:
            continue  # a subset new to this holdout cannot regress
        drop = old[subset]["acc"] - new[subset]["acc"]
        if drop > rules.max_subset_acc_drop + 1e-12:
            reasons.append(f"subset {subset!r} accuracy drops {drop * 100:.1f} points "
                           f"({old[subset]['acc']:.4f} -> {new[subset]['acc']:.4f};"
                           f" allowed {rules.max_subset_acc_drop * 100:.1f})")
    return reasons


def _comparable(a: float, b: float) -> bool:
    return not (math.isnan(a) or math.isnan(b))
