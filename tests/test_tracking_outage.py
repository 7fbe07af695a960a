"""MLflow going away during a run: logging is buffered and retried, never fatal, and nothing is silently lost.

The outage is real: the test's own MLflow server is stopped and started again on the same port and database.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import uuid

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from infra.local_stack.mlflow_server import LocalMlflowServer
from infra.local_stack.process_group import free_port
from jobs import plots, tracking

OUTAGE_CALLS_BOUND_S = 10.0  # a sanity bound: MLflow's default retries would take minutes


@pytest.fixture
def own_server(tmp_path):
    """A server only this test stops and restarts (the session's shared one must stay up)."""
    with LocalMlflowServer(root=tmp_path / "mlflow") as server:
        yield server


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Temporary folders go under the test's own folder, so leftovers can be seen."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def new_run(server: LocalMlflowServer) -> str:
    client = MlflowClient(server.tracking_uri)
    experiment_id = client.create_experiment(f"outage-{uuid.uuid4().hex[:8]}")
    return client.create_run(experiment_id).info.run_id


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


def small_figure():
    return plots.subset_accuracy_bars({"a": {"acc": 0.5, "acc_real": 0.5, "acc_fake": 0.5}})


def wait_past_first_retry_delay(outage_began: float) -> None:
    # A restart faster than the backoff would leave the next call inside it; the test is about what happens after.
    time.sleep(max(0.0, outage_began + tracking.FIRST_RETRY_DELAY_S - time.monotonic()))


@pytest.mark.timeout(240)
def test_logging_during_an_outage_returns_quickly_and_reaches_the_run_once_the_server_is_back(
        own_server, private_tmp, caplog):
    tracking.set_tracking(own_server.tracking_uri)
    caplog.set_level(logging.INFO, logger="jobs.tracking")
    with tracking.start_run(f"outage-{uuid.uuid4().hex[:8]}", "train") as run:
        for step in (1, 2):
            tracking.log_metrics({"train_loss": 1.0 / step}, step=step)

        own_server.stop()
        outage_began = time.monotonic()
        for step in (3, 4, 5):
            tracking.log_metrics({"train_loss": 1.0 / step, "val": {"acc": step / 10}}, step=step)
        tracking.log_params({"data.train_rows": 40})
        tracking.log_figure(small_figure(), "plots/val_roc.png")
        logged_during_outage_ms = int(time.time() * 1000)
        assert time.monotonic() - outage_began < OUTAGE_CALLS_BOUND_S
        assert any("unreachable" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)

        own_server.start()
        wait_past_first_retry_delay(outage_began)
        tracking.log_metrics({"train_loss": 1.0 / 6}, step=6)

    client = MlflowClient(own_server.tracking_uri)
    losses = history(client, run.info.run_id, "train_loss")
    assert [(step, value) for step, value, _ in losses] == [(s, pytest.approx(1.0 / s)) for s in range(1, 7)]
    buffered = [timestamp for step, _, timestamp in losses if step in (3, 4, 5)]
    assert all(timestamp <= logged_during_outage_ms for timestamp in buffered), "original timestamps are kept"
    assert [(s, v) for s, v, _ in history(client, run.info.run_id, "val.acc")] == [
        (3, pytest.approx(0.3)), (4, pytest.approx(0.4)), (5, pytest.approx(0.5))]
    finished = client.get_run(run.info.run_id)
    assert finished.data.params["data.train_rows"] == "40"
    assert finished.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/val_roc.png"]
    assert list(private_tmp.iterdir()) == [], "the folder of pending files is removed"


@pytest.mark.timeout(180)
def test_a_server_that_never_comes_back_leaves_a_report_and_a_local_copy_of_what_was_not_logged(
        own_server, private_tmp, tmp_path, caplog):
    run_id = new_run(own_server)
    uri = own_server.tracking_uri
    tracking.log_metrics_to_run(uri, run_id, {"train_loss": 0.9}, step=10)

    own_server.stop()
    started = time.monotonic()
    for step in (20, 30):
        tracking.log_metrics_to_run(uri, run_id, {"train_loss": 0.8, "lr_head": 1e-3}, step=step)
    tracking.log_figure_to_run(uri, run_id, small_figure(), "tam_masks.png")
    caplog.set_level(logging.WARNING, logger="jobs.tracking")
    left = tracking.finish_run_logging(uri, run_id, report_dir=str(tmp_path / "outputs"))
    assert time.monotonic() - started < OUTAGE_CALLS_BOUND_S

    assert (left.metrics, left.params, left.artifacts) == (4, 0, 1)
    report = [r.getMessage() for r in caplog.records if "could not log" in r.getMessage()]
    assert len(report) == 1
    assert "4 metrics" in report[0] and "1 artefacts" in report[0] and str(left.json_file) in report[0]
    saved = json.loads(left.json_file.read_text())
    assert left.json_file.parent == tmp_path / "outputs" and saved["run_id"] == run_id
    assert sorted((m["key"], m["step"]) for m in saved["metrics"]) == [
        ("lr_head", 20), ("lr_head", 30), ("train_loss", 20), ("train_loss", 30)]
    assert all(m["timestamp"] > 0 for m in saved["metrics"])
    assert (left.artifacts_dir / "tam_masks.png").stat().st_size > 0
    assert list(private_tmp.iterdir()) == [], "the folder of pending files is removed"


def test_metrics_beyond_the_memory_bound_are_still_reported_at_the_end(tmp_path, private_tmp):
    nobody_listens = f"http://127.0.0.1:{free_port()}"
    logger = tracking.ResilientRunLogger(nobody_listens, "run-without-server", max_buffered_metrics=3)
    for step in range(8):
        logger.log_metrics({"loss": float(step)}, step=step)
    assert logger.pending()["metrics"] == 8

    left = logger.close(report_dir=str(tmp_path))

    saved = json.loads(left.json_file.read_text())
    assert [(m["step"], m["value"]) for m in saved["metrics"]] == [(s, float(s)) for s in range(8)]
    assert list(private_tmp.iterdir()) == []


@pytest.mark.timeout(60)
def test_a_server_that_refuses_the_logging_raises_instead_of_buffering(mlflow_server):
    logger = tracking.ResilientRunLogger(mlflow_server.tracking_uri, uuid.uuid4().hex)  # no such run
    with pytest.raises(MlflowException, match="not found|does not exist"):
        logger.log_metrics({"loss": 0.5}, step=1)
    assert logger.pending() == {"metrics": 0, "params": 0, "artifacts": 0}
