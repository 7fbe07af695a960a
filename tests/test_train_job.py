"""`mpft train` end to end on the real local stack: S3 corpus → Ray Data → 2 Ray Train workers → MLflow registry."""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from jobs import cli
from jobs.config import load_train_config
from jobs.train import run_train
from mpft_core.checkpoint import load_checkpoint
from mpft_core.transforms import eval_view
from tests.helpers.images import write_genimage_tree, write_ufd_single_class, write_ufd_tree

pytestmark = pytest.mark.timeout(600)  # tests using ray_local are marked `ray` by conftest

MODEL_NAME = "train-job-test"


@pytest.fixture(scope="module")
def corpus_uri(s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("genimage")
    write_genimage_tree(root, subsets=("sdv14", "midjourney"), n_per_class=40, size=40, seed=3)
    s3_server.create_bucket("train-job")
    s3_server.upload_dir(root, "s3://train-job/genimage")
    return "s3://train-job/genimage"


def job_yaml(tmp_path: Path, s3_server, mlflow_server, corpus_uri: str, name: str) -> Path:
    storage = s3_server.storage_config().to_dict(reveal_secrets=True)
    config = {
        "name": name,
        "method": {
            "detector": {"backbone": {"name": "mpft-tiny-32", "pretrained": None},
                         "mask": {"strategy": "tam", "ratio": 0.25}, "dropout": 0.0},
            "optim": {"epochs": 2, "batch_size": 16, "backbone_lr": 1e-3, "head_lr": 3e-3, "schedule": "constant"},
            "threshold": {"target_fpr": 0.1},
        },
        "train": {"uri": corpus_uri, "layout": "genimage", "split": "train"},
        "val": {"uri": corpus_uri, "layout": "genimage", "split": "val"},
        "storage": storage,
        "checkpoint_root": "s3://train-job/checkpoints",
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "tracking": {"uri": mlflow_server.tracking_uri, "experiment": "train-job-test",
                     "registered_model": MODEL_NAME},
        "log_every_steps": 2,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def encoded_val_images(corpus_root_files: list[bytes]) -> pd.DataFrame:
    return pd.DataFrame({"image": corpus_root_files})


@pytest.fixture(scope="module")
def trained(s3_server, mlflow_server, ray_local, corpus_uri, tmp_path_factory):
    """One `mpft train` run (2 epochs), shared: a Ray Train run costs ~50 s here, and the resume test continues
    this very run. Returns (config path, the MLflow run, its last step), as they were right after training."""
    config_path = job_yaml(tmp_path_factory.mktemp("train-job"), s3_server, mlflow_server, corpus_uri,
                           name="tam-tiny")
    assert cli.main(["train", "--config", str(config_path)]) == 0
    client = MlflowClient(mlflow_server.tracking_uri)
    experiment = client.get_experiment_by_name("train-job-test")
    [run] = client.search_runs([experiment.experiment_id], "attributes.run_name = 'tam-tiny'")
    last_step = max(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))  # logged per epoch
    return config_path, run, last_step


@pytest.mark.slow
def test_train_job_learns_logs_registers_and_the_registered_model_scores_like_the_trained_one(
        tmp_path, s3_server, mlflow_server, trained):
    _, run, _ = trained
    client = MlflowClient(mlflow_server.tracking_uri)
    # Clearly above chance on held-out images (two subsets: 40 real + 40 generated each).
    assert run.data.metrics["val_mean_acc"] >= 0.8, run.data.metrics
    assert run.data.params["data.train_rows"] == "160"
    assert len(run.data.params["data.train_manifest_hash"]) == 64
    assert run.data.params["method.detector.mask.strategy"] == "tam"
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert len(history) == 2  # one validation per epoch
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")} >= {2, 4}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"val_roc.png", "val_subset_accuracy.png", "tam_masks.png", "config.yaml"} <= artifacts
    # The saved config never carries the S3 secret.
    config_text = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="config.yaml",
                                                           tracking_uri=mlflow_server.tracking_uri)).read_text()
    assert s3_server.secret_key not in config_text

    version = client.get_model_version_by_alias(MODEL_NAME, "challenger")
    assert version.run_id == run.info.run_id

    # The registry artefact scores raw image bytes exactly like the trained detector does in memory.
    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@challenger")
    local = mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@challenger", dst_path=str(tmp_path / "m"))
    detector = load_checkpoint(next(Path(local).rglob("mpft.json")).parent)
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, size=(40 + i, 50, 3), dtype=np.uint8) for i in range(4)]
    blobs = []
    for arr in pixels:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    out = pyfunc.predict(pd.DataFrame({"image": blobs}))
    crops = np.stack([eval_view(arr, detector.preprocess.image_size) for arr in pixels])
    import torch

    expected = detector.score_uint8(torch.from_numpy(crops)).numpy()
    np.testing.assert_array_equal(out["score"].to_numpy().astype(np.float32), expected)
    assert (out["threshold"] == detector.threshold).all()


