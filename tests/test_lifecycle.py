"""Service-tree building blocks driven by a Clock: periodic jobs, ordered stops."""
from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from uptrakitd.process.lifecycle import OrderedServices, PeriodicJob


class PeriodicJobTests(TestCase):
    def test_runs_every_interval_and_survives_a_failing_run(self):
        clock, runs = Clock(), []

        def job():
            runs.append(clock.seconds())
            if len(runs) == 2:
                raise RuntimeError("one bad hour")
        svc = PeriodicJob("hourly", 3600, job, clock)
        svc.startService()
        self.assertEqual(runs, [], "not at start unless asked")
        for _ in range(3):
            clock.advance(3600)
        self.assertEqual(runs, [3600, 7200, 10800])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        svc.stopService()
        clock.advance(3600)
        self.assertEqual(len(runs), 3, "stopped jobs do not run")

    def test_a_slow_run_is_not_overlapped_and_stopping_waits_for_it(self):
        clock, runs = Clock(), []

        def job():
            runs.append(Deferred())
            return runs[-1]
        svc = PeriodicJob("slow", 60, job, clock)
        svc.startService()
        clock.advance(60)
        clock.advance(600)
        self.assertEqual(len(runs), 1, "the next run waits for the running one")
        runs[0].callback(None)
        clock.advance(60)
        self.assertEqual(len(runs), 2)
        stopped = svc.stopService()
        self.assertFalse(stopped.called, "stopping waits for the running call")
        runs[1].callback(None)
        self.assertTrue(stopped.called)

    def test_stopping_waits_for_a_stuck_run_only_so_long(self):
        from uptrakitd.process.lifecycle import STOP_WAIT_SECONDS
        clock = Clock()
        svc = PeriodicJob("stuck", 60, Deferred, clock, run_at_start=True)
        svc.startService()
        stopped = svc.stopService()
        clock.advance(STOP_WAIT_SECONDS - 1)
        self.assertFalse(stopped.called)
        clock.advance(1)
        self.assertTrue(stopped.called)

    def test_run_at_start(self):
        clock, runs = Clock(), []
        svc = PeriodicJob("daily", 86400, lambda: runs.append(clock.seconds()), clock, run_at_start=True)
        svc.startService()
        clock.advance(86400)
        self.assertEqual(runs, [0, 86400])
        svc.stopService()


class Step(Service):
    def __init__(self, name, log, gate=None):
        self.setName(name)
        self.log, self.gate = log, gate

    def stopService(self):
        super().stopService()
        self.log.append(f"stop {self.name}")
        return self.gate


class OrderedServicesTests(TestCase):
    def test_children_stop_last_first_each_waiting_for_the_one_before(self):
        log, gate = [], Deferred()
        tree = OrderedServices()
        for name, g in (("store", None), ("channel", gate), ("listener", None)):
            Step(name, log, g).setServiceParent(tree)
        tree.startService()
        d = tree.stopService()
        self.assertEqual(log, ["stop listener", "stop channel"], "the store waits for the channel's goodbye")
        gate.callback(None)
        self.assertEqual(log, ["stop listener", "stop channel", "stop store"])
        self.successResultOf(d)
