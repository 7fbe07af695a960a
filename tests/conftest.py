"""Shared fixtures: the real local stack (S3 server, MLflow server, private Ray), started and stopped by the tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server process on 127.0.0.1 (a real store, never an in-process mock: Ray workers and PyArrow's
    C++ client must reach it)."""
    from infra.local_stack.s3 import LocalS3Server

    with LocalS3Server(root=tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """An MLflow tracking server with a sqlite backend and local artifact store."""
    from infra.local_stack.mlflow_server import LocalMlflowServer

    # 10-17 s here when idle; the fixture starts while the other pytest worker trains, so give it room.
    with LocalMlflowServer(root=tmp_path_factory.mktemp("mlflow"), startup_timeout=180) as server:
        yield server


@pytest.fixture(scope="session")
def ray_local():
    """A private Ray instance for the whole session (starting Ray costs seconds; tests share it); its users are
    marked ``ray`` by ``pytest_collection_modifyitems``."""
    from pipelines.runtime import init_ray, shutdown_ray

    init_ray(num_cpus=2)
    yield
    shutdown_ray()


@pytest.hookimpl(tryfirst=True)  # the marks must be in place before `-m` deselects by them
def pytest_collection_modifyitems(items):
    """Every test using ``ray_local`` (directly or through another fixture) is marked ``ray``; then the files holding
    end-to-end (``slow``) tests go first, those with the most end-to-end and Ray tests first, in a stable order.

    ``make test`` runs two pytest workers that take whole files (``-n 2 --dist loadfile``); they hand out files in
    collection order, so the long files start early and the short ones fill in at the end.
    """
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
    weight: dict = {}
    for item in items:
        heavy = 2 * bool(item.get_closest_marker("slow")) + bool(item.get_closest_marker("ray"))
        weight[item.path] = weight.get(item.path, 0) + heavy
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path not in slow_files, -weight[item.path]))
