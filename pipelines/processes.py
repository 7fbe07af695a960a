"""Processes as Linux's /proc shows them, and the trees they form; where there is no /proc, every query finds none.

It lives in ``pipelines``: reaping a private Ray instance's stray workers is part of running a job, on any machine.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import NamedTuple, Optional

PROC = Path("/proc")
# Zombie (waiting for its parent to reap it) or dead: nothing left to stop or measure.
_EXITED_STATES = ("Z", "X")


class Process(NamedTuple):
    """One running process as /proc/<pid>/stat shows it; ``started`` (clock ticks after boot) tells a reused pid
    apart, ``cpu_ticks`` is its user + system time in ``os.sysconf("SC_CLK_TCK")`` ticks."""

    pid: int
    ppid: int
    started: int
    name: str
    cpu_ticks: int


def read_process(pid: int) -> Optional[Process]:
    """The process ``pid``; None when it is gone, has exited (a zombie), or /proc cannot be read."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The name sits in parentheses and may itself contain spaces or parentheses: split at the last ')'.
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in _EXITED_STATES:
        return None
    return Process(pid=pid, ppid=int(fields[1]), started=int(fields[19]), name=name,
                   cpu_ticks=int(fields[11]) + int(fields[12]))


def running_processes() -> list[Process]:
    """Every running process; none where there is no /proc (not Linux)."""
    if not PROC.is_dir():
        return []
    found = (read_process(int(entry.name)) for entry in PROC.iterdir() if entry.name.isdigit())
    return [p for p in found if p is not None]


def still_running(process: Process) -> bool:
    """True while ``process`` itself runs: its pid is alive and not taken over by a process started later."""
    now = read_process(process.pid)
    return now is not None and now.started == process.started


def descendants(pid: int, processes: Optional[list[Process]] = None, prune: Collection[int] = ()) -> list[Process]:
    """Every process below ``pid`` (its children, theirs, ...) among ``processes`` (default: those running now),
    ``pid`` itself not included; a process whose pid is in ``prune`` is left out with everything below it."""
    children: dict[int, list[Process]] = {}
    for p in running_processes() if processes is None else processes:
        children.setdefault(p.ppid, []).append(p)
    below: list[Process] = []
    seen, stack = {pid}, [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            # `seen`: /proc is not read atomically, so a reused pid can make the parent links loop.
            if child.pid not in prune and child.pid not in seen:
                seen.add(child.pid)
                below.append(child)
                stack.append(child.pid)
    return below


def command_line(pid: int) -> list[str]:
    """The arguments of ``pid`` (the new title of a process that renamed itself); empty if gone or not ours to read."""
    return _nul_separated(pid, "cmdline")


def environment(pid: int) -> list[str]:
    """The ``NAME=value`` entries ``pid`` was started with; empty if gone or not ours to read."""
    return _nul_separated(pid, "environ")


def resident_kib(pid: int) -> int:
    """The resident set size of ``pid`` in KiB (VmRSS); 0 if gone or a kernel thread."""
    try:
        with open(PROC / str(pid) / "status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _nul_separated(pid: int, name: str) -> list[str]:
    try:
        raw = (PROC / str(pid) / name).read_bytes()
    except OSError:
        return []
    return [item for item in raw.decode(errors="replace").split("\0") if item]
