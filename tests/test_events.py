"""The event bus: subscription order, waiting for Deferred subscribers, one failure policy."""
from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import TestCase

from uptrakitd.events import CaRotated, CertificateRevoked, EventBus, ServiceChanged


class EventBusTests(TestCase):
    def test_subscribers_run_in_order_and_only_for_their_event(self):
        bus, seen = EventBus(), []
        bus.subscribe(ServiceChanged, lambda e: seen.append(("first", e.service_id)))
        bus.subscribe(ServiceChanged, lambda e: seen.append(("second", e.status)))
        bus.subscribe(CaRotated, lambda e: seen.append(("rotation", e.generation)))
        d = bus.publish(ServiceChanged("s1", "deactivated"))
        self.assertEqual(seen, [("first", "s1"), ("second", "deactivated")])
        self.assertEqual(self.successResultOf(d), [None, None])

    def test_a_deferred_subscriber_is_waited_for_before_the_next(self):
        bus, seen, gate = EventBus(), [], Deferred()
        bus.subscribe(CaRotated, lambda e: gate.addCallback(lambda _: seen.append("crls")))
        bus.subscribe(CaRotated, lambda e: seen.append("broadcast") or 7)
        d = bus.publish(CaRotated(2, 1, "h"))
        self.assertEqual(seen, [])
        self.assertNoResult(d)
        gate.callback(None)
        self.assertEqual(seen, ["crls", "broadcast"])
        self.assertEqual(self.successResultOf(d), [None, 7])

    def test_a_failing_subscriber_is_logged_and_counted_and_never_breaks_the_publisher(self):
        failures = []
        bus = EventBus(on_failure=failures.append)
        seen = []

        def broken(event):
            raise RuntimeError("subscriber bug")
        bus.subscribe(CertificateRevoked, broken)
        bus.subscribe(CertificateRevoked, lambda e: fail(RuntimeError("async bug")))
        bus.subscribe(CertificateRevoked, lambda e: seen.append(e.serial))
        d = bus.publish(CertificateRevoked(5, None, 1, "keyCompromise", 0))
        self.assertEqual(self.successResultOf(d), [None])
        self.assertEqual(seen, [5])
        self.assertEqual(failures, ["CertificateRevoked", "CertificateRevoked"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_events_are_plain_data(self):
        from dataclasses import asdict
        import json
        for event in (CertificateRevoked(5, "s", 1, "superseded", 10), CaRotated(2, 1, "ab"),
                      ServiceChanged("s", "rejected")):
            self.assertEqual(type(event)(**json.loads(json.dumps(asdict(event)))), event)
