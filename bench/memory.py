"""Peak resident memory of a benchmark's process, or of it and every process it started, sampled in a thread."""

from __future__ import annotations

import os
import threading
from collections.abc import Collection

from pipelines.processes import Process, descendants, resident_kib, running_processes


def process_tree(root: int, skip: Collection[int] = ()) -> list[Process]:
    """``root`` and every process below it, except those in ``skip`` and everything below them."""
    processes = running_processes()
    return [p for p in processes if p.pid == root] + descendants(root, processes, prune=skip)


class PeakRss:
    """Samples, in a thread every ``interval`` seconds, the summed RSS of this process and all its descendants (minus
    ``exclude``), or with ``tree=False`` of this process alone (the driver's own memory)."""

    def __init__(self, exclude: set[int] = frozenset(), interval: float = 0.2, tree: bool = True):
        self.exclude, self.interval, self.tree = set(exclude), interval, tree
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        pids = [p.pid for p in process_tree(os.getpid(), self.exclude)] if self.tree else [os.getpid()]
        self.peak_kib = max(self.peak_kib, sum(resident_kib(pid) for pid in pids))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024
