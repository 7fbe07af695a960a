"""A real two-node Ray cluster on this machine: a head node and a worker node, each a ``ray start --block`` process.

    with LocalRayCluster() as cluster:
        job_id = cluster.submit_job(cluster.python_entrypoint("job.py"), working_dir="/path/to/dir")
        assert cluster.wait_job(job_id, timeout=120) == "SUCCEEDED", cluster.job_logs(job_id)

    python -m infra.local_stack.ray_cluster up      # foreground; prints the address, dashboard and token; Ctrl-C stops
    python -m infra.local_stack.ray_cluster down --root /tmp/rcXXXX   # kill what is left of a cluster by its temp dir

Unlike ``ray.init(address="local")`` this exercises what a production cluster does: jobs are submitted through the
dashboard's job server, the working directory is uploaded as a package, and tasks cross node boundaries. The worker
node carries a custom resource ``worker_node`` so a task can be pinned to it.

Why it is shaped this way:
* Other Ray instances may run on the same machine (a test's private one, another user's), so every port Ray would
  otherwise take from a fixed default (GCS 6379, dashboard 8265, client server 10001, agent 52365, worker ports
  10002-19999) is either asked from the OS or set to 0 (Ray then binds a random port), and each node has its own
  ``--temp-dir``. ``ray stop`` is never used: it kills every Ray process on the machine.
* ``--node-ip-address=127.0.0.1`` on both nodes: otherwise they pick a non-loopback address and cannot reach each other.
* SIGTERM to a ``ray start --block`` process leaves gcs_server, raylet, dashboard and agents running. Each node gets its
  own session (process group); ``stop`` signals both groups, then scans /proc (``pipelines.processes``) for any
  process of this cluster and verifies that none is left. Workers and agents rename themselves ("ray::IDLE"), so a
  process is recognised by a marker variable inherited from the node's environment (or its command line naming the
  cluster's temp dir).
* Ray 2.60 turns on token authentication whenever ``~/.ray/auth_token`` exists (which any ``ray.init`` writes). Rather
  than depending on that shared file, the cluster runs with ``RAY_AUTH_MODE=token`` and a private random
  ``RAY_AUTH_TOKEN`` in its environment; the job client here sends it as a bearer header. The calling process's own
  environment is left untouched, so a private ``ray.init`` in the same process keeps working.
* A job's entrypoint runs a shell on the node; the nodes get the venv's ``bin`` first on PATH, and
  ``python_entrypoint`` names ``sys.executable`` explicitly, so jobs never fall back to the system interpreter.
* Unix socket paths are limited to 107 bytes and Ray nests ``session_<timestamp>_<pid>/sockets/...`` under the temp
  dir, so the temp dir is a short ``mkdtemp`` under /tmp, not pytest's long ``tmp_path``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from infra.local_stack.process_group import HOST, GroupProcess, log_tail, reserve_free_ports
from pipelines.processes import command_line, environment, running_processes

log = logging.getLogger(__name__)

WORKER_RESOURCE = "worker_node"
TERMINAL_JOB_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}
# Socket files end up ~65 bytes below the node's temp dir (session_<date>_<time>_<usec>_<pid>/sockets/plasma_store).
MAX_TEMP_ROOT_CHARS = 36
# Ports each node would otherwise take from fixed defaults shared with every other Ray on the machine.
_PER_NODE_PORTS = ("agent_http", "agent_grpc", "runtime_env", "metrics", "om", "nm")
# Set in every node's environment to this cluster's temp dir; inherited by all its processes, found again via /proc.
CLUSTER_MARKER_VAR = "MPFT_LOCAL_RAY_CLUSTER"
# Variables a parent process may carry from another Ray instance (a driver, a worker, a test's private ray.init).
# Inherited, they would point the nodes or their jobs at that other instance or at the wrong token.
_LEAKY_RAY_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_JOB_ID",
                   "RAY_RAYLET_PID", "RAY_NODE_ID", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_RUNTIME_ENV_HOOK")


def venv_bin_dir() -> Path:
    """The directory holding this interpreter and its console scripts (``ray``, ``mpft``)."""
    return Path(sys.executable).parent


class NodeExitedDuringStartup(RuntimeError):
    """A node's ``ray start`` exited before the cluster was up."""


def _names_dir(args: list[str], directory: str) -> bool:
    """True if an argument is ``directory`` or a path inside it (also as ``--flag=<path>``), not a sibling prefix."""
    for arg in args:
        for candidate in (arg, arg.split("=", 1)[-1]):
            if candidate == directory or candidate.startswith(directory + "/"):
                return True
    return False


