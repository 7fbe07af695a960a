"""Promotion gate rules on plain per-condition, per-subset results."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jobs.gate import GateConfig, decide
from mpft_core.metrics import per_subset_metrics


def results(acc_by_subset: dict[str, float], ap: float = 0.9) -> dict:
    rows = {s: {"acc": a, "ap": ap, "acc_real": a, "acc_fake": a, "auc": ap, "n": 10, "n_real": 5, "n_fake": 5}
            for s, a in acc_by_subset.items()}
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in ("acc", "ap", "acc_real", "acc_fake", "auc")}
    return {**rows, "mean": mean, "all": mean}


def clean(acc_by_subset: dict[str, float], ap: float = 0.9) -> dict:
    return {"clean": results(acc_by_subset, ap)}


def test_a_better_challenger_passes():
    decision = decide(clean({"a": 0.9, "b": 0.8}), clean({"a": 0.85, "b": 0.8}), GateConfig())
    assert decision.passed, decision.reasons
    assert list(decision.table["subset"]) == ["a", "b", "mean"]
    assert decision.table.set_index("subset").loc["a", "delta_acc"] == pytest.approx(0.05)


def test_a_subset_regression_beyond_the_allowed_drop_is_refused_with_the_subset_named():
    champion = clean({"a": 0.80, "b": 0.90})
    challenger = clean({"a": 0.99, "b": 0.85})  # better on average, 5 points worse on b
    decision = decide(challenger, champion, GateConfig(max_subset_acc_drop=0.02))
    assert not decision.passed
    assert len(decision.reasons) == 1
    assert "'b'" in decision.reasons[0] and "5.0 points" in decision.reasons[0]
    assert decide(challenger, champion, GateConfig(max_subset_acc_drop=0.06)).passed


def test_lower_mean_accuracy_or_ap_is_refused():
    champion = clean({"a": 0.9}, ap=0.95)
    assert "mean accuracy" in decide(clean({"a": 0.89}, ap=0.95), champion,
                                     GateConfig(max_subset_acc_drop=0.5)).summary()
    assert "mean AP" in decide(clean({"a": 0.9}, ap=0.90), champion, GateConfig()).summary()
    assert decide(clean({"a": 0.9}, ap=0.90), champion, GateConfig(mean_ap_tolerance=0.06)).passed


def test_first_challenger_needs_only_the_minimum_accuracy():
    assert decide(clean({"a": 0.7}), None, GateConfig(min_mean_acc=0.6)).passed
    refused = decide(clean({"a": 0.55}), None, GateConfig(min_mean_acc=0.6))
    assert not refused.passed and "no champion" in refused.reasons[0]
    assert math.isnan(refused.table.set_index("subset").loc["a", "champion_acc"])


def test_gate_works_on_real_metric_output():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    subsets = np.where(np.arange(200) < 100, "sd14", "midjourney")
    good = {"clean": per_subset_metrics(labels, np.clip(labels * 0.6 + rng.uniform(0, 0.4, 200), 0, 1), subsets)}
    noisy = {"clean": per_subset_metrics(labels, rng.uniform(0, 1, 200), subsets)}
    assert decide(good, noisy, GateConfig()).passed
    assert not decide(noisy, good, GateConfig()).passed


def test_a_challenger_better_on_clean_files_but_worse_once_aligned_is_refused_for_the_aligned_condition():
    # The shortcut the format-aligned protocol exposes: gains on as-is files, losses once both classes are re-encoded.
    champion = {"clean": results({"a": 0.80, "b": 0.80}), "aligned-jpeg96": results({"a": 0.78, "b": 0.78})}
    challenger = {"clean": results({"a": 0.95, "b": 0.95}), "aligned-jpeg96": results({"a": 0.60, "b": 0.75})}

    assert decide(challenger, champion, GateConfig()).passed  # clean rules only: the shortcut passes
    decision = decide(challenger, champion, GateConfig(conditions={"aligned-jpeg96": {}}))

    assert not decision.passed
    assert all(reason.startswith("[aligned-jpeg96] ") for reason in decision.reasons)
    assert any("'a'" in reason and "18.0 points" in reason for reason in decision.reasons)
    assert any("mean accuracy" in reason for reason in decision.reasons)
    assert set(decision.table["condition"]) == {"clean", "aligned-jpeg96"}
    aligned = decision.table[decision.table.condition == "aligned-jpeg96"].set_index("subset")
    assert aligned.loc["a", "delta_acc"] == pytest.approx(-0.18)


def test_each_condition_has_its_own_rules():
    champion = {"clean": results({"a": 0.8}), "jpeg65": results({"a": 0.70})}
    challenger = {"clean": results({"a": 0.8}), "jpeg65": results({"a": 0.66})}
    strict = GateConfig(conditions={"jpeg65": {"max_subset_acc_drop": 0.02, "mean_acc_tolerance": 0.0}})
    lenient = GateConfig(conditions={"jpeg65": {"max_subset_acc_drop": 0.05, "mean_acc_tolerance": 0.05}})
    assert not decide(challenger, champion, strict).passed
    assert decide(challenger, champion, lenient).passed


def test_a_first_champion_needs_a_condition_s_floor_only_where_one_is_set():
    challenger = {"clean": results({"a": 0.9}), "aligned-jpeg96": results({"a": 0.52})}
    assert decide(challenger, None, GateConfig(conditions={"aligned-jpeg96": {}})).passed
    refused = decide(challenger, None, GateConfig(conditions={"aligned-jpeg96": {"min_mean_acc": 0.7}}))
    assert refused.reasons == ["[aligned-jpeg96] no champion yet and mean accuracy 0.5200 < minimum 0.7"]


def test_a_gated_condition_missing_from_an_evaluation_is_an_error_not_a_pass():
    with pytest.raises(ValueError, match="champion's evaluation has no 'aligned-jpeg96' condition"):
        decide({"clean": results({"a": 0.9}), "aligned-jpeg96": results({"a": 0.9})}, clean({"a": 0.8}),
               GateConfig(conditions={"aligned-jpeg96": {}}))


@pytest.mark.parametrize("name, message", [("aligned-jpg96", "unknown evaluation condition"),
                                           ("jpeg065", "is spelt 'jpeg65'"), ("clean", "always gated")])
def test_gate_conditions_are_checked_when_the_config_is_read(name, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        GateConfig.from_dict({"conditions": {name: {}}})


def test_a_condition_s_unset_rules_are_the_clean_ones_and_its_own_override_them():
    gate = GateConfig.from_dict({"max_subset_acc_drop": 0.1, "mean_acc_tolerance": 0.03, "min_mean_acc": 0.7,
                                 "conditions": {"aligned-jpeg96": {}, "jpeg65": {"max_subset_acc_drop": 0.05}}})
    aligned, jpeg65 = gate.conditions["aligned-jpeg96"], gate.conditions["jpeg65"]
    assert (aligned.max_subset_acc_drop, aligned.mean_acc_tolerance) == (0.1, 0.03)
    assert (jpeg65.max_subset_acc_drop, jpeg65.mean_acc_tolerance) == (0.05, 0.03)
    assert aligned.min_mean_acc is None  # a first champion's floor applies only where it is written
    assert GateConfig.from_dict(gate.to_dict()) == gate


def test_changing_a_rule_later_keeps_every_condition_a_rules_object():
    gate = GateConfig(max_subset_acc_drop=0.1, conditions={"jpeg65": {}})
    gate.min_mean_acc = 0.3  # assignments are validated again
    assert gate.conditions["jpeg65"].max_subset_acc_drop == 0.1
    challenger = {"clean": results({"a": 0.9}), "jpeg65": results({"a": 0.9})}
    assert decide(challenger, None, gate).passed
