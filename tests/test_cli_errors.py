"""Failures a person can fix are one line on stderr and exit status 2, never a traceback, never a secret."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from pydantic import ValidationError

from jobs import cli
from jobs.common import UsageError, check_reachable
from jobs.config import TrainJobConfig
from pipelines.storage import StorageConfig

REPO = Path(__file__).resolve().parents[1]
SECRET = "wJalrXUtnFEMI-K7MDENG-not-to-be-printed"
ACCESS_KEY = "AKIA-NOT-TO-BE-PRINTED"


def run_mpft(*argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``mpft ARGV`` in a fresh interpreter, as a person runs it."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_usage_error(done: subprocess.CompletedProcess, *expected: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def closed_port() -> int:
    """A port nothing listens on (the OS picked it free; the socket is closed again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# --- missing files, unknown schemes, unreachable servers: before anything starts ----------------------------------
@pytest.mark.timeout(120)
def test_a_missing_config_file_is_named_in_one_line(tmp_path):
    missing = tmp_path / "job.yaml"
    done = run_mpft("train", "--config", str(missing))
    assert_one_line_usage_error(done, f"mpft train: no such file or folder: {missing}")


@pytest.mark.timeout(120)
def test_a_missing_local_input_is_reported_as_missing_not_as_remote(tmp_path):
    missing = tmp_path / "photos"
    done = run_mpft("score", "--model", "models:/mpft-detector@champion", "--input", str(missing))
    line = assert_one_line_usage_error(done, f"no such file or folder: {missing}", "--input")
    assert "remote" not in line


@pytest.mark.timeout(120)
def test_an_unknown_uri_scheme_is_refused_by_name(tmp_path):
    done = run_mpft("evaluate", "--model", "models:/m/1", "--source", "gs://bucket/genimage", "--no-log")
    assert_one_line_usage_error(done, "unknown location scheme gs://", "--source gs://bucket/genimage")


@pytest.mark.timeout(120)
def test_an_mlflow_server_that_does_not_answer_is_one_line(tmp_path):
    holdout = tmp_path / "holdout.csv"
    holdout.write_text("path,label\na.png,0\n")
    url = f"http://127.0.0.1:{closed_port()}"
    done = run_mpft("promote", "--model", "m", "--holdout", str(holdout), "--tracking-uri", url)
    assert_one_line_usage_error(done, f"cannot reach the MLflow tracking server at {url}")


@pytest.mark.timeout(120)
def test_verbose_shows_the_traceback(tmp_path):
    done = run_mpft("-v", "train", "--config", str(tmp_path / "job.yaml"))
    assert done.returncode == 2
    assert "Traceback" in done.stderr and "no such file or folder" in done.stderr


# --- configs and manifests ----------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_misspelt_config_key_is_named_and_the_credentials_beside_it_are_not_printed(tmp_path):
    config = write_yaml(tmp_path / "job.yaml", {
        "name": "typo", "train": {"uri": str(tmp_path)}, "val": {"uri": str(tmp_path)},
        "methd": {"optim": {"epochs": 1}},
        "storage": {"secret_key": SECRET, "acces_key": ACCESS_KEY},
    })
    done = run_mpft("train", "--config", str(config))
    assert_one_line_usage_error(done, f"invalid config {config}", "unknown key methd", "unknown key storage.acces_key")
    assert SECRET not in done.stderr + done.stdout and ACCESS_KEY not in done.stderr + done.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["train", "retrain"])
