"""Holdout leakage: holdout images in the training data are found by path and by identical bytes, locally and on S3,
and `mpft retrain` refuses such a job before it starts anything."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from jobs import cli
from pipelines import storage
from pipelines.leakage import HoldoutLeakError, check_holdout_leakage
from pipelines.sources import SourceConfig
from tests.helpers.images import write_genimage_tree


def leaky_corpus(root: Path) -> dict[str, str]:
    """A training split, a holdout split with one training image copied under another name, and a holdout manifest
    that lists a training image by its own path. Returns the paths involved, relative to ``root``."""
    write_genimage_tree(root / "train", subsets=("sdv14",), n_per_class=4, size=32, splits=("train",), seed=1)
    write_genimage_tree(root / "holdout", subsets=("sdv14",), n_per_class=4, size=32, splits=("val",), seed=2)
    leaks = {"copied_from": "train/sdv14/train/ai/0001.png", "copy": "holdout/sdv14/val/ai/0003.png",
             "shared": "train/sdv14/train/nature/0002.png"}
    shutil.copyfile(root / leaks["copied_from"], root / leaks["copy"])
    # At the corpus root: a manifest lists images below its own folder.
    (root / "holdout-extra.csv").write_text(f"path,label,subset\n{root / leaks['shared']},0,sdv14\n")
    return leaks


def training_sources(root: str) -> list[SourceConfig]:
    return [SourceConfig(uri=f"{root}/train", layout="genimage", split="train")]


def holdout_sources(root: str, with_manifest: bool = True) -> list[SourceConfig]:
    genimage = SourceConfig(uri=f"{root}/holdout", layout="genimage", split="val")
    manifest = SourceConfig(uri=f"{root}/holdout-extra.csv", layout="manifest")
    return [genimage, manifest] if with_manifest else [genimage]


def test_a_holdout_image_at_a_training_path_or_with_a_training_image_s_bytes_is_found(tmp_path, caplog):
    leaks = leaky_corpus(tmp_path)

    with caplog.at_level(logging.WARNING, logger="pipelines.leakage"):
        found = check_holdout_leakage(training_sources(str(tmp_path)), holdout_sources(str(tmp_path)), policy="warn")

    assert found.shared_paths == [str(tmp_path / leaks["shared"])]
    assert found.same_bytes == {str(tmp_path / leaks["copy"]): str(tmp_path / leaks["copied_from"])}
    assert found.holdout_images == 9  # 8 in the holdout split + the manifest's row
    assert "HOLDOUT LEAKAGE" in caplog.text and "2 of 9 holdout images" in caplog.text


def test_leakage_error_refuses_in_one_line_naming_both_kinds(tmp_path):
    leaks = leaky_corpus(tmp_path)

    with pytest.raises(HoldoutLeakError) as refused:
        check_holdout_leakage(training_sources(str(tmp_path)), holdout_sources(str(tmp_path)))

    message = str(refused.value)
    assert "\n" not in message
    assert "1 by path" in message and str(tmp_path / leaks["shared"]) in message
    assert "1 by identical bytes" in message and str(tmp_path / leaks["copy"]) in message
    assert "leakage: warn" in message  # says how to go on anyway


def test_a_holdout_disjoint_from_the_training_data_passes(tmp_path):
    write_genimage_tree(tmp_path / "train", subsets=("sdv14",), n_per_class=4, size=32, splits=("train",), seed=1)
    write_genimage_tree(tmp_path / "holdout", subsets=("sdv14",), n_per_class=4, size=32, splits=("val",), seed=2)

    found = check_holdout_leakage(training_sources(str(tmp_path)), holdout_sources(str(tmp_path), False))

    assert not found and found.holdout_images == 8


def test_leakage_is_found_on_s3_too(tmp_path, s3_server):
    leaks = leaky_corpus(tmp_path)
    s3_server.create_bucket("leakage")
    s3_server.upload_dir(tmp_path / "train", "s3://leakage/data/train")
    s3_server.upload_dir(tmp_path / "holdout", "s3://leakage/data/holdout")
    # The manifest on S3 names the S3 copy of the shared training image.
    storage.write_bytes("s3://leakage/data/holdout-extra.csv",
                        f"path,label,subset\ns3://leakage/data/{leaks['shared']},0,sdv14\n".encode(),
                        s3_server.storage_config())

    found = check_holdout_leakage(training_sources("s3://leakage/data"), holdout_sources("s3://leakage/data"),
                                  s3_server.storage_config(), policy="warn")

    assert found.shared_paths == [f"s3://leakage/data/{leaks['shared']}"]
    assert found.same_bytes == {f"s3://leakage/data/{leaks['copy']}": f"s3://leakage/data/{leaks['copied_from']}"}


def test_retrain_with_a_leaky_holdout_is_refused_before_anything_starts(tmp_path, mlflow_server, capsys):
    leaky_corpus(tmp_path)
    config = {
        "train": {
            "name": "leaky",
            "method": {"detector": {"backbone": {"name": "mpft-tiny-32", "pretrained": None}}},
            "train": [{"uri": str(tmp_path / "train"), "layout": "genimage", "split": "train"}],
            "val": [{"uri": str(tmp_path / "holdout"), "layout": "genimage", "split": "val"}],
            "checkpoint_root": str(tmp_path / "runs"),
            "tracking": {"uri": mlflow_server.tracking_uri, "experiment": "leaky-retrain",
                         "registered_model": "leaky-retrain"},
        },
        "holdout": [source.to_dict() for source in holdout_sources(str(tmp_path))],
    }
    path = tmp_path / "retrain.yaml"
    path.write_text(yaml.safe_dump(config))

    with pytest.raises(SystemExit) as refused:
        cli.main(["retrain", "--config", str(path)])

    assert str(refused.value).startswith("mpft retrain: refused: 2 of 9 holdout images are in the training data")
    assert MlflowClient(mlflow_server.tracking_uri).get_experiment_by_name("leaky-retrain") is None  # nothing ran
