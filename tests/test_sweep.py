"""`mpft sweep`: trials as Ray Train runs under Ray Tune, one MLflow parent run, the comparison, the best registered."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from jobs import cli
from jobs.config import TrainJobConfig
from jobs.sweep import SweepConfig, TrialOutcome, best_trial, generator_figures, summary_table, to_markdown
from jobs.sweep_cmd import parse_axis, parse_variant
from mpft_core.config import InputError


def base_job(root, **extra) -> TrainJobConfig:
    return TrainJobConfig.from_dict({
        "name": "base", "train": {"uri": str(root)}, "val": {"uri": str(root)},
        "method": {"detector": {"backbone": {"name": "mpft-tiny-32", "pretrained": None}}}, **extra,
    })


def test_the_grid_is_the_cross_product_of_variants_and_axes_in_a_stable_order(tmp_path):
    sweep = SweepConfig(name="s", job=base_job(tmp_path),
                        grid={"method.optim.seed": [0, 1], "method.detector.backbone.pretrained": [None, "w.st"]},
                        variants={"mpft": {"method.detector.mask.strategy": "tam"},
                                  "probe": {"method.detector.trainable": "probe",
                                            "method.detector.mask.strategy": "none"}})
    trials = sweep.trials()
    assert len(trials) == 8 and [t.name for t in trials[:2]] == ["s-t00", "s-t01"]
    assert [t.variant for t in trials] == ["mpft"] * 4 + ["probe"] * 4
    assert trials[5].settings == {"method.optim.seed": 0, "method.detector.backbone.pretrained": "w.st"}
    assert trials[5].overrides == {"method.detector.trainable": "probe", "method.detector.mask.strategy": "none",
                                   "method.optim.seed": 0, "method.detector.backbone.pretrained": "w.st"}


def test_command_line_axes_and_variants_read_their_values_as_yaml():
    assert parse_axis("method.detector.mask.ratio=0.25,0.5") == ("method.detector.mask.ratio", [0.25, 0.5])
    assert parse_axis("method.detector.backbone.pretrained=null,/w/standin.safetensors") == (
        "method.detector.backbone.pretrained", [None, "/w/standin.safetensors"])
    assert parse_variant("probe:method.detector.trainable=probe,method.detector.mask.strategy=none") == (
        "probe", {"method.detector.trainable": "probe", "method.detector.mask.strategy": "none"})
    with pytest.raises(Exception, match="NAME:KEY=VALUE"):
        parse_variant("method.detector.trainable=probe")


def test_a_trial_that_cannot_be_configured_fails_the_sweep_before_anything_runs(tmp_path):
    from jobs.sweep import check_trials

    typo = SweepConfig(name="s", job=base_job(tmp_path), grid={"method.detector.mask.stratgy": ["tam", "none"]})
    with pytest.raises(InputError, match="stratgy"):
        check_trials(typo)
    single = SweepConfig(name="s", job=base_job(tmp_path), grid={"method.detector.mask.strategy": ["tam"]})
    with pytest.raises(InputError, match="at least two trials"):
        check_trials(single)


def test_seen_and_unseen_figures_average_the_right_generators():
    results = {"clean": {"ae_up": {"acc": 0.9, "auc": 0.95}, "ae_nn": {"acc": 0.6, "auc": 0.7},
                         "ae_shuffle": {"acc": 0.5, "auc": math.nan}, "mean": {"acc": 0.0, "auc": 0.0}},
               "aligned-jpeg96": {"ae_up": {"acc": 0.8, "auc": 0.9}, "ae_nn": {"acc": 0.4, "auc": 0.5}}}
    summary = generator_figures(results, seen=["ae_up"])
    assert summary["seen_acc"] == 0.9 and summary["seen_auc"] == 0.95
    assert summary["unseen_acc"] == pytest.approx(0.55)
    assert summary["unseen_auc"] == pytest.approx(0.7)  # an undefined AUC is left out, not counted as 0
    assert summary["unseen_acc_aligned-jpeg96"] == pytest.approx(0.4)


def test_the_summary_groups_seeds_and_the_best_trial_is_chosen_on_validation_only(tmp_path):
    sweep = SweepConfig(name="s", job=base_job(tmp_path),
                        grid={"method.detector.mask.strategy": ["tam", "none"], "method.optim.seed": [0, 1]})
    trials = sweep.trials()
    val = [0.70, 0.80, 0.75, 0.60]
    unseen = [0.55, 0.65, 0.90, 0.95]  # the best on test is not the best on validation
    outcomes = [TrialOutcome(t, run_id=f"r{t.index}", metrics={"val_mean_acc": v, "unseen_acc": u})
                for t, v, u in zip(trials, val, unseen, strict=True)]
    outcomes[3] = TrialOutcome(trials[3], error="worker died")
    from jobs.sweep import trials_table

    table = trials_table(outcomes, sweep)
    summary = summary_table(table, sweep)
    assert list(summary["method.detector.mask.strategy"]) == ["tam", "none"]
    assert list(summary["n"]) == [2, 1]
    assert summary.loc[0, "unseen_acc mean"] == pytest.approx(0.60)
    assert summary.loc[0, "unseen_acc std"] == pytest.approx(pd.Series([0.55, 0.65]).std())
    assert math.isnan(summary.loc[1, "unseen_acc std"])  # one finished seed: no spread to show
    assert "0.600 ± 0.071" in to_markdown(summary)
    best = best_trial(outcomes, "val_mean_acc", "max")
    assert best.trial.index == 1
    assert best_trial(outcomes, "val_mean_acc", "min").trial.index == 0
    assert table.loc[3, "status"] == "failed: worker died"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mpft_sweep_runs_its_trials_under_one_parent_run_and_registers_the_best(tmp_path, mlflow_server, ray_local,
                                                                                capsys):
    # Two trials (each a Ray Train run, ~50 s here): the grid's cross product and the seed grouping with its spread
    # are the unit tests' above.
    from jobs import sample_corpus as sc

    corpus = tmp_path / "corpus"
    sc.write_genimage_corpus(corpus, n_train_per_class=24, n_val_per_class=16, n_test_per_class=16, image_size=32,
                             seed=5, train_generators=["ae_up"], test_generators=["ae_up", "ae_nn"],
                             generator_steps=40)
    carve = {"fraction": 0.25}
    job = {
        "name": "sweep-tiny",
        "method": {"detector": {"backbone": {"name": "mpft-tiny-32", "pretrained": None}, "dropout": 0.0},
                   "optim": {"epochs": 1, "batch_size": 8, "backbone_lr": 1e-3, "head_lr": 3e-3}},
        "train": {"uri": str(corpus), "split": "train", "subsets": ["ae_up"], "carve": {**carve, "keep": "rest"}},
        "val": {"uri": str(corpus), "split": "train", "subsets": ["ae_up"], "carve": {**carve, "keep": "carved"}},
        "checkpoint_root": str(tmp_path / "runs"),
        "scaling": {"num_workers": 1},
        "tracking": {"uri": mlflow_server.tracking_uri, "experiment": "sweep-test", "registered_model": "sweep-test"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))

    status = cli.main(["sweep", "--config", str(path), "--name", "grid",
                       "--grid", "method.detector.mask.strategy=tam,none",
                       "--test", str(corpus), "--align", "jpeg=96", "--register-best", "--max-concurrent", "1"])

    printed = capsys.readouterr().out
    assert status == 0, printed
    client = MlflowClient(mlflow_server.tracking_uri)
    experiment = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if r.info.run_name == "sweep-grid"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == ["grid-t00", "grid-t01"]
    assert children["grid-t01"].data.params["method.detector.mask.strategy"] == "none"
    for child in children.values():
        assert {"val_mean_acc", "test_seen_acc", "test_unseen_acc", "test_unseen_acc_aligned-jpeg96"} <= set(
            child.data.metrics), child.info.run_name
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_comparison.png", "sweep_summary.md"} <= artifacts, artifacts
    summary_md = client.download_artifacts(parent.info.run_id, "sweep_summary.md")
    with open(summary_md) as fh:
        text = fh.read()
    assert "| tam | 1 |" in text and "| none | 1 |" in text, text

    best = parent.data.tags["sweep.best_trial"]
    assert children[best].info.status == "FINISHED"  # logging its model afterwards does not change how it went
    best_val = children[best].data.metrics["val_mean_acc"]
    assert best_val == max(c.data.metrics["val_mean_acc"] for c in children.values())
    version = client.get_model_version_by_alias("sweep-test", "challenger")
    assert version.tags["sweep"] == "grid" and version.run_id == children[best].info.run_id
    assert "| method.detector.mask.strategy | n |" in printed


def test_a_sweep_refuses_settings_that_would_mislead_its_table(tmp_path):
    from pydantic import ValidationError

    from jobs.common import UsageError
    from jobs.sweep_cmd import unique

    job = base_job(tmp_path)
    with pytest.raises(ValidationError, match="validation metric"):  # choosing on test figures
        SweepConfig(name="s", job=job, grid={"method.optim.seed": [0, 1]}, select="unseen_acc")
    with pytest.raises(ValidationError, match="both set method.detector.mask.strategy"):
        SweepConfig(name="s", job=job, grid={"method.detector.mask.strategy": ["tam", "none"]},
                    variants={"probe": {"method.detector.mask.strategy": "none"}})
    with pytest.raises(UsageError, match="given twice"):
        unique("grid axis", [parse_axis("method.optim.seed=0,1"), parse_axis("method.optim.seed=2")])


def test_an_override_fills_a_section_left_null_and_refuses_to_reach_into_a_list():
    from jobs.config import with_overrides

    assert with_overrides({"method": None}, [("method.optim.seed", 1)]) == {"method": {"optim": {"seed": 1}}}
    with pytest.raises(InputError, match="train is a value, not a section"):
        with_overrides({"train": [{"uri": "x"}]}, [("train.carve.fraction", 0.2)])


def test_a_seed_only_sweep_is_one_group_and_ties_go_to_the_lower_validation_loss(tmp_path):
    sweep = SweepConfig(name="s", job=base_job(tmp_path), grid={"method.optim.seed": [0, 1, 2]})
    trials = sweep.trials()
    outcomes = [TrialOutcome(t, run_id=f"r{t.index}", metrics={"val_mean_acc": 0.75, "val_loss": loss})
                for t, loss in zip(trials, [0.6, 0.4, 0.5], strict=True)]
    from jobs.sweep import trials_table

    summary = summary_table(trials_table(outcomes, sweep), sweep)
    assert len(summary) == 1 and summary.loc[0, "n"] == 3 and summary.loc[0, "val_mean_acc std"] == 0.0
    assert best_trial(outcomes, "val_mean_acc", "max").trial.index == 1


def test_a_variant_and_an_axis_may_not_share_a_section(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="method.detector.mask.ratio / method.detector.mask"):
        SweepConfig(name="s", job=base_job(tmp_path), grid={"method.detector.mask": [{"ratio": 0.5}, {"ratio": 0.25}]},
                    variants={"v": {"method.detector.mask.ratio": 0.1}})
