"""The local two-node Ray cluster: jobs submitted through the dashboard run on both nodes (a probe job, then the
real `mpft train` and `mpft score`), and stopping the cluster leaves nothing behind.

The ``ray_cluster`` fixture is module-scoped: the job tests share one cluster start, which takes a while.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml
from mlflow import MlflowClient

from infra.local_stack.ray_cluster import LocalRayCluster
from pipelines.processes import command_line
from pipelines.scoring import read_scores
from tests.helpers.images import BAD_CORPUS_MAX_PIXELS, write_bad_corpus, write_genimage_tree

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# The job's driver prints one line starting with this marker, holding what the test checks.
RESULT_MARKER = "JOB_RESULT "

JOB_SCRIPT = textwrap.dedent(
    '''
    """Runs inside the cluster: one task pinned to each node, plus a small Ray Data pipeline."""
    import json
    import os
    import sys
    from pathlib import Path

    import ray

    ray.init()  # the job server sets RAY_ADDRESS to this cluster


    @ray.remote(num_cpus=0.25)
    def where_am_i():
        # Read from the uploaded working dir: proves the package was shipped to whichever node runs this.
        payload = Path("payload.txt").read_text().strip()
        return {"node_id": ray.get_runtime_context().get_node_id(), "payload": payload,
                "probe": os.environ.get("MPFT_PROBE"), "python": sys.executable}


    on_worker = where_am_i.options(resources={"worker_node": 0.1}).remote()
    on_head = where_am_i.options(resources={"node:__internal_head__": 0.01}).remote()
    worker, head = ray.get([on_worker, on_head], timeout=120)

    doubled = ray.data.range(16, override_num_blocks=4).map_batches(
        lambda batch: {"id": batch["id"] * 2}, num_cpus=0.25, batch_size=4
    )
    total = int(doubled.sum("id"))

    print("JOB_RESULT " + json.dumps({"worker": worker, "head": head, "data_sum": total,
                                      "driver_python": sys.executable}), flush=True)
    '''
)


@pytest.fixture(scope="module")
def ray_cluster():
    """A started two-node cluster, stopped (and checked for leftovers by ``stop``) after the module's tests."""
    with LocalRayCluster() as cluster:
        yield cluster


def _job_result(logs: str) -> dict:
    lines = [line for line in logs.splitlines() if line.startswith(RESULT_MARKER)]
    assert lines, f"the job printed no result line; logs:\n{logs[-4000:]}"
    return json.loads(lines[-1][len(RESULT_MARKER):])


def _accepts_connections(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


# First in the module, before the shared `ray_cluster` starts: one cluster at a time leaves the cores to the jobs.
@pytest.mark.timeout(300)
def test_stop_leaves_no_process_of_the_cluster(tmp_path):
    cluster = LocalRayCluster().start()
    try:
        assert len(cluster.nodes()) == 2
        (tmp_path / "task.py").write_text(
            "import ray\nray.init()\n"
            "print(ray.get(ray.remote(num_cpus=0.25, resources={'worker_node': 0.1})(lambda: 1).remote()))\n"
        )
        job_id = cluster.submit_job(cluster.python_entrypoint("task.py"), working_dir=str(tmp_path))
        assert cluster.wait_job(job_id, timeout=120) == "SUCCEEDED", cluster.job_logs(job_id)
        running = cluster.leftover_processes()
        # the two `ray start` parents, gcs_server, two raylets, ... and Ray workers, which rename themselves
        # ("ray::IDLE"): found through the marker in their environment, not their command line
        assert len(running) >= 5
        assert any(" ".join(command_line(pid)).startswith("ray::") for pid in running)
    finally:
        cluster.stop()
    assert cluster.leftover_processes() == []
    assert not _accepts_connections(cluster.address)
    assert not Path(cluster.temp_root).exists()


@pytest.mark.timeout(300)
def test_job_runs_tasks_and_ray_data_on_both_nodes(ray_cluster, tmp_path):
    nodes = ray_cluster.nodes()
    assert len(nodes) == 2
    head_id, worker_id = ray_cluster.head_node_id(), ray_cluster.worker_node_id()
    assert head_id != worker_id

    # Written here, so the job can only see it through the uploaded working_dir.
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "job.py").write_text(JOB_SCRIPT)
    (job_dir / "payload.txt").write_text("shipped-with-the-job\n")

    job_id = ray_cluster.submit_job(
        ray_cluster.python_entrypoint("job.py"), working_dir=str(job_dir), env_vars={"MPFT_PROBE": "from-runtime-env"}
    )
    status = ray_cluster.wait_job(job_id, timeout=240)
    logs = ray_cluster.job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]

    result = _job_result(logs)
    assert result["worker"]["node_id"] == worker_id
    assert result["head"]["node_id"] == head_id
    assert result["data_sum"] == 2 * sum(range(16))
    for task in (result["worker"], result["head"]):
        assert task["payload"] == "shipped-with-the-job"
        assert task["probe"] == "from-runtime-env"
        assert task["python"] == sys.executable  # the venv, not the machine's python
    assert result["driver_python"] == sys.executable


