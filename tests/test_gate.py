"""Promotion gate rules on plain per-subset results."""

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


def test_a_better_challenger_passes():
    decision = decide(results({"a": 0.9, "b": 0.8}), results({"a": 0.85, "b": 0.8}), GateConfig())
    assert decision.passed, decision.reasons
    assert list(decision.table["subset"]) == ["a", "b", "mean"]
    assert decision.table.set_index("subset").loc["a", "delta_acc"] == pytest.approx(0.05)


def test_a_subset_regression_beyond_the_allowed_drop_is_refused_with_the_subset_named():
    champion = results({"a": 0.80, "b": 0.90})
    challenger = results({"a": 0.99, "b": 0.85})  # better on average, 5 points worse on b
    decision = decide(challenger, champion, GateConfig(max_subset_acc_drop=0.02))
    assert not decision.passed
    assert len(decision.reasons) == 1
    assert "'b'" in decision.reasons[0] and "5.0 points" in decision.reasons[0]
    assert decide(challenger, champion, GateConfig(max_subset_acc_drop=0.06)).passed


def test_lower_mean_accuracy_or_ap_is_refused():
    champion = results({"a": 0.9}, ap=0.95)
    assert "mean accuracy" in decide(results({"a": 0.89}, ap=0.95), champion,
                                     GateConfig(max_subset_acc_drop=0.5)).summary()
    assert "mean AP" in decide(results({"a": 0.9}, ap=0.90), champion, GateConfig()).summary()
    assert decide(results({"a": 0.9}, ap=0.90), champion, GateConfig(mean_ap_tolerance=0.06)).passed


def test_first_challenger_needs_only_the_minimum_accuracy():
    assert decide(results({"a": 0.7}), None, GateConfig(min_mean_acc=0.6)).passed
    refused = decide(results({"a": 0.55}), None, GateConfig(min_mean_acc=0.6))
    assert not refused.passed and "no champion" in refused.reasons[0]
    assert math.isnan(refused.table.set_index("subset").loc["a", "champion_acc"])


def test_gate_works_on_real_metric_output():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    subsets = np.where(np.arange(200) < 100, "sd14", "midjourney")
    good = per_subset_metrics(labels, np.clip(labels * 0.6 + rng.uniform(0, 0.4, 200), 0, 1), subsets)
    noisy = per_subset_metrics(labels, rng.uniform(0, 1, 200), subsets)
    assert decide(good, noisy, GateConfig()).passed
    assert not decide(noisy, good, GateConfig()).passed
