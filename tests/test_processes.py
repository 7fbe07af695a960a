"""Reading processes and their trees from /proc (pipelines/processes.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import processes
from pipelines.processes import (
    command_line,
    descendants,
    environment,
    read_process,
    resident_kib,
    running_processes,
    still_running,
)

linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")

# A child that starts two grandchildren and waits for them.
PARENT_OF_TWO = "import subprocess, time; [subprocess.Popen(['sleep', '60']) for _ in range(2)]; time.sleep(60)"


def _wait_for(condition, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return found


@pytest.fixture
def parent_of_two():
    """A child process (Popen) whose two children are running; killed with them afterwards."""
    child = subprocess.Popen([sys.executable, "-c", PARENT_OF_TWO], env={**os.environ, "MPFT_PROCESS_PROBE": "yes"},
                             start_new_session=True)
    try:
        _wait_for(lambda: len(descendants(child.pid)) == 2)
        yield child
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


@linux_only
def test_this_process_is_read_with_its_parent_start_time_and_cpu_time():
    me = read_process(os.getpid())

    assert me.pid == os.getpid() and me.ppid == os.getppid()
    assert me.started > 0 and me.name
    assert me.pid in {p.pid for p in running_processes()}
    started_cpu = time.process_time()
    while time.process_time() - started_cpu < 0.3:  # busy: CPU time the reading must show
        pass
    assert read_process(os.getpid()).cpu_ticks - me.cpu_ticks >= 0.2 * os.sysconf("SC_CLK_TCK")


@linux_only
def test_a_tree_holds_children_and_grandchildren_and_a_pruned_child_takes_its_subtree_along(parent_of_two):
    grandchildren = descendants(parent_of_two.pid)
    subtree = {parent_of_two.pid, *(p.pid for p in grandchildren)}

    assert [(p.name, p.ppid) for p in grandchildren] == [("sleep", parent_of_two.pid)] * 2
    assert subtree <= {p.pid for p in descendants(os.getpid())}
    assert not subtree & {p.pid for p in descendants(os.getpid(), prune={parent_of_two.pid})}


@linux_only
def test_command_line_environment_and_memory_of_a_child(parent_of_two):
    assert command_line(parent_of_two.pid) == [sys.executable, "-c", PARENT_OF_TWO]
    assert "MPFT_PROCESS_PROBE=yes" in environment(parent_of_two.pid)
    assert resident_kib(parent_of_two.pid) > 4096  # a Python interpreter that imported subprocess: several MiB


@linux_only
def test_an_exited_process_reads_as_gone_before_and_after_it_is_reaped():
    child = subprocess.Popen(["true"])
    noted = read_process(child.pid)  # None if it has already exited
    _wait_for(lambda: read_process(child.pid) is None)  # a zombie: exited, not yet reaped

    assert child.poll() == 0  # reaped now
    assert read_process(child.pid) is None
    assert noted is None or not still_running(noted)
    assert (command_line(child.pid), environment(child.pid), resident_kib(child.pid)) == ([], [], 0)


@linux_only
def test_a_pid_taken_over_by_a_later_process_is_not_the_process_that_was_noted():
    me = read_process(os.getpid())

    assert still_running(me)
    assert not still_running(me._replace(started=me.started - 1))


def test_a_name_with_spaces_and_parentheses_is_read_whole(tmp_path, monkeypatch):
    # Fields after the name, numbered from 3 as in proc(5): state, ppid, ... utime (14), stime (15), ... starttime (22)
    after_name = ["S", "1"] + ["0"] * 9 + ["7", "5"] + ["0"] * 6 + ["4242"] + ["0"] * 20
    (tmp_path / "123").mkdir()
    (tmp_path / "123" / "stat").write_text(f"123 (a (b) c) {' '.join(after_name)}\n")
    monkeypatch.setattr(processes, "PROC", tmp_path)

    assert read_process(123) == processes.Process(pid=123, ppid=1, started=4242, name="a (b) c", cpu_ticks=12)
    assert [p.pid for p in running_processes()] == [123]


def test_without_proc_every_query_finds_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(processes, "PROC", tmp_path / "absent")

    assert running_processes() == [] and descendants(os.getpid()) == []
    assert read_process(os.getpid()) is None
    assert (command_line(os.getpid()), environment(os.getpid()), resident_kib(os.getpid())) == ([], [], 0)
