"""Full garbage collections at moments the daemon chooses, not in the middle of a reconnect storm.

CPython collects its oldest generation whenever the objects promoted into it since the last full
collection outnumber a quarter of those already there, and a full collection scans all of them while
the reactor answers nothing. A controller holding 5,000 agent sockets keeps ~1.5 M tracked objects
there: 0.4-0.5 s per full collection. A CA rotation replaces every socket, which promotes a quarter of
that every ~10 s: a 5,000-agent rotation ran five such stalls (17 in the whole benchmark, up to 535 ms),
and they were most of `/healthz`'s p99 (bench/channel.py, docs/performance.md).

`FullCollections` turns the automatic full collections off (young collections are unchanged) and
keeps CPython's rule for when one is due, counting what young collections promote. A due collection
runs at once when the process is quiet (under a fifth of a core over the last second), or, while it is
busy, as soon as its memory has grown by half (and 64 MiB) since the last one, which bounds the garbage
a long storm can hold back. Only the real daemon process (`twistd uptrakit`) installs it: it changes
process-wide interpreter settings, and a test process runs several daemons.
"""
from __future__ import annotations

import gc
import os
import time
from typing import Any, Callable

from prometheus_client import Counter, CollectorRegistry
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()
CHECK_SECONDS = 1.0
IDLE_SHARE = 0.2            # of one core, over the last check interval
MEMORY_GROWTH = 1.5         # RSS since the last full collection, times ...
MEMORY_SLACK = 64 << 20     # ... plus this many bytes
NEVER = 1_000_000_000       # a generation-2 threshold no count reaches


def rss_bytes() -> int:
    """Resident set size of this process (0 where /proc is missing: then only a quiet moment collects)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class FullCollections:
    """Runs the oldest generation's collections itself (see the module docstring)."""

    def __init__(self, clock: Any, registry: CollectorRegistry | None = None,
                 cpu: Callable[[], float] = time.process_time, rss: Callable[[], int] = rss_bytes) -> None:
        self.clock, self.cpu, self.rss = clock, cpu, rss
        self.pending = 0        # objects promoted into the oldest generation since its last collection
        self.total = 0          # objects it held after its last collection
        self.runs = {"idle": 0, "memory": 0}
        self._young = 0
        self._saved: tuple[int, int, int] | None = None
        self._loop: LoopingCall | None = None
        self._cpu_at = self._at = 0.0
        self._rss_after = 0
        self._counter = self._seconds = None
        if registry is not None:
            self._counter = Counter("uptrakit_gc_full_collections", "Full garbage collections the daemon ran, by "
                                    "trigger (idle: the process was quiet; memory: it grew by half while busy)",
                                    ["trigger"], registry=registry)
            for trigger in self.runs:
                self._counter.labels(trigger)
            self._seconds = Counter("uptrakit_gc_full_collection_seconds", "Time the reactor spent in them",
                                    registry=registry)

    def start(self) -> None:
        """Turn CPython's automatic full collections off and check every second whether one is due."""
        self._saved = gc.get_threshold()
        young, middle, _ = self._saved
        gc.set_threshold(young, middle, NEVER)
        gc.callbacks.append(self._observe)
        self.total, self.pending = len(gc.get_objects(2)), 0
        self._cpu_at, self._at, self._rss_after = self.cpu(), self.clock.seconds(), self.rss()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(CHECK_SECONDS, now=False)

    def stop(self) -> None:
        """Give CPython its own rule back."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._observe in gc.callbacks:
            gc.callbacks.remove(self._observe)
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None

    def _observe(self, phase: str, info: dict[str, Any]) -> None:
        generation = info["generation"]
        if generation == 1 and phase == "start":
            # a generation-1 collection moves its survivors (of generations 0 and 1) into the oldest one
            self._young = len(gc.get_objects(0)) + len(gc.get_objects(1))
        elif generation == 1:
            self.pending += max(0, self._young - info["collected"] - info["uncollectable"])
        elif generation == 2 and phase == "stop":   # ours, or anyone's gc.collect()
            self.total, self.pending = len(gc.get_objects(2)), 0

    def due(self) -> bool:
        """CPython's own rule: more promoted since the last full collection than a quarter of what it kept."""
        return self.pending > self.total // 4

    def check(self) -> None:
        """Collect if due and quiet, or due and grown by half since the last collection."""
        cpu, now = self.cpu(), self.clock.seconds()
        busy = (cpu - self._cpu_at) / max(now - self._at, 1e-3)
        self._cpu_at, self._at = cpu, now
        if not self.due():
            return
        if busy < IDLE_SHARE:
            self.collect("idle")
        elif self.rss() > self._rss_after * MEMORY_GROWTH + MEMORY_SLACK:
            self.collect("memory")

    def collect(self, trigger: str) -> int:
        """One full collection now; returns how many objects it freed."""
        started = time.perf_counter()
        freed = gc.collect(2)
        took = time.perf_counter() - started
        self.runs[trigger] += 1
        if self._counter is not None and self._seconds is not None:
            self._counter.labels(trigger).inc()
            self._seconds.inc(took)
        self._rss_after = self.rss()
        self._cpu_at = self.cpu()   # the collection's own CPU does not make the next second look busy
        log.info("full garbage collection ({trigger}): {freed} objects freed, {kept} kept, {seconds:.2f}s",
                 trigger=trigger, freed=freed, kept=self.total, seconds=took)
        return freed
