"""The promotion gate: is the challenger better than the champion without getting worse anywhere?

Pure logic on two per-subset results (``mpft_core.metrics.per_subset_metrics`` output, computed on the same frozen
holdout); no MLflow, no Ray, so every rule is unit-tested on plain dicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd
from pydantic import Field

from mpft_core.config import StrictModel
from mpft_core.metrics import MEAN_KEY, POOLED_KEY


class GateConfig(StrictModel):
    """Rules a challenger must pass. Differences are challenger minus champion, as fractions (0.01 = 1 point)."""

    # Mean accuracy over subsets may not drop by more than this (0 = must not be lower).
    mean_acc_tolerance: float = Field(0.0, ge=0.0)
    # No single subset's accuracy may drop by more than this.
    max_subset_acc_drop: float = Field(0.02, ge=0.0)
    # Mean average precision may not drop by more than this.
    mean_ap_tolerance: float = Field(0.0, ge=0.0)
    # With no champion, the challenger must still reach this mean accuracy to become the first champion.
    min_mean_acc: float = Field(0.5, ge=0.0, le=1.0)


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
    """One row per subset and the mean: accuracy and AP of both models and their differences."""
    rows = []
    for subset in _subsets(challenger) + [MEAN_KEY]:
        new = challenger[subset]
        old = (champion or {}).get(subset)
        row = {"subset": subset, "challenger_acc": new["acc"], "challenger_ap": new["ap"]}
        row["champion_acc"] = old["acc"] if old else math.nan
        row["champion_ap"] = old["ap"] if old else math.nan
        row["delta_acc"] = row["challenger_acc"] - row["champion_acc"]
        row["delta_ap"] = row["challenger_ap"] - row["champion_ap"]
        rows.append(row)
    return pd.DataFrame(rows)


def decide(challenger: dict, champion: Optional[dict], gate: GateConfig) -> GateDecision:
    """Apply the gate; every failed rule adds a reason naming the subset and the numbers."""
    table = comparison_table(challenger, champion)
    reasons: list[str] = []
    new_mean = challenger[MEAN_KEY]
    if champion is None:
        if not new_mean["acc"] >= gate.min_mean_acc:
            reasons.append(f"no champion yet and mean accuracy {new_mean['acc']:.4f} < minimum {gate.min_mean_acc}")
        return GateDecision(passed=not reasons, reasons=reasons, table=table)

    missing = sorted(set(_subsets(champion)) - set(_subsets(challenger)))
    if missing:
        reasons.append(f"holdout subsets {missing} were evaluated for the champion but not the challenger")
    old_mean = champion[MEAN_KEY]
    if new_mean["acc"] < old_mean["acc"] - gate.mean_acc_tolerance:
        reasons.append(f"mean accuracy {new_mean['acc']:.4f} < champion {old_mean['acc']:.4f}"
                       f" (tolerance {gate.mean_acc_tolerance})")
    if _comparable(new_mean["ap"], old_mean["ap"]) and new_mean["ap"] < old_mean["ap"] - gate.mean_ap_tolerance:
        reasons.append(f"mean AP {new_mean['ap']:.4f} < champion {old_mean['ap']:.4f}"
                       f" (tolerance {gate.mean_ap_tolerance})")
    for subset in _subsets(challenger):
        if subset not in champion:
            continue  # a subset new to this holdout cannot regress
        drop = champion[subset]["acc"] - challenger[subset]["acc"]
        if drop > gate.max_subset_acc_drop + 1e-12:
            reasons.append(f"subset {subset!r} accuracy drops {drop * 100:.1f} points "
                           f"({champion[subset]['acc']:.4f} -> {challenger[subset]['acc']:.4f};"
                           f" allowed {gate.max_subset_acc_drop * 100:.1f})")
    return GateDecision(passed=not reasons, reasons=reasons, table=table)


def _comparable(a: float, b: float) -> bool:
    return not (math.isnan(a) or math.isnan(b))