@pytest.mark.slow
def test_rerunning_the_same_name_resumes_instead_of_starting_over(mlflow_server, trained):
    config_path, first, steps_two_epochs = trained
    cfg = load_train_config(config_path)
    cfg.tracking.registered_model = None  # registration is covered above; here only the resume matters
    cfg.method.optim.epochs = 3           # one more epoch than the first run
    second = run_train(cfg, mlflow_server.tracking_uri)

    assert second.run_id == first.info.run_id  # the same MLflow run continues
    assert second.metrics["resumed_from_step"] == steps_two_epochs
    assert second.metrics["global_step"] == steps_two_epochs * 3 // 2


def refuse_to_start_ray(*args, **kwargs):
    raise AssertionError("Ray was started: the job should have been refused before")


def test_train_refuses_to_start_when_validation_images_are_also_training_images(tmp_path, monkeypatch):
    monkeypatch.setattr("jobs.train.init_ray", refuse_to_start_ray)
    write_genimage_tree(tmp_path / "data", subsets=("sdv14",), n_per_class=4, size=8, splits=("train",))
    data = str(tmp_path / "data")
    config = {"name": "leaky", "train": {"uri": data, "split": "train"},
              "val": {"uri": data, "split": "train", "carve": {"fraction": 0.5, "keep": "carved"}},
              "tracking": {"uri": (tmp_path / "mlruns").as_uri()}}
    path = tmp_path / "leaky.yaml"
    path.write_text(yaml.safe_dump(config))

    with pytest.raises(SystemExit, match=r"validation images are also in the training manifest.*sdv14/train/"):
        cli.main(["train", "--config", str(path)])
    assert not (tmp_path / "mlruns").exists()  # refused before anything started


def test_train_refuses_validation_whose_fake_only_set_lacks_its_paired_real_set(tmp_path, monkeypatch):
    monkeypatch.setattr("jobs.train.init_ray", refuse_to_start_ray)
    write_ufd_tree(tmp_path / "ufd", subsets={"progan": ("car",)}, n_per_class=2, size=8)
    write_ufd_single_class(tmp_path / "ufd", "guided", label=1, n=2, size=8)
    ufd = str(tmp_path / "ufd")
    config = {"name": "unpaired", "train": {"uri": f"{ufd}/progan", "layout": "ufd"},
              "val": {"uri": f"{ufd}/guided", "layout": "ufd"}, "tracking": {"uri": (tmp_path / "mlruns").as_uri()}}
    path = tmp_path / "unpaired.yaml"
    path.write_text(yaml.safe_dump(config))

    with pytest.raises(SystemExit, match="refused: .*'guided' is paired with real subset 'imagenet'"):
        cli.main(["train", "--config", str(path)])
    assert not (tmp_path / "mlruns").exists()  # refused before anything started


def test_train_refuses_a_weight_file_that_does_not_state_its_activation_before_anything_starts(
        tmp_path, s3_server, monkeypatch):
    import open_clip
    from safetensors.torch import save_file

    monkeypatch.setattr("jobs.train.init_ray", refuse_to_start_ray)

    from mpft_core.backbone import register_shipped_configs

    register_shipped_configs()
    model = open_clip.create_model("mpft-tiny-32", force_quick_gelu=True)
    unstated = tmp_path / "converted-elsewhere.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(unstated))
    bucket = "weights-unstated"
    s3_server.create_bucket(bucket)
    s3_server.upload_dir(tmp_path, f"s3://{bucket}/w")  # read through the header only, as on a cluster
    write_genimage_tree(tmp_path / "data", subsets=("sdv14",), n_per_class=4, size=8, splits=("train", "val"))
    data = str(tmp_path / "data")
    config = {"name": "unstated", "train": {"uri": data, "split": "train"}, "val": {"uri": data, "split": "val"},
              "method": {"detector": {"backbone": {"name": "mpft-tiny-32",
                                                   "pretrained": f"s3://{bucket}/w/converted-elsewhere.safetensors"}}},
              "storage": s3_server.storage_config().to_dict(reveal_secrets=True),
              "tracking": {"uri": (tmp_path / "mlruns").as_uri()}}
    path = tmp_path / "unstated.yaml"
    path.write_text(yaml.safe_dump(config))

    with pytest.raises(SystemExit, match="does not say which activation"):
        cli.main(["train", "--config", str(path)])
    assert not (tmp_path / "mlruns").exists()


# ------------------------------------------------------------------------------- re-running a name: what it resumes