def test_a_config_mistake_is_reported_before_the_training_stack_is_imported(tmp_path, command):
    job = {"name": "x", "train": {"uri": str(tmp_path)}, "val": {"uri": str(tmp_path)}, "methd": {}}
    config = write_yaml(tmp_path / "job.yaml", job if command == "train" else {"train": job})
    check = ("import sys\nfrom jobs import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit as exit:\n"
             "    print(exit.code, 'torch' in sys.modules, 'open_clip' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", check, command, "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=110)
    assert done.stdout.split() == ["2", "False", "False"], done.stdout + done.stderr[-2000:]
    assert "unknown key" in done.stderr and "methd" in done.stderr


@pytest.mark.timeout(120)
def test_a_misspelt_set_override_is_named_like_a_misspelt_yaml_key(tmp_path):
    config = write_yaml(tmp_path / "job.yaml", {"name": "x", "train": {"uri": str(tmp_path)},
                                                "val": {"uri": str(tmp_path)}})
    done = run_mpft("train", "--config", str(config), "--set", "method.detector.mask.stratgy=random")
    assert_one_line_usage_error(done, "unknown key method.detector.mask.stratgy")
    done = run_mpft("train", "--config", str(config), "--set", "method.detector.mask.strategy")
    assert_one_line_usage_error(done, "KEY=VALUE")


def test_set_overrides_land_in_the_validated_config_and_keep_the_yaml_s_other_settings(tmp_path):
    from jobs.config import load_train_config

    config = write_yaml(tmp_path / "job.yaml", {
        "name": "base", "train": {"uri": str(tmp_path)}, "val": {"uri": str(tmp_path)},
        "method": {"detector": {"mask": {"ratio": 0.3}}, "optim": {"seed": 7}},
    })
    cfg = load_train_config(config, ["method.detector.mask.strategy=random", "method.detector.backbone.pretrained=null",
                                     "method.optim.epochs=3", "name=other"])
    assert cfg.method.detector.mask.strategy == "random" and cfg.method.detector.mask.ratio == 0.3
    assert cfg.method.detector.backbone.pretrained is None
    assert (cfg.method.optim.epochs, cfg.method.optim.seed, cfg.name) == (3, 7, "other")
    with pytest.raises(ValidationError):  # a value of the wrong kind is the config's refusal, as in YAML
        load_train_config(config, ["method.detector.mask.ratio=high"])
    with pytest.raises(ValueError, match="is a value, not a section"):
        load_train_config(config, ["name.first=x"])


@pytest.mark.timeout(180)
def test_a_manifest_with_wrong_label_values_is_one_line_before_ray_starts(tmp_path):
    manifest = tmp_path / "data.csv"
    manifest.write_text("path,label\na.png,0\nb.png,2\n")
    config = write_yaml(tmp_path / "job.yaml", {
        "name": "labels", "train": {"uri": str(manifest), "layout": "manifest"},
        "val": {"uri": str(manifest), "layout": "manifest"}, "tracking": {"uri": (tmp_path / "mlruns").as_uri()}})
    done = run_mpft("train", "--config", str(config), timeout=170)
    assert_one_line_usage_error(done, "label must be 0 (real), 1 (generated) or empty")
    assert not (tmp_path / "mlruns").exists()  # refused before MLflow (or Ray) started


def no_ray(monkeypatch) -> None:
    """Starting or joining Ray fails the test: these refusals must come first."""
    import ray

    from pipelines import runtime

    def refuse(*args, **kwargs):
        raise AssertionError("this path must not start or join Ray")

    monkeypatch.setattr(runtime, "init_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def test_an_evaluation_manifest_reaching_outside_its_folder_is_refused_before_ray_starts(tmp_path, monkeypatch,
                                                                                        capsys):
    no_ray(monkeypatch)
    (tmp_path / "corpus").mkdir()
    manifest = tmp_path / "corpus" / "eval.csv"
    manifest.write_text(f"path,label\na.png,0\n{tmp_path / 'elsewhere.png'},1\n")

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--model", "models:/m/1", "--source", str(manifest), "--layout", "manifest", "--no-log"])

    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("mpft evaluate: manifest ") and "point outside the manifest's folder" in line


def test_a_value_error_from_deep_inside_is_an_internal_error_not_the_user_s(tmp_path, monkeypatch, capsys):
    from tests.helpers.models import tiny_checkpoint

    no_ray(monkeypatch)
    checkpoint = tiny_checkpoint(tmp_path / "model", threshold=0.5)
    meta = checkpoint / "mpft.json"
    meta.write_text(meta.read_text().replace('"threshold": 0.5', '"threshold": "half"'))  # float() fails on load
    image = tmp_path / "photo.png"
    image.write_bytes(b"")

    status = cli.main(["score", "--model", str(checkpoint), "--input", str(image)])

    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert lines[0].startswith("mpft score: internal error: ValueError:") and "half" in lines[0]
    assert lines[0].endswith("(run with -v for the traceback)")


def test_an_unreachable_server_s_credentials_are_not_echoed():
    url = f"http://alice:{SECRET}@127.0.0.1:{closed_port()}/mlflow?token={ACCESS_KEY}"
    with pytest.raises(UsageError) as refused:
        check_reachable(url, "the MLflow tracking server")
    message = str(refused.value)
    assert SECRET not in message and ACCESS_KEY not in message and "alice" not in message
    assert f"at http://127.0.0.1:{urlparse(url).port}/mlflow:" in message


def test_validation_errors_never_quote_a_credential():
    with pytest.raises(ValidationError) as bad_storage:
        StorageConfig.from_dict({"secret_key": SECRET, "acces_key": ACCESS_KEY, "region": ["eu"]})
    with pytest.raises(ValidationError) as bad_job:
        TrainJobConfig.from_dict({"name": "x", "train": [], "val": [],
                                  "storage": {"access_key": ACCESS_KEY, "secret_key": [SECRET]}})
    for err in (bad_storage.value, bad_job.value):
        shown = f"{err} {err!r} {cli.invalid_config(err, None)}"
        assert SECRET not in shown and ACCESS_KEY not in shown
    assert "acces_key" in str(bad_storage.value)  # the key itself is named


def test_in_process_a_usage_error_is_a_system_exit_with_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["retrain", "--config", str(tmp_path / "retrain.yaml")])
    assert exit_info.value.code == 2
    assert "no such file or folder" in str(exit_info.value)
    assert capsys.readouterr().err.count("\n") == 1


# --- mpft demo --workdir -----------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_demo_refuses_a_folder_it_did_not_make_and_deletes_nothing(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    done = run_mpft("demo", "--quick", "--workdir", str(tmp_path))
    assert_one_line_usage_error(done, f"--workdir {tmp_path} exists and was not made by mpft demo")
    assert (tmp_path / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


def test_demo_empties_only_its_own_earlier_workdir(tmp_path):
    from jobs.demo import WORKDIR_MARKER, fresh_workdir

    earlier = fresh_workdir(tmp_path / "demo")
    (earlier / "old-scores.parquet").write_bytes(b"old")
    assert fresh_workdir(earlier) == earlier
    assert sorted(p.name for p in earlier.iterdir()) == [WORKDIR_MARKER]  # emptied, marked again
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (fresh_workdir(empty) / WORKDIR_MARKER).is_file()  # an empty folder has nothing to lose


def test_a_sigterm_that_reaches_the_cli_as_a_plain_keyboard_interrupt_is_still_reported_as_sigterm(tmp_path,
                                                                                                    monkeypatch,
                                                                                                    capsys):
    """Ray's waits may re-raise the handler's Terminated as a plain KeyboardInterrupt: the exit status must still
    say SIGTERM (143), which is what a supervisor expects after it sent one."""
    import os
    import signal

    from jobs import score_cmd

    def interrupted_inside_a_library(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        except KeyboardInterrupt:
            raise KeyboardInterrupt from None  # what a library in between may do
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(score_cmd, "main", interrupted_inside_a_library)
    assert cli.main(["score", "--model", str(tmp_path), "--input", str(tmp_path)]) == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err
