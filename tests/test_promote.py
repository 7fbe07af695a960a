"""`mpft promote` and `mpft retrain` against the real MLflow server: the alias moves only when the gate passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from jobs import cli, tracking
from mpft_core.checkpoint import save_checkpoint
from mpft_core.config import BackboneConfig, DetectorConfig, MaskConfig, OptimConfig
from mpft_core.detector import build_detector
from mpft_core.optim import make_optimizer, train_step
from mpft_core.transforms import eval_view
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


def register(detector, tmp_path: Path, tag: str, threshold: float) -> str:
    detector.threshold = threshold
    checkpoint = save_checkpoint(detector, tmp_path / tag)
    with tracking.start_run("promote-test", run_name=f"register-{tag}"):
        uri = tracking.log_detector_model(str(checkpoint))
    version = tracking.register_model(uri, MODEL)
    tracking.set_alias(MODEL, "challenger", version)
    return version


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
    assert promote_cli(mlflow_server, holdout) == 1
    refused = capsys.readouterr()
    assert "promotion refused" in refused.err and "accuracy drops" in refused.err
    assert client.get_model_version_by_alias(MODEL, "champion").version == v1
    tags = client.get_model_version(MODEL, v2).tags
    assert tags["gate.decision"] == "refused" and tags["gate.compared_to_version"] == v1
    assert float(tags["gate.champion_mean_acc"]) > float(tags["gate.challenger_mean_acc"])

    # v3: the same weights as v1 with a sensible threshold: higher accuracy, same AP -> promoted.
    v3 = register(trained, tmp_path, "v3", threshold=0.5)
    assert promote_cli(mlflow_server, holdout, "--dry-run") == 0
    assert client.get_model_version_by_alias(MODEL, "champion").version == v1
    assert promote_cli(mlflow_server, holdout) == 0
    assert client.get_model_version_by_alias(MODEL, "champion").version == v3
    v3_tags = client.get_model_version(MODEL, v3).tags
    assert float(v3_tags["gate.challenger_mean_acc"]) > float(v3_tags["gate.champion_mean_acc"])


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
        "gate": {"min_mean_acc": 0.0},
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
