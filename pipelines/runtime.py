"""Starting or joining Ray, and stopping a local instance without leaving processes behind, in one place.

A bare ``ray.init()`` silently joins any cluster already running on the machine, so local runs (tests, the demo)
start a private instance with ``address="local"``; jobs meant for a cluster pass its address (or set RAY_ADDRESS).

``shutdown_ray`` (also run at exit for an instance this process started) makes sure no worker process of a private
instance outlives it: a worker orphaned by ``ray.shutdown()`` keeps its memory until killed, so the raylet's
processes are noted before the shutdown and any still alive after a grace period are killed. Linux only (it reads
/proc through ``pipelines.processes``); elsewhere this is a plain ``ray.shutdown()``.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import ray

from pipelines.processes import Process, descendants, running_processes, still_running

log = logging.getLogger(__name__)

# Offline hub: a mistaken pretrained download must fail at once instead of retrying for ~45 s per worker.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SHUTDOWN_GRACE_S = 10.0
# Re-runs of a map task that met a transient object-store error, each after Ray Data's randomised exponential
# backoff (up to 2, 4, 8, 16 s).
STORE_RETRIES = 4
# Ray Data reads its logging configuration from the file this variable names, in every process that runs datasets.
RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"
QUIET_RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")

_started_locally = False


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, *, verbose: bool = False) -> None:
    """Start a private local Ray instance, or connect to ``address`` / ``RAY_ADDRESS`` when one is given; a no-op
    when Ray is already initialised.

    Unless ``verbose``, Ray Data keeps its progress bars and per-dataset start / plan / finish lines off the console
    (they stay in ``ray-data.log`` of the session): set here, before any dataset exists, because a dataset takes the
    driver's DataContext with it into Ray Train's workers and split coordinators.
    """
    global _started_locally
    if ray.is_initialized():
        return
    env_vars = dict(WORKER_ENV)
    prepare_data_driver(verbose=verbose)
    if not verbose:
        env_vars[RAY_DATA_LOGGING_ENV] = str(QUIET_RAY_DATA_LOGGING)
    address = address or os.environ.get("RAY_ADDRESS")
    callers_sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        # On a cluster the job's own runtime env (working_dir, env vars set at submission) must stay in force: a
        # runtime env passed here would replace it, so workers there keep Ray Data's default console logging.
        ray.init(address=address, log_to_driver=True)
    else:
        runtime_env = {"env_vars": env_vars}
        if not verbose:
            runtime_env["worker_process_setup_hook"] = f"{__name__}.{quiet_worker_logging.__name__}"
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=True)
        _started_locally = True
        atexit.register(shutdown_ray)  # runs before Ray's own exit hook (registered earlier, run later)
    keep_sigterm_handler(callers_sigterm)


# Ray Train's placement-group cleaner asks the State API, served by the dashboard, whether the train controller
# lives; a private instance runs without a dashboard, so it would warn about every check, once a second.
NEEDS_DASHBOARD_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logging() -> None:
    """Run in every worker process of a private instance (``worker_process_setup_hook``): silence the warnings that
    only say the dashboard is off. Without it the cleaner cannot tell and does nothing; the placement groups of a
    private instance end with it anyway, when the command stops Ray."""
    for name in NEEDS_DASHBOARD_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def keep_sigterm_handler(handler) -> None:
    """Put back the SIGTERM handler the caller had installed (the CLI's unwinds like Ctrl-C and says so), which
    ``ray.init`` replaces with an immediate ``sys.exit``; Ray's stays when the caller had none."""
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def prepare_data_driver(*, verbose: bool) -> None:
    """Ray Data settings of a process that creates datasets (the job's driver, or a sweep trial's driver task):
    transient store errors retried, and unless ``verbose`` a quiet console."""
    retry_transient_store_errors()
    if not verbose:
        quiet_ray_data_on_driver()


def quiet_ray_data_on_driver() -> None:
    """No progress bars and no execution-start lines for the datasets this process creates from now on, and Ray
    Data's console logging at warnings (the workers read the same file through ``RAY_DATA_LOGGING_ENV``)."""
    from ray.data import DataContext
    from ray.data._internal.logging import configure_logging  # what every Ray worker runs on that variable

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    os.environ[RAY_DATA_LOGGING_ENV] = str(QUIET_RAY_DATA_LOGGING)
    configure_logging()


def retry_transient_store_errors() -> None:
    """A decode task whose reads met a store restarting, throttling or failing briefly runs again (up to
    ``STORE_RETRIES`` times) before the dataset fails; credential errors fail at once."""
    from ray.data import DataContext

    from pipelines.store_errors import transient_error_patterns

    context = DataContext.get_current()
    context.retried_map_errors = transient_error_patterns()
    context.max_map_retries = STORE_RETRIES


def shutdown_ray(grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """``ray.shutdown()``; for a private instance this process started, also kill its worker processes (and
    theirs) that are still alive ``grace_s`` seconds later."""
    global _started_locally
    if not ray.is_initialized():
        return
    workers = local_ray_worker_processes() if _started_locally else []
    ray.shutdown()
    _started_locally = False
    killed = end_survivors(workers, grace_s)
    if killed:
        log.warning("%d Ray worker process(es) outlived ray.shutdown() by %.0f s and were killed: pids %s",
                    len(killed), grace_s, killed)


def local_ray_worker_processes() -> list[Process]:
    """Every process below the raylet(s) this process started: Ray's workers and whatever they started."""
    processes = running_processes()
    raylets = [p for p in processes if p.ppid == os.getpid() and p.name == "raylet"]
    return [worker for raylet in raylets for worker in descendants(raylet.pid, processes)]


def end_survivors(processes: list[Process], grace_s: float) -> list[int]:
    """Wait up to ``grace_s`` for ``processes`` to exit, then SIGKILL the ones still running (a pid now taken by a
    process started later is left alone); their pids."""
    deadline = time.monotonic() + grace_s
    survivors = [p for p in processes if still_running(p)]
    while survivors and time.monotonic() < deadline:
        time.sleep(0.1)
        survivors = [p for p in survivors if still_running(p)]
    killed = []
    for p in survivors:
        try:
            os.kill(p.pid, signal.SIGKILL)
            killed.append(p.pid)
        except ProcessLookupError:
            pass
    return killed
