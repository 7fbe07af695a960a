"""`mpft demo --quick` end to end: the stack comes up, every stage runs, and everything is stopped again."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest
from mlflow import MlflowClient

from infra.local_stack.mlflow_server import ARTIFACTS_BUCKET
from infra.local_stack.s3 import LocalS3Server
from jobs.demo import MODEL_NAME
from pipelines import storage
from pipelines.scoring import read_scores

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]


def processes_mentioning(text: str) -> list[str]:
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in listing if text in line]


def orphaned_ray_workers() -> set[str]:
    """``ray::`` worker processes whose parent is not a raylet: left behind by a Ray instance that has stopped."""
    rows = [line.split(None, 3) for line in subprocess.run(["ps", "-eo", "pid=,ppid=,comm=,args="],
                                                           capture_output=True, text=True).stdout.splitlines()]
    rows = [r for r in rows if len(r) == 4]
    raylets = {pid for pid, _, comm, _ in rows if comm == "raylet"}
    return {f"{pid} {args}" for pid, ppid, _, args in rows if args.startswith("ray::") and ppid not in raylets}


def test_demo_runs_every_stage_and_stops_the_stack(tmp_path):
    workdir, report_path = tmp_path / "demo", tmp_path / "report.json"
    orphans_before = orphaned_ray_workers()
    # A separate process, as `make demo` runs it: the demo owns its Ray instance and servers from start to stop.
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--quick", "--workdir", str(workdir),
                           "--report", str(report_path)], cwd=REPO, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())

    # What a person reads: one line per stage and per epoch; Ray Data's per-dataset lines stay in its log file.
    console = done.stdout + done.stderr
    stages = ("corpus", "train", "evaluate", "promote", "score")
    assert all(f"[demo] {stage} done in" in done.stdout for stage in stages)
    assert "epoch 1/2: train loss" in console and "epoch 2/2: train loss" in console
    assert "execution finished" not in console
    assert "Failed to query Ray Train Controller actor state" not in console  # the dashboard is off on purpose

    assert "MPFT demo finished" in done.stdout and "infra.local_stack.mlflow_server --root" in done.stdout
    assert processes_mentioning(str(workdir)) == []  # the MLflow server (rooted in workdir) is gone
    # No Ray worker outlived the demo's Ray. (Another pytest worker's instance stopping right now may orphan its
    # workers for a moment, and its shutdown_ray ends them within 10 s: only those still there after 15 s count.)
    deadline = time.monotonic() + 15
    while (orphans := orphaned_ray_workers() - orphans_before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert orphans == set()
    # Every crawled file has exactly one score row; the three planted broken files are error rows.
    assert report["score_rows"] == report["crawl_files"] and report["score_errors"] == 3
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}")
    tags = client.get_model_version(MODEL_NAME, report["model_version"]).tags
    assert tags["gate.decision"] == ("promoted" if report["promoted"] else "refused")
    assert "gate.aligned-jpeg96.challenger_mean_acc" in tags  # gated on the format-aligned holdout too

    # The uncertain band flows from training (both thresholds calibrated on validation) to every score row.
    rows = read_scores(report["scores"]).filter(pc.is_null(pc.field("error"))).to_pylist()
    [(threshold, real_threshold)] = {(r["threshold"], r["real_threshold"]) for r in rows}
    assert real_threshold <= threshold
    for r in rows:
        band = "generated" if r["score"] >= threshold else "real" if r["score"] < real_threshold else "uncertain"
        assert r["verdict"] == band, r
    assert {"mpft-demo", "mpft-evaluation", "mpft-scoring"} <= {e.name for e in client.search_experiments()}

    # MLflow's artefacts went to the object store, as in production, and outlive it: started again on the demo's
    # data folder, it serves the registered model.
    assert not (workdir / "mlflow" / "artifacts").exists()
    with LocalS3Server(root=workdir / "s3") as s3:
        artefacts = storage.list_files(f"s3://{ARTIFACTS_BUCKET}/artifacts", s3.storage_config(), extensions=None)
    assert any(path.endswith("/MLmodel") for path in artefacts)
    assert any(path.endswith(".safetensors") for path in artefacts)
