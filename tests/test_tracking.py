"""jobs.tracking against a real MLflow server: runs, params, metrics, artefacts, the pyfunc model, the registry."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from jobs import plots, tracking
from mpft_core.backbone import register_shipped_configs, save_clip_weights, tower_activation
from mpft_core.checkpoint import load_checkpoint, save_checkpoint
from mpft_core.config import BackboneConfig, DetectorConfig
from mpft_core.detector import build_detector
from mpft_core.metrics import to_markdown
from mpft_core.transforms import eval_view, normalize
from pipelines.storage import SECRET_MASK

THRESHOLD = 0.37


@pytest.fixture
def tracking_uri(mlflow_server):
    tracking.set_tracking(mlflow_server.tracking_uri)
    return mlflow_server.tracking_uri


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


# ----------------------------------------------------------------------------------------------- runs and logging


@pytest.mark.timeout(120)
def test_run_records_config_params_metrics_figure_and_table(tracking_uri, tmp_path):
    config = {
        "name": "exp1",
        "method": {"optim": {"head_lr": 0.001, "epochs": 2}, "detector": {"backbone": {"name": "mpft-tiny-32"}}},
        "train": {"subsets": ["adm", "sd14"]},
        "notes": "x" * 7000,  # over MLflow's 6000-char param limit
        "empty": {},
    }
    table = pd.DataFrame({"subset": ["adm", "mean"], "n": [4, 4], "acc": [0.75, float("nan")]})
    fig = plots.roc_curves([0, 1, 0, 1], [0.1, 0.8, 0.4, 0.6], ["a"] * 4)

    with tracking.start_run(unique("exp"), "run-a") as run:
        tracking.log_config(config)
        tracking.log_params({"data.train_rows": 4})
        tracking.log_metrics({"train/loss": 0.9, "val acc (mean)": 0.5, "bad=name!": 1.0, "skip": None}, step=1)
        tracking.log_metrics({"train/loss": np.float32(0.7), "val": {"auc": 0.6}}, step=2)
        tracking.log_figure(fig, "plots/val_roc.png")
        tracking.log_table(table, "eval/per_subset")
    run_id = run.info.run_id

    assert not plots.plt.fignum_exists(fig.number), "log_figure must close the figure"
    client = MlflowClient(tracking_uri)
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED"
    params = finished.data.params
    assert params["method.optim.head_lr"] == "0.001"
    assert params["method.detector.backbone.name"] == "mpft-tiny-32"
    assert params["train.subsets"] == '["adm","sd14"]'
    assert params["data.train_rows"] == "4"
    assert params["empty"] == "{}"
    assert len(params["notes"]) == 6000 and params["notes"].endswith("[truncated]")

    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [
        (1, 0.9), (2, float(np.float32(0.7)))]  # numpy scalars logged as their exact value
    assert set(finished.data.metrics) == {"train/loss", "val acc _mean_", "bad_name_", "val.auc"}

    assert {"config.yaml", "plots/val_roc.png", "eval/per_subset.parquet", "eval/per_subset.md"} <= artifact_paths(
        client, run_id)
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval", dst_path=str(tmp_path)))
    pd.testing.assert_frame_equal(pd.read_parquet(local / "per_subset.parquet"), table)
    assert (local / "per_subset.md").read_text() == to_markdown(table)
    saved = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml"))
    assert saved["method"] == config["method"] and saved["notes"] == config["notes"]  # YAML keeps full values


@pytest.mark.timeout(60)
def test_log_config_masks_secret_like_keys(tracking_uri):
    config = {
        "storage": {"endpoint_url": "http://user:hunter2@127.0.0.1:9000", "secret_key": "s3cr3t", "access_key": None},
        "db_password": "pw-value",
        "auth": {"api_token": "tok-value", "client_secrets": {"a": "nested-value"}},
        "tokenizer": "kept",  # a word merely containing "token" is not a secret
    }
    with tracking.start_run(unique("exp"), "masking") as run:
        tracking.log_config(config)

    params = MlflowClient(tracking_uri).get_run(run.info.run_id).data.params
    saved_yaml = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    for secret in ("hunter2", "s3cr3t", "pw-value", "tok-value", "nested-value"):
        assert secret not in saved_yaml
        assert not any(secret in value for value in params.values())
    assert params["storage.secret_key"] == SECRET_MASK
    assert params["db_password"] == SECRET_MASK
    assert params["auth.client_secrets"] == SECRET_MASK
    assert params["storage.endpoint_url"] == f"http://{SECRET_MASK}@127.0.0.1:9000"
    assert params["storage.access_key"] == "None"  # unset stays visibly unset
    assert params["tokenizer"] == "kept"


@pytest.mark.timeout(90)
def test_resume_by_name_continues_the_same_run(tracking_uri, caplog):
    experiment = unique("exp")
    with tracking.start_run(experiment, "train-job", resume_by_name=True) as first:
        tracking.log_params({"epochs": 1, "lr": 0.1})
        tracking.log_metrics({"loss": 1.0}, step=1)
    with pytest.raises(RuntimeError, match="worker died"):
        with tracking.start_run(experiment, "train-job", resume_by_name=True) as second:
            tracking.log_metrics({"loss": 0.5}, step=2)
            raise RuntimeError("worker died")
    with caplog.at_level(logging.WARNING, logger="jobs.tracking"):
        with tracking.start_run(experiment, "train-job", resume_by_name=True) as third:
            tracking.log_params({"epochs": 3, "lr": 0.1, "new": "yes"})  # epochs changed between attempts
    with tracking.start_run(experiment, "train-job") as fresh:  # without resume: a new run of the same name
        pass

    client = MlflowClient(tracking_uri)
    assert first.info.run_id == second.info.run_id == third.info.run_id != fresh.info.run_id
    run = client.get_run(first.info.run_id)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 1.0), (2, 0.5)]
    assert run.data.params["epochs"] == "1" and run.data.params["new"] == "yes"
    assert run.data.tags[tracking.CHANGED_PARAMS_TAG] == "epochs"
    assert "epochs" in caplog.text
    assert run.info.status == "FINISHED"  # the failed attempt was marked FAILED, the last one finished it


@pytest.mark.timeout(60)
def test_resume_by_name_matches_names_with_quotes_exactly(tracking_uri):
    experiment = unique("exp")
    runs = {}
    for name in ("it's", 'it\'s "quoted"', "50%_done"):
        with tracking.start_run(experiment, name, resume_by_name=True) as first:
            pass
        with tracking.start_run(experiment, name, resume_by_name=True) as again:
            pass
        assert again.info.run_id == first.info.run_id, name
        runs[name] = first.info.run_id
    assert len(set(runs.values())) == 3


@pytest.mark.timeout(60)
def test_failed_block_marks_run_failed_and_nested_run_records_parent(tracking_uri):
    experiment = unique("exp")
    with tracking.start_run(experiment, "parent") as parent:
        with pytest.raises(ValueError):
            with tracking.start_run(experiment, "child", parent_run_id=parent.info.run_id) as child:
                raise ValueError("boom")
    client = MlflowClient(tracking_uri)
    child_run = client.get_run(child.info.run_id)
    assert child_run.info.status == "FAILED"
    assert child_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


@pytest.mark.timeout(60)
def test_worker_logging_uses_its_own_client_not_the_process_state(tracking_uri, tmp_path):
    with tracking.start_run(unique("exp"), "driver") as run:
        pass
    fig = plots.subset_accuracy_bars({"a": {"acc": 0.5, "acc_real": 0.5, "acc_fake": 0.5}})
    # A Ray worker has no active run and no tracking URI of its own: point the process elsewhere to prove it.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    try:
        tracking.log_metrics_to_run(tracking_uri, run.info.run_id, {"train/loss": 0.25, "lr": 1e-3}, step=7)
        tracking.log_figure_to_run(tracking_uri, run.info.run_id, fig, "tam_masks.png")
    finally:
        tracking.set_tracking(tracking_uri)

    client = MlflowClient(tracking_uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(7, 0.25)]
    assert "tam_masks.png" in artifact_paths(client, run.info.run_id)
    assert not plots.plt.fignum_exists(fig.number)


@pytest.mark.timeout(60)
def test_text_report_and_run_tags(tracking_uri):
    with tracking.start_run(unique("exp"), "promote") as run:
        tracking.log_text("# gate\npassed\n", "gate.md")
        tracking.set_run_tags({"retrain.decision": "promoted", "db_password": "pw-value"})
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/gate.md") == "# gate\npassed\n"
    tags = MlflowClient(tracking_uri).get_run(run.info.run_id).data.tags
    assert tags["retrain.decision"] == "promoted" and tags["db_password"] == SECRET_MASK


def test_logging_outside_a_run_is_an_error_not_a_stray_run():
    assert mlflow.active_run() is None
    for call in (lambda: tracking.log_metrics({"x": 1.0}), lambda: tracking.log_params({"a": 1}),
                 lambda: tracking.set_run_tags({"a": "b"}), lambda: tracking.log_text("t", "t.txt")):
        with pytest.raises(RuntimeError, match="no active MLflow run"):
            call()


def test_metric_values_must_be_numbers():
    with pytest.raises(TypeError, match="not a number"):
        list(tracking._numeric_items({"acc": "high"}))


@pytest.mark.parametrize("raw, clean", [
    ("val/acc", "val/acc"),
    ("acc@0.5 [sd14]", "acc_0.5 _sd14_"),
    ("/a//b/", "a/b"),
    ("../x", "__/x"),
    ("", "_"),
])
def test_sanitize_key_gives_names_mlflow_accepts(raw, clean):
    assert tracking.sanitize_key(raw) == clean


# ---------------------------------------------------------------------------------------------------- the model


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory, images):
    """A tiny detector saved as a checkpoint, logged as a pyfunc, registered and aliased ``challenger``.

    Its tower starts from a weight file of a QuickGELU tower (like the OpenAI CLIP weights), so every loading path
    below must rebuild QuickGELU to reproduce its scores."""
    tracking.set_tracking(mlflow_server.tracking_uri)
    torch.manual_seed(0)
    register_shipped_configs()
    weights = tmp_path_factory.mktemp("weights") / "clip-tiny-openai-like.safetensors"
    save_clip_weights(open_clip.create_model("mpft-tiny-32", force_quick_gelu=True), weights, "quick_gelu")
    detector = build_detector(DetectorConfig(backbone=BackboneConfig(name="mpft-tiny-32", pretrained=str(weights))))
    detector.threshold = THRESHOLD
    detector.eval()
    # Shift the head so the threshold splits the test images: both verdicts then get exercised.
    logits = torch.logit(reference_scores(detector, images).double())
    with torch.no_grad():
        detector.head.bias += float(torch.logit(torch.tensor(THRESHOLD, dtype=torch.float64)) - logits.median())
    checkpoint_dir = save_checkpoint(detector, tmp_path_factory.mktemp("ckpt"))
    (checkpoint_dir / "train_state.pt").write_bytes(b"optimizer state that must not be published")

    name = unique("mpft-test")
    with tracking.start_run(unique("exp"), "train") as run:
        model_uri = tracking.log_detector_model(str(checkpoint_dir))
    version = tracking.register_model(model_uri, name, tags={"train_run_id": run.info.run_id})
    tracking.set_alias(name, "challenger", version)
    return {"detector": detector, "checkpoint_dir": checkpoint_dir, "name": name, "version": version,
            "run_id": run.info.run_id, "model_uri": model_uri}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in ((40, 48, 3), (20, 20, 3), (32, 64, 3),
                                                                             (50, 33, 3))]
    encoded = [encode(arrays[0], "PNG"), encode(arrays[1], "JPEG"), encode(arrays[2], "PNG"),
               encode(arrays[3], "JPEG")]
    return encoded


def reference_scores(detector, encoded: list[bytes]) -> torch.Tensor:
    """What the in-memory detector says about these files: same decoder, same crop, one batch."""
    from mpft_core.imageio import decode_rgb

    crops = np.stack([eval_view(decode_rgb(data), detector.preprocess.image_size) for data in encoded])
    return detector.score_uint8(torch.from_numpy(crops))


def expected_verdicts(scores) -> list[str]:
    return ["generated" if s >= THRESHOLD else "real" for s in scores]


@pytest.mark.timeout(180)
def test_registered_pyfunc_scores_raw_image_bytes_like_the_detector(registered, images):
    model = mlflow.pyfunc.load_model(f"models:/{registered['name']}@challenger")
    out = model.predict(pd.DataFrame({"image": images}))

    expected = reference_scores(registered["detector"], images).numpy()
    assert list(out.columns) == ["score", "verdict", "threshold", "real_threshold", "error"]
    np.testing.assert_array_equal(out["score"].to_numpy(), expected.astype(np.float64))  # bit-identical
    assert out["verdict"].tolist() == expected_verdicts(expected)
    assert set(out["verdict"]) == {"generated", "real"}, "test images should exercise both verdicts"
    assert (out["threshold"] == THRESHOLD).all()
    assert (out["real_threshold"] == THRESHOLD).all()  # only threshold was set: no uncertain band
    assert out["error"].isna().all()


@pytest.mark.timeout(180)
def test_every_loading_path_runs_the_trained_quick_gelu_function(registered, images, tmp_path):
    from pipelines.scoring import DetectorScorer, decode_settings, make_model_bundle
    from pipelines.scoring_spec import ResolvedModel

    expected = reference_scores(registered["detector"], images).numpy()
    assert tower_activation(registered["detector"].visual) == "quick_gelu"
    # The control: the same tensors in a GELU tower score these images differently.
    gelu = build_detector(DetectorConfig(backbone=BackboneConfig(name="mpft-tiny-32", pretrained=None)))
    gelu.load_state_dict(registered["detector"].state_dict())
    assert not np.array_equal(reference_scores(gelu.eval(), images).numpy(), expected)

    from_checkpoint = load_checkpoint(registered["checkpoint_dir"])
    np.testing.assert_array_equal(reference_scores(from_checkpoint, images).numpy(), expected)

    from_registry = mlflow.pyfunc.load_model(f"models:/{registered['name']}/{registered['version']}")
    np.testing.assert_array_equal(from_registry.predict(pd.DataFrame({"image": images}))["score"].to_numpy(),
                                  expected.astype(np.float64))

    paths = []
    for i, data in enumerate(images):
        paths.append(str(tmp_path / f"{i}.img"))
        Path(paths[-1]).write_bytes(data)
    bundle = make_model_bundle(ResolvedModel(checkpoint_dir=str(registered["checkpoint_dir"]), uri="test"))
    actor = DetectorScorer(bundle, decode=decode_settings(32, 10**8, None))
    none = np.array([None] * len(paths), dtype=object)
    rows = actor({"path": np.array(paths, dtype=object), "label": none, "subset": none, "split": none})
    np.testing.assert_array_equal(rows.column("score").to_numpy(), expected)


@pytest.mark.timeout(180)
def test_bad_image_row_gets_an_error_and_the_others_still_score(registered, images):
    model = mlflow.pyfunc.load_model(f"models:/{registered['name']}/{registered['version']}")
    rows = [images[0], b"\x89PNG\r\n\x1a\n but not really an image", images[1]]
    out = model.predict(pd.DataFrame({"image": rows}))

    assert out["error"].isna().tolist() == [True, False, True]
    assert out.loc[1, "error"]
    assert np.isnan(out.loc[1, "score"]) and pd.isna(out.loc[1, "verdict"])
    expected = reference_scores(registered["detector"], [images[0], images[1]]).numpy()
    np.testing.assert_array_equal(out["score"].to_numpy()[[0, 2]], expected.astype(np.float64))


@pytest.mark.timeout(120)
def test_logged_model_holds_only_the_checkpoint_and_a_small_pickle(registered, tmp_path):
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=registered["model_uri"], dst_path=str(tmp_path)))
    assert sorted(p.name for p in (local / "artifacts" / "checkpoint").iterdir()) == ["model.safetensors",
                                                                                      "mpft.json"]
    # The pickled python_model is the bare scorer object; the weights are never pickled.
    assert (local / "python_model.pkl").stat().st_size < 20_000
    requirements = (local / "requirements.txt").read_text()
    assert "open_clip_torch==" in requirements and "torch==" in requirements
    assert (local / "code" / "mpft_core" / "checkpoint.py").is_file()
    assert (local / "code" / "mpft_core" / "scoring.py").is_file()  # the scoring kernel the pyfunc imports
    assert (local / "code" / "jobs" / "mlflow_model.py").is_file()


def logits_of(checkpoint_dir: str) -> torch.Tensor:
    detector = load_checkpoint(checkpoint_dir)
    batch = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    with torch.inference_mode():
        return detector(normalize(batch, detector.preprocess.mean, detector.preprocess.std))


@pytest.mark.timeout(180)
def test_resolve_model_gives_a_loadable_checkpoint_for_every_kind_of_reference(registered, tmp_path, monkeypatch):
    name, version = registered["name"], registered["version"]
    expected = logits_of(str(registered["checkpoint_dir"]))
    local = str(Path(registered["checkpoint_dir"]).resolve())
    model_folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=registered["model_uri"],
                                                            dst_path=str(tmp_path / "downloaded")))
    run_ref = f"runs:/{registered['run_id']}/model"
    refs = {  # reference -> the name its scores carry: registry versions pinned, local folders absolute
        f"models:/{name}@challenger": (f"models:/{name}/{version}", name, version),
        f"models:/{name}/{version}": (f"models:/{name}/{version}", name, version),
        run_ref: (run_ref, None, None),
        str(registered["checkpoint_dir"]): (local, None, None),
        f"file://{registered['checkpoint_dir']}": (local, None, None),
        str(model_folder): (str(model_folder.resolve()), None, None),
    }
    for i, (ref, identity) in enumerate(refs.items()):
        resolved = tracking.resolve_model(ref, dst_dir=str(tmp_path / str(i)))
        assert (resolved.uri, resolved.name, resolved.version) == identity, ref
        assert sorted(p.name for p in Path(resolved.checkpoint_dir).iterdir())[:2] == ["model.safetensors",
                                                                                       "mpft.json"]
        assert torch.equal(logits_of(resolved.checkpoint_dir), expected), ref
    assert tracking.resolve_model(local).checkpoint_dir == local  # a local checkpoint is used in place

    monkeypatch.chdir(Path(local).parent)  # a relative path is named by where it points from here
    assert tracking.resolve_model(Path(local).name).uri == local


@pytest.mark.timeout(120)
def test_resolve_model_from_an_s3_checkpoint_prefix(registered, s3_server, tmp_path):
    bucket = unique("ckpt").lower()
    s3_server.create_bucket(bucket)
    s3_server.upload_dir(registered["checkpoint_dir"], f"s3://{bucket}/runs/exp1/best")

    resolved = tracking.resolve_model(f"s3://{bucket}/runs/exp1/best", s3_server.storage_config(),
                                      dst_dir=str(tmp_path))

    assert sorted(p.name for p in Path(resolved.checkpoint_dir).iterdir()) == ["model.safetensors", "mpft.json"]
    assert torch.equal(logits_of(resolved.checkpoint_dir), logits_of(str(registered["checkpoint_dir"])))


def test_resolve_model_rejects_a_folder_without_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not an MPFT checkpoint"):
        tracking.resolve_model(str(tmp_path))


@pytest.mark.timeout(60)
def test_aliases_and_version_tags(registered, tracking_uri):
    name, version = registered["name"], registered["version"]
    assert tracking.get_alias_version(name, "challenger") == version
    assert tracking.get_alias_version(name, "champion") is None
    assert tracking.get_alias_version(unique("no-such-model"), "champion") is None

    tracking.set_version_tags(name, version, {"holdout_acc": 0.91, "gate": "passed", "long": "x" * 6000})
    tracking.set_alias(name, "champion", version)

    mv = MlflowClient(tracking_uri).get_model_version(name, version)
    assert mv.tags["holdout_acc"] == "0.91" and mv.tags["gate"] == "passed"
    assert len(mv.tags["long"]) == tracking.MAX_TAG_VALUE_CHARS and mv.tags["long"].endswith("...[truncated]")
    assert mv.tags["train_run_id"] == registered["run_id"]
    assert tracking.get_alias_version(name, "champion") == version


@pytest.mark.timeout(180)
def test_a_registry_model_downloaded_by_a_command_is_removed_when_it_exits(registered, tmp_path):
    # Each `mpft score` / `evaluate` / `promote` downloads the model it names; a crawl scored daily must not leave
    # one copy per run in /tmp.
    ref = f"models:/{registered['name']}/{registered['version']}"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = ("import sys; from jobs import tracking; "
              "print(tracking.resolve_model(sys.argv[1]).checkpoint_dir, flush=True)")
    env = {**os.environ, "TMPDIR": str(tmp), "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}

    done = subprocess.run([sys.executable, "-c", script, ref], env=env, capture_output=True, text=True, timeout=150,
                          cwd=Path(__file__).resolve().parents[1])

    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).is_relative_to(tmp)  # it was downloaded there ...
    assert list(tmp.iterdir()) == []  # ... and is gone with the process