def local_job(tmp_path: Path, **method_optim) -> Path:
    """A job on local images whose runs go to ``tmp_path/runs``; ``method_optim`` overrides optimiser settings."""
    data = tmp_path / "data"
    config = {"name": "same-name", "train": {"uri": str(data), "split": "train"},
              "val": {"uri": str(data), "split": "val"}, "checkpoint_root": str(tmp_path / "runs"),
              "method": {"detector": {"backbone": {"name": "mpft-tiny-32", "pretrained": None},
                                      "mask": {"strategy": "random", "ratio": 0.25}},
                         "optim": {"epochs": 2, "batch_size": 16, "head_lr": 3e-3, **method_optim}},
              "tracking": {"uri": (tmp_path / "mlruns").as_uri()}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def earlier_run(tmp_path, monkeypatch) -> Path:
    """A run named "same-name" that trained two epochs on 4 images per class (checkpoints + its record), as
    `mpft train` leaves it; Ray must not start in these tests. Returns the run folder."""
    from jobs.train import labelled_manifest, run_folder, run_record, write_run_record
    from tests.test_training import training_checkpoint

    monkeypatch.setattr("jobs.train.init_ray", refuse_to_start_ray)
    write_genimage_tree(tmp_path / "data", subsets=("sdv14",), n_per_class=4, size=8)
    cfg = load_train_config(local_job(tmp_path))
    write_run_record(cfg, run_record(cfg, labelled_manifest(cfg.train, cfg.storage),
                                     labelled_manifest(cfg.val, cfg.storage)))
    folder = Path(run_folder(cfg))
    for epoch in (0, 1):
        training_checkpoint(folder / f"checkpoint_2025-01-01_00-00-0{epoch}.000000", epoch=epoch)
    return folder


def test_a_rerun_with_other_settings_is_refused_naming_the_changed_keys_and_the_way_out(tmp_path, earlier_run):
    path = local_job(tmp_path, head_lr=1e-2, batch_size=8)

    with pytest.raises(SystemExit, match=r"refused: run 'same-name' in .* was trained with other settings: config "
                                         r"method.optim.batch_size, method.optim.head_lr changed\. Resume it anyway "
                                         r"with `--resume force`, or start a separate run with a new name"):
        cli.main(["train", "--config", str(path)])
    assert not (tmp_path / "mlruns").exists()  # refused before anything started


def test_a_rerun_on_changed_training_data_is_refused(tmp_path, earlier_run):
    write_genimage_tree(tmp_path / "data", subsets=("sdv14",), n_per_class=5, size=8, splits=("train",))

    with pytest.raises(SystemExit, match=r"other settings: training data changed\. Resume it anyway"):
        cli.main(["train", "--config", str(local_job(tmp_path))])


@pytest.mark.parametrize("args, overrides", [
    (["--resume", "force"], {"head_lr": 1e-2}),  # asked for: resume under the new settings
    ([], {"epochs": 3}),                          # more epochs is what a resume is for
    ([], {}),                                     # nothing changed
])
def test_a_rerun_goes_on_to_train_when_nothing_that_matters_changed_or_when_forced(tmp_path, earlier_run, args,
                                                                                   overrides):
    with pytest.raises(AssertionError, match="Ray was started"):  # i.e. it passed every check
        cli.main(["train", "--config", str(local_job(tmp_path, **overrides)), *args])


def test_a_run_whose_checkpoints_are_all_broken_is_refused_instead_of_silently_starting_over(tmp_path, earlier_run):
    for checkpoint in earlier_run.glob("checkpoint_*"):
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])

    with pytest.raises(SystemExit, match=r"refused: no usable checkpoint in .*same-name \(checkpoint_2025.*"
                                         r"start a new run under another name"):
        cli.main(["train", "--config", str(local_job(tmp_path))])


def test_changed_settings_are_listed_as_dotted_keys():
    from jobs.train import differing_keys

    saved = {"method": {"optim": {"lr": 1, "epochs": 2}}, "train": [{"uri": "a", "split": "train"}]}
    new = {"method": {"optim": {"lr": 2, "epochs": 2}}, "train": [{"uri": "b", "split": "train"}], "max_pixels": 9}
    assert differing_keys(saved, new) == {"method.optim.lr", "train[0].uri", "max_pixels"}


def test_a_run_recorded_before_a_new_default_setting_existed_still_resumes_and_a_real_change_is_still_seen():
    from jobs.config import TrainJobConfig
    from jobs.train import run_changes, with_current_defaults

    cfg = TrainJobConfig.from_dict({"name": "r", "train": [{"uri": "/data", "split": "train"}],
                                    "val": [{"uri": "/data", "split": "val"}]})
    data = {"train_manifest_hash": "t", "val_manifest_hash": "v"}
    new = {"config": {key: cfg.to_dict()[key] for key in ("method", "train", "val", "max_pixels")}, "data": data}
    old = json.loads(json.dumps(new))
    del old["config"]["method"]["augment"]["degrade"]  # recorded by a version without degradation augmentation
    del old["config"]["method"]["threshold"]["target_miss_rate"]

    assert run_changes(old, new) != []  # compared raw, the missing keys look like changes
    assert run_changes(with_current_defaults(old), new) == []
    old["config"]["method"]["optim"]["head_lr"] = 0.5
    assert run_changes(with_current_defaults(old), new) == ["config method.optim.head_lr changed"]


def test_a_calibration_target_for_a_class_validation_lacks_is_refused_before_ray_starts():
    from jobs.train import check_calibration_classes
    from mpft_core.config import InputError, ThresholdConfig

    real_only = pa.table({"path": ["/v/a.png", "/v/b.png"], "label": pa.array([0, 0], pa.int8())})
    check_calibration_classes(ThresholdConfig(target_fpr=0.05), real_only)
    with pytest.raises(InputError, match="target_miss_rate is set, but the validation sources hold no generated"):
        check_calibration_classes(ThresholdConfig(target_fpr=0.05, target_miss_rate=0.05), real_only)
