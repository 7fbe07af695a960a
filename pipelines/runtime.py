"""Starting or joining Ray, and stopping a local instance without leaving processes behind, in one place.

A bare ``ray.init()`` silently joins any cluster already running on the machine, so local runs (tests, the demo)
start a private instance with ``address="local"``; jobs meant for a cluster pass its address (or set RAY_ADDRESS).

``shutdown_ray`` (also run at exit for an instance this process started) makes sure no worker process of a private
instance outlives it. Ray normally ends its workers with the raylet, but a scoring actor of the demo was once found
still running, orphaned, half an hour after ``ray.shutdown()`` (1.1 GB held); so the raylet's processes are noted
before the shutdown and any still alive after a grace period are killed. Linux only (it reads /proc); elsewhere
this is a plain ``ray.shutdown()``.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import time
from pathlib import Path
from typing import NamedTuple, Optional

import ray

log = logging.getLogger(__name__)

# Offline hub: a mistaken pretrained download must fail at once instead of retrying for ~45 s per worker.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SHUTDOWN_GRACE_S = 10.0

_started_locally = False


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, runtime_env: Optional[dict] = None) -> None:
    """Start a private local Ray instance, or connect to ``address`` / ``RAY_ADDRESS`` when one is given."""
    global _started_locally
    if ray.is_initialized():
        return
    env = {"env_vars": dict(WORKER_ENV)}
    if runtime_env:
        env.update({k: v for k, v in runtime_env.items() if k != "env_vars"})
        env["env_vars"].update(runtime_env.get("env_vars", {}))
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # On a cluster the job's own runtime env (working_dir, env vars set at submission) must stay in force:
        # only an explicitly requested runtime env is passed, since it would replace the job's.
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=True)
        _started_locally = True
        atexit.register(shutdown_ray)  # runs before Ray's own exit hook (registered earlier, run later)


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


class Process(NamedTuple):
    """A process as /proc shows it; ``started`` (clock ticks after boot) tells a reused pid apart."""

    pid: int
    ppid: int
    started: int
    name: str


def _read_process(pid: int) -> Optional[Process]:
    """None when the process is gone, a zombie, or /proc is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The name sits in parentheses and may itself contain spaces or parentheses: split at the last ')'.
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return Process(pid=pid, ppid=int(fields[1]), started=int(fields[19]), name=name)


def _all_processes() -> list[Process]:
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    found = (_read_process(int(p.name)) for p in proc.iterdir() if p.name.isdigit())
    return [p for p in found if p is not None]


def local_ray_worker_processes() -> list[Process]:
    """Every process below the raylet(s) this process started: Ray's workers and whatever they started."""
    processes = _all_processes()
    children: dict[int, list[Process]] = {}
    for p in processes:
        children.setdefault(p.ppid, []).append(p)
    frontier = [p for p in children.get(os.getpid(), []) if p.name == "raylet"]
    below: list[Process] = []
    while frontier:
        below_next = [c for p in frontier for c in children.get(p.pid, [])]
        below.extend(below_next)
        frontier = below_next
    return below


def end_survivors(processes: list[Process], grace_s: float) -> list[int]:
    """Wait up to ``grace_s`` for ``processes`` to exit, then SIGKILL the ones still running; their pids."""
    def still_running(p: Process) -> bool:
        now = _read_process(p.pid)
        return now is not None and now.started == p.started

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