@pytest.mark.timeout(300)
def test_failing_job_reports_failed_with_its_output(ray_cluster, tmp_path):
    (tmp_path / "fail.py").write_text("import sys\nprint('about to fail')\nsys.exit(3)\n")
    job_id = ray_cluster.submit_job(ray_cluster.python_entrypoint("fail.py"), working_dir=str(tmp_path))
    assert ray_cluster.wait_job(job_id, timeout=120) == "FAILED"
    assert "about to fail" in ray_cluster.job_logs(job_id)


@pytest.mark.timeout(60)
def test_cluster_refuses_requests_without_its_token(ray_cluster):
    # Other users and sessions on the machine can reach 127.0.0.1: the private token keeps them out.
    request = urllib.request.Request(ray_cluster.dashboard_url + "/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 401
    wrong = urllib.request.Request(request.full_url, headers={"Authorization": "Bearer not-the-token"})
    with pytest.raises(urllib.error.HTTPError) as forbidden:
        urllib.request.urlopen(wrong, timeout=5)
    assert forbidden.value.code == 403

# ------------------------------------------------------------------------------------------------------------
# The real path to a cluster: `ray job submit` of `mpft train` and `mpft score` to the two-node cluster.
# The code is shipped in the job's runtime environment (a staged copy of the packages as `working_dir`); the nodes
# only have the Python environment. Data and checkpoints live in the local S3 server, runs and the model in the
# MLflow server, exactly as on a KubeRay or cloud cluster.

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mpft_core", "pipelines", "jobs", "infra")


def stage_job_dir(dest: Path, config: dict) -> Path:
    """What a user ships with `ray job submit --working-dir`: the packages and the job config, nothing else."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / "train.yaml").write_text(yaml.safe_dump(config))
    return dest


@pytest.mark.timeout(900)
def test_train_and_score_jobs_submitted_to_a_two_node_cluster(ray_cluster, tmp_path, s3_server, mlflow_server):
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

    python = sys.executable
    train_id = ray_cluster.submit_job(f"{python} -m jobs.cli train --config train.yaml",
                                      working_dir=str(job_dir), env_vars=env)
    status = ray_cluster.wait_job(train_id, timeout=600)
    assert status == "SUCCEEDED", ray_cluster.job_logs(train_id)[-4000:]

    score_id = ray_cluster.submit_job(
        f"{python} -m jobs.cli score --model models:/cluster-test@challenger --input s3://cluster/crawl "
        f"--output s3://cluster/scores --actor-cpus 0.25 --max-pixels {BAD_CORPUS_MAX_PIXELS} "
        f"--s3-endpoint {s3_server.endpoint_url}",
        working_dir=str(job_dir), env_vars=env)
    status = ray_cluster.wait_job(score_id, timeout=300)
    assert status == "SUCCEEDED", ray_cluster.job_logs(score_id)[-4000:]
    logs = ray_cluster.job_logs(train_id) + ray_cluster.job_logs(score_id)

    assert s3_server.secret_key not in logs
    client = MlflowClient(mlflow_server.tracking_uri)
    version = client.get_model_version_by_alias("cluster-test", "challenger")
    assert client.get_run(version.run_id).info.run_name == "cluster-tiny"

    scores = read_scores("s3://cluster/scores", s3_server.storage_config())
    paths = scores.column("path").to_pylist()
    assert sorted(Path(p).name for p in paths) == sorted(expected)  # every crawled file, exactly once
    failed = {Path(p).name for p, e in zip(paths, scores.column("error").to_pylist(), strict=True) if e is not None}
    assert failed == {name for name, ok in expected.items() if not ok}
    assert set(pc.unique(scores["model_version"]).to_pylist()) == {version.version}