def _belongs_to(pid: int, temp_root: str) -> bool:
    # Workers and agents rename themselves (setproctitle: "ray::IDLE", "ray::RuntimeEnvAgent"), so their command
    # line no longer names the temp dir; the marker variable inherited from the node's environment still does.
    if f"{CLUSTER_MARKER_VAR}={temp_root}" in environment(pid):
        return True
    return _names_dir(command_line(pid), temp_root)


def live_processes_of(temp_root: str) -> list[int]:
    """Sorted pids of the running processes (zombies have nothing left to stop) of the cluster rooted at
    ``temp_root``: raylet, gcs_server, dashboard, agents, workers, job drivers; this process never counts."""
    own = os.getpid()
    return sorted(p.pid for p in running_processes() if p.pid != own and _belongs_to(p.pid, temp_root))


def kill_processes_of(temp_root: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process of the cluster at ``temp_root``; returns the pids still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        alive = live_processes_of(temp_root)
        if not alive or time.monotonic() >= deadline:
            return alive
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.2)


class LocalRayCluster:
    """Head + one worker node on 127.0.0.1; context manager or explicit ``start()``/``stop()``.

    Attributes (valid once constructed; the cluster answers on them after ``start()``):
        address: ``127.0.0.1:<gcs port>`` — what ``ray.init(address=...)`` or ``RAY_ADDRESS`` on the cluster take.
        dashboard_url: ``http://127.0.0.1:<dashboard port>`` — the job server.
        temp_root: this cluster's private temp dir (node temp dirs, node logs); removed by ``stop()`` unless
            ``keep_temp``.
        auth_token: the cluster's bearer token (``RAY_AUTH_TOKEN``); ``None`` when ``auth=False``.
    """

    def __init__(
        self,
        num_cpus_per_node: int = 1,
        worker_resources: Optional[dict] = None,
        object_store_mb: int = 256,
        env: Optional[dict] = None,
        temp_parent: Optional[str] = None,
        auth: bool = True,
        keep_temp: bool = False,
        startup_timeout: float = 120.0,
    ):
        self.num_cpus_per_node = num_cpus_per_node
        self.worker_resources = dict(worker_resources or {WORKER_RESOURCE: 1})
        self.object_store_bytes = object_store_mb * 1024 * 1024
        self.extra_env = dict(env or {})
        self.keep_temp = keep_temp
        self.startup_timeout = startup_timeout
        self.auth_token = secrets.token_hex(24) if auth else None
        self.temp_root = tempfile.mkdtemp(prefix="rc", dir=temp_parent or "/tmp")
        if len(self.temp_root) > MAX_TEMP_ROOT_CHARS:
            shutil.rmtree(self.temp_root, ignore_errors=True)
            raise ValueError(f"temp dir {self.temp_root!r} is longer than {MAX_TEMP_ROOT_CHARS} characters; Ray's "
                             "Unix socket paths below it would exceed 107 bytes. Pass a shorter temp_parent.")
        self._assign_ports()
        self._nodes: list[GroupProcess] = []
        self._client = None

    def _assign_ports(self) -> None:
        names = ["gcs", "dashboard", "client_server",
                 *(f"{role}_{port}" for role in ("head", "worker") for port in _PER_NODE_PORTS)]
        self._ports = dict(zip(names, reserve_free_ports(len(names)), strict=True))
        self.address = f"{HOST}:{self._ports['gcs']}"
        self.dashboard_url = f"http://{HOST}:{self._ports['dashboard']}"

    # --- commands and environment -------------------------------------------------------------------------------
    def _node_args(self, role: str) -> list[str]:
        p = self._ports
        temp_dir = str(Path(self.temp_root) / role[0])  # "h" / "w": short, one per node
        return [
            "--node-ip-address", HOST,
            "--num-cpus", str(self.num_cpus_per_node),
            "--num-gpus", "0",
            "--object-store-memory", str(self.object_store_bytes),
            "--temp-dir", temp_dir,
            "--object-manager-port", str(p[f"{role}_om"]),
            "--node-manager-port", str(p[f"{role}_nm"]),
            # 0/0: every worker process binds a port the OS picks, instead of the shared default range 10002-19999.
            "--min-worker-port", "0", "--max-worker-port", "0",
            "--dashboard-agent-listen-port", str(p[f"{role}_agent_http"]),
            "--dashboard-agent-grpc-port", str(p[f"{role}_agent_grpc"]),
            "--runtime-env-agent-port", str(p[f"{role}_runtime_env"]),
            "--metrics-export-port", str(p[f"{role}_metrics"]),
            "--disable-usage-stats",
            "--block",
        ]  # fmt: skip

    def head_command(self) -> list[str]:
        return [
            str(venv_bin_dir() / "ray"), "start", "--head",
            "--port", str(self._ports["gcs"]),
            "--ray-client-server-port", str(self._ports["client_server"]),
            "--include-dashboard", "true",
            "--dashboard-host", HOST,
            "--dashboard-port", str(self._ports["dashboard"]),
            *self._node_args("head"),
        ]  # fmt: skip

    def worker_command(self) -> list[str]:
        return [
            str(venv_bin_dir() / "ray"), "start",
            "--address", self.address,
            "--resources", json.dumps(self.worker_resources),
            *self._node_args("worker"),
        ]  # fmt: skip

    def node_environment(self) -> dict:
        """What the node processes (and so the job drivers and workers they spawn) see."""
        env = {k: v for k, v in os.environ.items() if k not in _LEAKY_RAY_VARS}
        # Jobs' `python`/`mpft` resolve to this venv, not to whatever interpreter the machine has first on PATH.
        env["PATH"] = os.pathsep.join([str(venv_bin_dir()), env.get("PATH", "")])
        env["VIRTUAL_ENV"] = str(venv_bin_dir().parent)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # The head waits this long for its dashboard (Ray's default 60 s), which a loaded machine can exceed.
        env.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", str(max(60, int(self.startup_timeout))))
        if self.auth_token:
            env["RAY_AUTH_MODE"] = "token"
            env["RAY_AUTH_TOKEN"] = self.auth_token
        else:
            env["RAY_AUTH_MODE"] = "disabled"
        env.update(self.extra_env)
        env[CLUSTER_MARKER_VAR] = self.temp_root
        return env

    def auth_headers(self) -> dict:
        return {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}

    @staticmethod
    def python_entrypoint(*args: str) -> str:
        """A job entrypoint running this venv's interpreter: ``python_entrypoint("job.py", "--n", "3")``."""
        return shlex.join([sys.executable, *args])

    @staticmethod
    def venv_entrypoint(script: str, *args: str) -> str:
        """A job entrypoint running one of this venv's console scripts: ``venv_entrypoint("mpft", "train", ...)``."""
        return shlex.join([str(venv_bin_dir() / script), *args])

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> LocalRayCluster:
        """Start head then worker; block until both nodes are alive and the job server answers. A node that exits
        while starting gets one more try on fresh ports: Ray gives a raylet a fixed 30 s to register, which a loaded
        machine can miss."""
        if self._nodes:
            raise RuntimeError("cluster already started")
        try:
            return self._start_nodes()
        except NodeExitedDuringStartup as err:
            log.warning("Ray cluster %s did not start; trying once more on fresh ports:\n%s", self.temp_root, err)
            self._assign_ports()
            return self._start_nodes()

    def _start_nodes(self) -> LocalRayCluster:
        Path(self.temp_root).mkdir(mode=0o700, exist_ok=True)  # a failed attempt's stop() removed it
        env = self.node_environment()
        try:
            head = GroupProcess("head node", self.head_command(), Path(self.temp_root) / "head.log", env=env)
            self._nodes.append(head)
            self._wait_for(lambda: self._alive_node_count() >= 1, "head node")
            worker = GroupProcess("worker node", self.worker_command(), Path(self.temp_root) / "worker.log", env=env)
            self._nodes.append(worker)
            self._wait_for(lambda: self._alive_node_count() >= 2, "worker node")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            for node in self._nodes:
                if node.exited() is not None:
                    raise NodeExitedDuringStartup(f"while waiting for the {what}: {node.failure()}")
            if condition():
                return
            time.sleep(0.5)
        logs = "\n".join(f"--- {n.name} ---\n{log_tail(n.log_path)}" for n in self._nodes)
        raise RuntimeError(f"{what} not up after {self.startup_timeout:.0f} s ({self.dashboard_url}):\n{logs}")

    def _alive_node_count(self) -> int:
        try:
            return len(self.nodes())
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError, KeyError):
            return 0  # dashboard not serving yet

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop both nodes (whole process groups), kill any stray process of this cluster, verify none is left.

        SIGTERM first; what is still running after ``grace_seconds`` gets SIGKILL (gcs_server and the ``ray start``
        parent are slow to honour SIGTERM, and a throwaway cluster has nothing worth draining).
        Raises RuntimeError if a process of this cluster survives SIGKILL.
        """
        for node in self._nodes:
            node.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for node in self._nodes:
            if not node.wait_group_gone(max(0.0, deadline - time.monotonic())):
                node.signal_group(signal.SIGKILL)
        for node in self._nodes:
            node.wait_group_gone(5.0)
        self._nodes = []
        self._client = None
        # Processes that left the nodes' groups (or were started by an agent) carry the marker variable.
        survivors = kill_processes_of(self.temp_root)
        if survivors:
            raise RuntimeError(f"processes of Ray cluster {self.temp_root} survived SIGKILL: {survivors}")
        if not self.keep_temp:
            shutil.rmtree(self.temp_root, ignore_errors=True)

    def leftover_processes(self) -> list[int]:
        """Live (non-zombie) processes of this cluster; empty after ``stop()``."""
        return live_processes_of(self.temp_root)

    def is_running(self) -> bool:
        return len(self._nodes) == 2 and all(node.exited() is None for node in self._nodes)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- cluster state ------------------------------------------------------------------------------------------
    def _get_json(self, path: str, timeout: float = 5.0) -> dict:
        request = urllib.request.Request(self.dashboard_url + path, headers=self.auth_headers())
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def nodes(self) -> list[dict]:
        """Alive nodes (state API rows: ``node_id``, ``is_head_node``, ``resources_total``, ...)."""
        payload = self._get_json("/api/v0/nodes?limit=100&detail=true")
        rows = payload["data"]["result"]["result"]
        return [row for row in rows if row.get("state") == "ALIVE"]

    def worker_node_id(self) -> str:
        return next(n["node_id"] for n in self.nodes() if WORKER_RESOURCE in n.get("resources_total", {}))

    def head_node_id(self) -> str:
        return next(n["node_id"] for n in self.nodes() if n.get("is_head_node"))

    # --- jobs ---------------------------------------------------------------------------------------------------
    def job_client(self):
        """A ``JobSubmissionClient`` for this cluster (token sent as a header; the caller's env is not touched)."""
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.dashboard_url, headers=self.auth_headers())
        return self._client

    def submit_job(
        self,
        entrypoint: str,
        working_dir: Optional[str] = None,
        runtime_env: Optional[dict] = None,
        env_vars: Optional[dict] = None,
        submission_id: Optional[str] = None,
    ) -> str:
        """Submit ``entrypoint`` (a shell command run on the head); ``working_dir`` is uploaded and becomes its cwd.

        ``env_vars`` are merged into ``runtime_env["env_vars"]`` (they reach the driver and every task/actor).
        """
        env = dict(runtime_env or {})
        if working_dir is not None:
            env["working_dir"] = str(working_dir)
        merged_vars = {"HF_HUB_OFFLINE": "1", **env.get("env_vars", {}), **(env_vars or {})}
        env["env_vars"] = {k: str(v) for k, v in merged_vars.items()}
        return self.job_client().submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id)

    def job_status(self, job_id: str) -> str:
        return str(self.job_client().get_job_status(job_id).value)

    def wait_job(self, job_id: str, timeout: float = 300.0, poll_seconds: float = 1.0) -> str:
        """Block until the job is SUCCEEDED/FAILED/STOPPED and return that; TimeoutError (with logs) otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.job_status(job_id)
            if status in TERMINAL_JOB_STATES:
                return status
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f} s; logs:\n"
                                   f"{self.job_logs(job_id)[-4000:]}")
            time.sleep(poll_seconds)

    def job_logs(self, job_id: str) -> str:
        return self.job_client().get_job_logs(job_id)

    def job_info(self, job_id: str):
        return self.job_client().get_job_info(job_id)

    def stop_job(self, job_id: str) -> bool:
        return self.job_client().stop_job(job_id)


# --- command line -------------------------------------------------------------------------------------------------
def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _up(args: argparse.Namespace) -> int:
    cluster = LocalRayCluster(num_cpus_per_node=args.num_cpus, keep_temp=args.keep_temp)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    with cluster:
        print(f"Ray cluster ready: 2 nodes, temp dir {cluster.temp_root}", flush=True)
        print(f"export RAY_ADDRESS={cluster.dashboard_url}", flush=True)
        if cluster.auth_token:
            print(f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN={cluster.auth_token}", flush=True)
        print(f"ray job submit --working-dir <dir> -- {shlex.quote(sys.executable)} <script.py>", flush=True)
        try:
            while cluster.is_running():
                time.sleep(1.0)
            print("a node exited; stopping", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("stopping", flush=True)
    return 0


def _down(args: argparse.Namespace) -> int:
    root = str(Path(args.root).resolve())
    survivors = kill_processes_of(root)
    if survivors:
        print(f"could not kill: {survivors}", file=sys.stderr)
        return 1
    print(f"no process of {root} left", flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="A two-node Ray cluster on 127.0.0.1 (never touches other Rays).")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start head + worker in the foreground; Ctrl-C or SIGTERM stops both")
    up.add_argument("--num-cpus", type=int, default=1, help="CPUs per node")
    up.add_argument("--keep-temp", action="store_true", help="keep the temp dir (node logs) after stopping")
    up.set_defaults(_run=_up)
    down = sub.add_parser("down", help="kill what is left of a cluster, found by its temp dir (e.g. after kill -9)")
    down.add_argument("--root", required=True, help="the cluster's temp dir, as printed by `up`")
    down.set_defaults(_run=_down)
    args = parser.parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
