"""CertificateAuthority on a Clock: the daily expiry check, revocations announced and counted."""
from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.trial.unittest import TestCase

from uptrakitd.events import CertificateRevoked
from uptrakitd.process.lifecycle import PeriodicJob
from uptrakitd.pki.ca import AUTO_ROTATE_WHEN_LEFT

from .fakes import make_directory, make_pki
from .helpers import make_csr


class ExpiryTests(TestCase):
    def test_daily_check_rotates_once_the_ca_has_less_than_183_days_left(self):
        ca, _, _ = make_pki(self.mktemp())
        clock = ca.clock
        rotations = []
        ca.rotate = lambda **kw: rotations.append(ca.now()) or succeed({})
        job = PeriodicJob("daily CA check", 86400, ca.check_expiry, clock, run_at_start=True)
        job.startService()
        self.addCleanup(job.stopService)
        self.assertEqual(rotations, [])
        limit = ca.state.active().not_after - AUTO_ROTATE_WHEN_LEFT
        days_before = (limit - ca.now()).days
        clock.pump([86400] * days_before)
        self.assertEqual(rotations, [])
        clock.pump([86400])
        self.assertEqual(len(rotations), 1, "the first daily check past the threshold rotates")
        self.assertLess(ca.state.active().not_after - rotations[0], AUTO_ROTATE_WHEN_LEFT)

    def test_a_real_rotation_makes_generation_2_active_and_keeps_1_trusted(self):
        ca, store, _ = make_pki(self.mktemp())
        result = self.successResultOf(ca.rotate())
        self.assertEqual(result["generation"], 2)
        self.assertEqual([g.generation for g in ca.state.trusted(ca.now())], [2, 1])
        self.assertEqual([r["generation"] for r in store.conn.execute("SELECT generation FROM ca_generations")],
                         [1, 2])


class RevocationTests(TestCase):
    def test_every_revocation_is_committed_announced_and_counted(self):
        ca, store, bus = make_pki(self.mktemp())
        events = []
        bus.subscribe(CertificateRevoked, events.append)
        directory, _, token = make_directory(ca, store, bus)
        service, _ = self.successResultOf(directory.enroll("agent", "h", token))
        serials = [self.successResultOf(directory.issue_certificate(service.id, make_csr(service.id)[0])).serial
                   for _ in range(3)]
        self.successResultOf(ca.revoke(serials[0], "keyCompromise"))       # the API's path
        ca.supersede_older(service.id, serials[2])                          # a renewed service came back
        self.successResultOf(directory.deactivate(service.id))              # and was then deactivated
        self.assertEqual([(e.serial, e.reason) for e in events],
                         [(serials[0], "keyCompromise"), (serials[1], "superseded"),
                          (serials[2], "cessationOfOperation")])
        stored = {row["revocation_reason"] for row in store.conn.execute("SELECT revocation_reason FROM certificates")}
        self.assertEqual(stored, {"keyCompromise", "superseded", "cessationOfOperation"})
        for reason in ("keyCompromise", "superseded", "cessationOfOperation"):
            self.assertEqual(ca.metrics.registry.get_sample_value("uptrakit_revocations_total", {"reason": reason}), 1)


class PruningTests(TestCase):
    def test_records_expired_a_day_ago_leave_memory_but_not_the_store(self):
        ca, store, bus = make_pki(self.mktemp())
        directory, runtime, token = make_directory(ca, store, bus, lifetime_hours=1)
        service, _ = self.successResultOf(directory.enroll("agent", "h", token))
        issued = self.successResultOf(directory.issue_certificate(service.id, make_csr(service.id)[0]))
        job = PeriodicJob("daily record pruning", 86400, ca.prune_expired_records, ca.clock, run_at_start=True)
        job.startService()
        self.addCleanup(job.stopService)
        self.assertIn(issued.serial, ca.state.records, "still valid: kept")
        ca.clock.advance(86400)          # expired 23 h ago: still within the CRL's grace
        self.assertIn(issued.serial, ca.state.records)
        ca.clock.advance(86400)          # expired 47 h ago
        self.assertNotIn(issued.serial, ca.state.records)
        self.assertNotIn(service.id, ca.state.by_service)
        self.assertEqual(store.conn.execute("SELECT COUNT(*) FROM certificates WHERE service_id = ?",
                                            (service.id,)).fetchone()[0], 1)
