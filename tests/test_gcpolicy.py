"""The daemon's own full garbage collections (uptrakitd.process.gcpolicy): none while busy, one when quiet or grown."""
from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from uptrakitd.process.gcpolicy import NEVER, FullCollections


class Meter:
    """A process CPU clock and RSS the test sets."""

    def __init__(self) -> None:
        self.cpu_seconds = 0.0
        self.rss = 100 << 20

    def cpu(self) -> float:
        return self.cpu_seconds


class FullCollectionTests(TestCase):
    def setUp(self) -> None:
        self.clock, self.meter, self.registry = Clock(), Meter(), CollectorRegistry()
        self.collector = FullCollections(self.clock, self.registry, cpu=self.meter.cpu, rss=lambda: self.meter.rss)
        self.before = gc.get_threshold()
        self.collector.start()
        self.addCleanup(self.collector.stop)
        self.kept: list[list[int]] = []

    def promote(self) -> None:
        """Objects that live on, moved into the oldest generation by young collections (as a connect
        storm does): more than a quarter of what it holds, so CPython would collect it now."""
        for _ in range(self.collector.total // 3 + 20_000):
            self.kept.append([0])
        gc.collect(1)

    def second(self, busy: float) -> None:
        self.meter.cpu_seconds += busy
        self.clock.advance(1)

    def full_runs(self) -> int:
        return gc.get_stats()[2]["collections"]

    def test_busy_defers_the_due_collection_until_quiet(self) -> None:
        self.assertEqual(gc.get_threshold(), self.before[:2] + (NEVER,), "automatic full collections are off")
        runs = self.full_runs()
        self.promote()
        self.promote()
        self.assertTrue(self.collector.due())
        self.assertEqual(self.full_runs(), runs, "due, but CPython did not run it")
        for _ in range(5):
            self.second(busy=0.8)
        self.assertEqual(self.full_runs(), runs, "not while the process is busy")
        self.second(busy=0.05)
        self.assertEqual(self.full_runs(), runs + 1, "at once when quiet")
        self.assertEqual(self.collector.runs, {"idle": 1, "memory": 0})
        self.assertFalse(self.collector.due())
        self.assertGreaterEqual(self.collector.total, len(self.kept), "what it kept is counted as the new base")
        self.second(busy=0.0)
        self.assertEqual(self.full_runs(), runs + 1, "nothing due: nothing run")
        self.assertEqual(self.registry.get_sample_value("uptrakit_gc_full_collections_total", {"trigger": "idle"}),
                         1.0)

    def test_memory_grown_by_half_collects_even_while_busy(self) -> None:
        runs = self.full_runs()
        self.promote()
        self.second(busy=0.9)
        self.assertEqual(self.full_runs(), runs)
        self.meter.rss = int((100 << 20) * 1.5 + (64 << 20)) + 1
        self.second(busy=0.9)
        self.assertEqual(self.full_runs(), runs + 1)
        self.assertEqual(self.collector.runs, {"idle": 0, "memory": 1})

    def test_not_due_means_no_collection_even_when_quiet(self) -> None:
        runs = self.full_runs()
        for _ in range(3):
            self.second(busy=0.0)
        self.assertEqual(self.full_runs(), runs)

    def test_stop_gives_cpython_its_rule_back(self) -> None:
        self.collector.stop()
        self.assertEqual(gc.get_threshold(), self.before)
        self.assertNotIn(self.collector._observe, gc.callbacks)
