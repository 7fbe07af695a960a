"""Starting or joining Ray, in one place.

A bare ``ray.init()`` silently joins any cluster already running on the machine, so local runs (tests, the demo)
start a private instance with ``address="local"``; jobs meant for a cluster pass its address (or set RAY_ADDRESS).
"""

from __future__ import annotations

import os
from typing import Optional

import ray

# Offline hub: a mistaken pretrained download must fail at once instead of retrying for ~45 s per worker.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, runtime_env: Optional[dict] = None) -> None:
    """Start a private local Ray instance, or connect to ``address`` / ``RAY_ADDRESS`` when one is given."""
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
