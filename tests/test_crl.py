"""CRL rebuilds on a Clock: revocations close together give one rebuild."""
from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from uptrakitd.events import CertificateRevoked
from uptrakitd.pki.crl import CrlPublisher

from .fakes import make_directory, make_pki, run_now
from .helpers import make_csr


class CoalescingTests(TestCase):
    def setUp(self):
        self.ca, self.store, self.bus = make_pki(self.mktemp())
        self.crls = CrlPublisher(self.ca.state, self.store, self.ca.files, self.ca.clock, run_now,
                                 coalesce_seconds=0.5)
        self.bus.subscribe(CertificateRevoked, self.crls.on_revoked)
        self.rebuilds: list[Deferred] = []

        def counted() -> Deferred:
            d: Deferred = Deferred()
            self.rebuilds.append(d)
            return d
        self.crls.rebuild = counted

    def revoke_new_certificates(self, n):
        directory, _, token = make_directory(self.ca, self.store, self.bus)
        service, _ = self.successResultOf(directory.enroll("agent", "h", token))
        for _ in range(n):
            issued = self.successResultOf(directory.issue_certificate(service.id, make_csr(service.id)[0]))
            self.successResultOf(self.ca.revoke(issued.serial, "keyCompromise"))

    def test_many_revocations_inside_the_window_give_exactly_one_rebuild(self):
        self.revoke_new_certificates(5)
        self.assertEqual(self.rebuilds, [], "nothing before the window closes")
        self.ca.clock.advance(0.5)
        self.assertEqual(len(self.rebuilds), 1)
        self.rebuilds[0].callback(None)
        self.ca.clock.advance(10)
        self.assertEqual(len(self.rebuilds), 1, "no rebuild without a new revocation")

    def test_a_revocation_after_the_window_gets_its_own_rebuild(self):
        self.revoke_new_certificates(1)
        self.ca.clock.advance(0.5)
        self.rebuilds[0].callback(None)
        self.revoke_new_certificates(2)
        self.ca.clock.advance(0.5)
        self.assertEqual(len(self.rebuilds), 2)

    def test_stopped_publisher_schedules_nothing(self):
        self.crls.stop()
        self.revoke_new_certificates(1)
        self.ca.clock.advance(5)
        self.assertEqual(self.rebuilds, [])
        self.assertEqual(self.ca.clock.getDelayedCalls(), [])
