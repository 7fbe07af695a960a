"""The real path to a cluster: `ray job submit` of `mpft train` and `mpft score` to a two-node Ray cluster.

The code is shipped in the job's runtime environment (a staged copy of the packages as `working_dir`); the nodes
only have the Python environment. Data and checkpoints live in the local S3 server, runs and the model in the
MLflow server, exactly as on a KubeRay or cloud cluster.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml
from mlflow import MlflowClient

from infra.local_stack.ray_cluster import LocalRayCluster
from pipelines.scoring import read_scores
from tests.helpers.images import BAD_CORPUS_MAX_PIXELS, write_bad_corpus, write_genimage_tree

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mpft_core", "pipelines", "jobs", "infra")


def stage_job_dir(dest: Path, config: dict) -> Path:
    """What a user ships with `ray job submit --working-dir`: the packages and the job config, nothing else."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / "train.yaml").write_text(yaml.safe_dump(config))
    return dest


def test_train_and_score_jobs_submitted_to_a_two_node_cluster(tmp_path, s3_server, mlflow_server):
    corpus = tmp_path / "corpus"
    write_genimage_tree(corpus / "genimage", subsets=("sdv14",), n_per_class=24, size=32, seed=21)
    expected = write_bad_corpus(corpus / "crawl")
    s3_server.create_bucket("cluster")
    s3_server.upload_dir(corpus, "s3://cluster")

    # Credentials travel as AWS_* variables in the job's runtime env, never in the shipped config.
    env = {**s3_server.env(), "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri}
    config = {
        "name": "cluster-tiny",
        "method": {"detector": {"backbone": {"name": "mpft-tiny-32", "pretrained": None}, "mask": {"ratio": 0.25}},
                   "optim": {"epochs": 1, "batch_size": 8}},
        "train": {"uri": "s3://cluster/genimage", "layout": "genimage", "split": "train"},
        "val": {"uri": "s3://cluster/genimage", "layout": "genimage", "split": "val"},
        "storage": {"endpoint_url": s3_server.endpoint_url, "region": s3_server.region},
        "checkpoint_root": "s3://cluster/checkpoints",
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.25},
        "tracking": {"experiment": "cluster-test", "registered_model": "cluster-test"},
    }
    job_dir = stage_job_dir(tmp_path / "job", config)
    assert s3_server.secret_key not in (job_dir / "train.yaml").read_text()

    with LocalRayCluster() as cluster:
        python = sys.executable
        train_id = cluster.submit_job(f"{python} -m jobs.cli train --config train.yaml", working_dir=str(job_dir),
                                      env_vars=env)
        status = cluster.wait_job(train_id, timeout=600)
        assert status == "SUCCEEDED", cluster.job_logs(train_id)[-4000:]

        score_id = cluster.submit_job(
            f"{python} -m jobs.cli score --model models:/cluster-test@challenger --input s3://cluster/crawl "
            f"--output s3://cluster/scores --actor-cpus 0.25 --max-pixels {BAD_CORPUS_MAX_PIXELS} "
            f"--s3-endpoint {s3_server.endpoint_url}",
            working_dir=str(job_dir), env_vars=env)
        status = cluster.wait_job(score_id, timeout=300)
        assert status == "SUCCEEDED", cluster.job_logs(score_id)[-4000:]
        logs = cluster.job_logs(train_id) + cluster.job_logs(score_id)

    assert s3_server.secret_key not in logs
    client = MlflowClient(mlflow_server.tracking_uri)
    version = client.get_model_version_by_alias("cluster-test", "challenger")
    assert client.get_run(version.run_id).info.run_name == "cluster-tiny"

    scores = read_scores("s3://cluster/scores", s3_server.storage_config())
    paths = scores.column("path").to_pylist()
    assert sorted(Path(p).name for p in paths) == sorted(expected)  # every crawled file, exactly once
    failed = {Path(p).name for p, e in zip(paths, scores.column("error").to_pylist()) if e is not None}
    assert failed == {name for name, ok in expected.items() if not ok}
    assert set(pc.unique(scores["model_version"]).to_pylist()) == {version.version}
