"""`mpft promote` and `mpft retrain` against the real MLflow server: the alias moves only when the gate passes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from jobs import cli, tracking
from jobs.gate import GateConfig
from jobs.promote import ChampionMoved, default_evaluator, promote, set_champion_if_unchanged
from jobs.promote_cmd import holdout_sources
from mpft_core.checkpoint import save_checkpoint
from mpft_core.config import BackboneConfig, DetectorConfig, MaskConfig, OptimConfig
from mpft_core.detector import build_detector
from mpft_core.optim import make_optimizer, train_step
from mpft_core.transforms import eval_view
from pipelines.leakage import HoldoutLeakError
from tests.helpers.images import fake_images, real_photo_crops, write_genimage_tree

pytestmark = pytest.mark.timeout(600)  # tests using ray_local are marked `ray` by conftest

MODEL = "promote-test"


def trained_detector(steps: int, seed: int = 0):
    """A tiny detector trained in-process (no Ray) on the same two classes the holdout holds."""
    torch.manual_seed(seed)
    detector = build_detector(DetectorConfig(backbone=BackboneConfig(name="mpft-tiny-32", pretrained=None),
                                             mask=MaskConfig(strategy="none"), dropout=0.0))
    optimizer = make_optimizer(detector, OptimConfig(backbone_lr=1e-3, head_lr=3e-3))
    real = np.stack(real_photo_crops(64, 32, seed=50))
    fake = np.stack(fake_images(64, 32, seed=51))
    images = torch.from_numpy(np.concatenate([real, fake]))
    labels = torch.cat([torch.zeros(64), torch.ones(64)])
    detector.train()
    for step in range(steps):
        idx = torch.randperm(128, generator=torch.Generator().manual_seed(step))[:32]
        train_step(detector, images[idx], labels[idx], optimizer)
    return detector.eval()


def median_fake_score(detector, holdout: str) -> float:
    crops = [eval_view(np.asarray(Image.open(p).convert("RGB")), 32)
             for p in sorted(Path(holdout).glob("*/val/ai/*.png"))]
    return float(np.median(detector.score_uint8(torch.from_numpy(np.stack(crops))).numpy()))


def register(detector, tmp_path: Path, tag: str, threshold: float, model: str = MODEL) -> str:
    detector.threshold = threshold
    checkpoint = save_checkpoint(detector, tmp_path / tag)
    with tracking.start_run("promote-test", run_name=f"register-{tag}"):
        uri = tracking.log_detector_model(str(checkpoint))
    version = tracking.register_model(uri, model)
    tracking.set_alias(model, "challenger", version)
    return version


def bare_version(model: str, train_config: dict | None = None) -> str:
    """A registry entry with no model files behind it (enough for alias bookkeeping); with ``train_config``, its
    training run logged that config, as `mpft train` does."""
    client = MlflowClient()
    if not client.search_registered_models(filter_string=f"name = '{model}'"):
        client.create_registered_model(model)
    with tracking.start_run("promote-test", run_name=f"train-{model}") as run:
        if train_config is not None:
            tracking.log_config(train_config)
    run_id = run.info.run_id
    return client.create_model_version(model, source=f"runs:/{run_id}/model", run_id=run_id,
                                       tags={"train_run_id": run_id}).version


def champion_of(model: str):
    return tracking.get_alias_version(model, "champion")


@pytest.fixture(scope="module")
def holdout(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("holdout")
    write_genimage_tree(root, subsets=("sdv14", "midjourney"), n_per_class=24, size=32, splits=("val",), seed=7)
    return str(root)


def promote_cli(mlflow_server, holdout: str, *extra: str) -> int:
    return cli.main(["promote", "--model", MODEL, "--holdout", holdout, "--split", "val",
                     "--tracking-uri", mlflow_server.tracking_uri, "--min-mean-acc", "0.0", *extra])


def test_gate_moves_champion_only_for_a_better_challenger(tmp_path, mlflow_server, ray_local, holdout, capsys):
    tracking.set_tracking(mlflow_server.tracking_uri)
    client = MlflowClient(mlflow_server.tracking_uri)
    trained = trained_detector(steps=60)

    # v1: trained weights but a badly placed threshold that passes half the fakes as real -> first champion.
    v1 = register(trained, tmp_path, "v1", threshold=median_fake_score(trained, holdout))
    assert promote_cli(mlflow_server, holdout) == 0
    assert client.get_model_version_by_alias(MODEL, "champion").version == v1
    assert client.get_model_version(MODEL, v1).tags["gate.decision"] == "promoted"

    # v2: an untrained model, worse on every subset -> refused, alias stays, reason printed, tags recorded.
    v2 = register(trained_detector(steps=0, seed=1), tmp_path, "v2", threshold=0.5)
    capsys.readouterr()
    assert promote_cli(mlflow_server, holdout, "--dry-run") == 1
    dry = capsys.readouterr()
    assert "dry run: nothing changed" in dry.out
    assert "gate.decision" not in client.get_model_version(MODEL, v2).tags  # --dry-run wrote nothing
    # ...and gated on the format-aligned holdout too: both models are scored on it, and it is in table and tags.
    assert promote_cli(mlflow_server, holdout, "--condition", "aligned-jpeg96:max_subset_acc_drop=0.5") == 1
    refused = capsys.readouterr()
    assert "promotion refused" in refused.err and "accuracy drops" in refused.err
    assert "| aligned-jpeg96 | sdv14 |" in refused.out
    assert client.get_model_version_by_alias(MODEL, "champion").version == v1
    tags = client.get_model_version(MODEL, v2).tags
    assert tags["gate.decision"] == "refused" and tags["gate.compared_to_version"] == v1
    assert float(tags["gate.champion_mean_acc"]) > float(tags["gate.challenger_mean_acc"])
    assert json.loads(tags["gate.config"])["conditions"]["aligned-jpeg96"]["max_subset_acc_drop"] == 0.5
    aligned = {role: float(tags[f"gate.aligned-jpeg96.{role}_mean_acc"]) for role in ("champion", "challenger")}
    assert all(0.0 <= acc <= 1.0 for acc in aligned.values())

    # v3: the same weights as v1 with a sensible threshold: higher accuracy, same AP -> promoted.
    v3 = register(trained, tmp_path, "v3", threshold=0.5)
    assert promote_cli(mlflow_server, holdout, "--dry-run") == 0
    assert client.get_model_version_by_alias(MODEL, "champion").version == v1
    assert promote_cli(mlflow_server, holdout) == 0
    assert client.get_model_version_by_alias(MODEL, "champion").version == v3
    v3_tags = client.get_model_version(MODEL, v3).tags
    assert float(v3_tags["gate.challenger_mean_acc"]) > float(v3_tags["gate.champion_mean_acc"])


def test_champion_moves_only_if_it_still_points_where_the_evaluation_started(mlflow_server):
    tracking.set_tracking(mlflow_server.tracking_uri)
    model = "promote-cas"
    evaluated_against, promoted_meanwhile, challenger = (bare_version(model) for _ in range(3))
    tracking.set_alias(model, "champion", promoted_meanwhile)  # another job promoted while we evaluated

    with pytest.raises(ChampionMoved) as refused:
        set_champion_if_unchanged(model, challenger, expected=evaluated_against)
    assert str(refused.value).startswith(f"'champion' of '{model}' moved from version {evaluated_against} to "
                                         f"version {promoted_meanwhile} while version {challenger} was being "
                                         "evaluated")
    assert "\n" not in str(refused.value)
    assert champion_of(model) == promoted_meanwhile  # untouched

    with pytest.raises(ChampionMoved, match="moved from no version to version"):  # a first champion appeared
        set_champion_if_unchanged(model, challenger, expected=None)
    set_champion_if_unchanged(model, challenger, expected=promoted_meanwhile)
    assert champion_of(model) == challenger


@pytest.mark.timeout(600)
def test_promotion_refuses_when_the_champion_moves_during_evaluation(tmp_path, mlflow_server, ray_local, holdout):
    tracking.set_tracking(mlflow_server.tracking_uri)
    model = "promote-race"
    weak = register(trained_detector(steps=0, seed=1), tmp_path, "weak", threshold=0.5, model=model)
    tracking.set_alias(model, "champion", weak)
    strong = register(trained_detector(steps=60), tmp_path, "strong", threshold=0.5, model=model)
    promoted_meanwhile = bare_version(model)

    def evaluate_while_another_job_promotes(refs, holdout_sources_, storage_cfg, conditions):
        results = default_evaluator(refs, holdout_sources_, storage_cfg, conditions)
        tracking.set_alias(model, "champion", promoted_meanwhile)
        return results

    with pytest.raises(ChampionMoved, match=f"moved from version {weak} to version {promoted_meanwhile}"):
        promote(model, holdout_sources([holdout], None, "val"), GateConfig(min_mean_acc=0.0),
                evaluator=evaluate_while_another_job_promotes)

    assert champion_of(model) == promoted_meanwhile
    tags = MlflowClient().get_model_version(model, strong).tags
    assert tags["gate.decision"] == "refused" and "moved from" in tags["gate.reasons"]


@pytest.mark.timeout(600)
def test_promote_gates_the_version_it_is_given_even_if_the_challenger_alias_moved(tmp_path, mlflow_server,
                                                                                  ray_local, holdout):
    tracking.set_tracking(mlflow_server.tracking_uri)
    model = "promote-named"
    trained = register(trained_detector(steps=60), tmp_path, "trained", threshold=0.5, model=model)
    tracking.set_alias(model, "challenger", bare_version(model))  # another job's version, not even loadable

    outcome = promote(model, holdout_sources([holdout], None, "val"), GateConfig(min_mean_acc=0.0),
                      challenger_version=trained)

    assert outcome.challenger_version == trained and outcome.promoted
    assert champion_of(model) == trained
    assert MlflowClient().get_model_version(model, trained).tags["gate.decision"] == "promoted"


def test_promote_refuses_a_holdout_that_leaks_into_the_challenger_s_training_data(tmp_path, mlflow_server):
    tracking.set_tracking(mlflow_server.tracking_uri)
    model = "promote-leak"
    write_genimage_tree(tmp_path / "data", subsets=("sdv14",), n_per_class=4, size=32, seed=3)
    train_source = {"uri": str(tmp_path / "data"), "layout": "genimage", "split": "train"}
    champion = bare_version(model)
    tracking.set_alias(model, "champion", champion)
    challenger = bare_version(model, train_config={"name": "leaky", "train": [train_source]})
    tracking.set_alias(model, "challenger", challenger)
    holdout_with_training_images = holdout_sources([str(tmp_path / "data")], "genimage", None)  # train + val

    with pytest.raises(HoldoutLeakError, match="8 of 16 holdout images are in the training data: 8 by path"):
        promote(model, holdout_with_training_images, GateConfig())  # refused before any evaluation: no Ray

    assert champion_of(model) == champion
    assert "gate.decision" not in MlflowClient().get_model_version(model, challenger).tags


def test_mpft_promote_refuses_a_leaky_holdout_before_ray_starts(tmp_path, mlflow_server, monkeypatch, capsys):
    import ray

    from pipelines import runtime

    def refuse(*args, **kwargs):
        raise AssertionError("the leakage check must refuse before Ray starts")

    monkeypatch.setattr(runtime, "init_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)
    tracking.set_tracking(mlflow_server.tracking_uri)
    model = "promote-leak-cli"
    write_genimage_tree(tmp_path / "data", subsets=("sdv14",), n_per_class=4, size=32, seed=3)
    champion = bare_version(model)
    tracking.set_alias(model, "champion", champion)
    train_source = {"uri": str(tmp_path / "data"), "layout": "genimage", "split": "train"}
    challenger = bare_version(model, train_config={"name": "leaky", "train": [train_source]})
    tracking.set_alias(model, "challenger", challenger)

    with pytest.raises(SystemExit) as exit_info:  # the holdout is train + val: half of it was trained on
        cli.main(["promote", "--model", model, "--holdout", str(tmp_path / "data"),
                  "--tracking-uri", mlflow_server.tracking_uri])

    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("mpft promote: refused: 8 of 16 holdout images are in the training data"), line
    assert champion_of(model) == champion
    assert "gate.decision" not in MlflowClient().get_model_version(model, challenger).tags


@pytest.mark.slow
def test_retrain_runs_train_evaluate_promote_under_one_parent_run(tmp_path, s3_server, mlflow_server, ray_local):
    root = tmp_path / "corpus"
    write_genimage_tree(root / "base", subsets=("sdv14",), n_per_class=32, size=32, seed=11)
    write_genimage_tree(root / "new", subsets=("newgen",), n_per_class=32, size=32, seed=12)
    write_genimage_tree(root / "holdout", subsets=("sdv14", "newgen"), n_per_class=16, size=32, splits=("val",),
                        seed=13)
    s3_server.create_bucket("retrain")
    s3_server.upload_dir(root, "s3://retrain/data")
    config = {
        "train": {
            "name": "retrain-tiny",
            "method": {"detector": {"backbone": {"name": "mpft-tiny-32", "pretrained": None},
                                    "mask": {"ratio": 0.25}, "dropout": 0.0},
                       "optim": {"epochs": 1, "batch_size": 16, "backbone_lr": 1e-3, "head_lr": 3e-3}},
            "train": [{"uri": "s3://retrain/data/base", "layout": "genimage", "split": "train"}],
            "val": [{"uri": "s3://retrain/data/base", "layout": "genimage", "split": "val"}],
            "storage": s3_server.storage_config().to_dict(reveal_secrets=True),
            "checkpoint_root": str(tmp_path / "runs"),
            "tracking": {"uri": mlflow_server.tracking_uri, "experiment": "retrain-test",
                         "registered_model": "retrain-test"},
        },
        "new_data": [{"uri": "s3://retrain/data/new", "layout": "genimage", "split": "train"}],
        "holdout": [{"uri": "s3://retrain/data/holdout", "layout": "genimage", "split": "val"}],
        "gate": {"min_mean_acc": 0.0, "conditions": {"aligned-jpeg96": {}}},
    }
    path = tmp_path / "retrain.yaml"
    path.write_text(yaml.safe_dump(config))

    assert cli.main(["retrain", "--config", str(path)]) == 0

    client = MlflowClient(mlflow_server.tracking_uri)
    experiment = client.get_experiment_by_name("retrain-test")
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if r.info.run_name.startswith("retrain-retrain-tiny-")]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    names = sorted(r.info.run_name for r in children)
    assert len(children) == 3 and names[0] == "evaluate" and names[1] == "promote", names
    assert names[2].startswith("retrain-tiny-")  # the training run
    train_run = next(r for r in children if r.info.run_name == names[2])
    assert int(train_run.data.params["data.train_rows"]) == 128  # base + new generator merged
    assert client.get_model_version_by_alias("retrain-test", "champion").version == "1"
    assert parent.data.tags["retrain.decision"] == "promoted"
    evaluate_run = next(r for r in children if r.info.run_name == "evaluate")
    assert {"holdout_sdv14_acc", "holdout_aligned-jpeg96_sdv14_acc",
            "holdout_aligned-jpeg96_newgen_acc"} <= set(evaluate_run.data.metrics)
    assert "gate.aligned-jpeg96.challenger_mean_acc" in client.get_model_version("retrain-test", "1").tags
