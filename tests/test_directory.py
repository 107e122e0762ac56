"""The services directory: enrollment, approval, and a deactivation that cannot leave valid certificates."""
from __future__ import annotations

from twisted.trial.unittest import TestCase

from uptrakitd.registry.enrollment import TokenRejected
from uptrakitd.errors import Conflict
from uptrakitd.events import ServiceChanged
from uptrakitd.store import certificates, services

from .fakes import make_directory, make_pki
from .helpers import make_csr


class Crash(Exception):
    """Stands for the process dying at this point of a transaction."""


class DeactivationTests(TestCase):
    def setUp(self):
        self.ca, self.store, self.bus = make_pki(self.mktemp())
        self.directory, _, token = make_directory(self.ca, self.store, self.bus)
        self.service, _ = self.successResultOf(self.directory.enroll("agent", "h", token))
        self.serials = [self.successResultOf(self.directory.issue_certificate(
            self.service.id, make_csr(self.service.id)[0])).serial for _ in range(3)]

    def stored(self):
        status = self.store.conn.execute("SELECT status FROM services WHERE id = ?", (self.service.id,)).fetchone()[0]
        valid = self.store.conn.execute("SELECT COUNT(*) FROM certificates WHERE service_id = ? AND revoked_at IS NULL",
                                        (self.service.id,)).fetchone()[0]
        return status, valid

    def test_a_crash_between_status_and_revocations_changes_nothing(self):
        def crash(*args):
            raise Crash()
        self.patch(certificates, "revoke_all_of_service", crash)
        self.failureResultOf(self.directory.deactivate(self.service.id), Crash)
        self.assertEqual(self.stored(), ("approved", 3))
        self.assertEqual(self.service.status, "approved")
        self.assertTrue(all(self.ca.state.records[s].revoked_at is None for s in self.serials))

    def test_deactivation_revokes_everything_in_one_step_and_a_retry_finishes_an_old_half_done_one(self):
        # what an older release could leave behind: deactivated, certificates still valid
        self.store.run(services.update_fields, self.service.id, status="deactivated")
        self.service.status = "deactivated"
        changes = []
        self.bus.subscribe(ServiceChanged, changes.append)
        self.successResultOf(self.directory.deactivate(self.service.id))
        self.assertEqual(self.stored(), ("deactivated", 0))
        self.assertTrue(all(self.ca.state.records[s].reason == "cessationOfOperation" for s in self.serials))
        self.assertEqual(changes, [], "already deactivated: nothing new to announce")

    def test_deactivation_is_announced_before_the_revocations(self):
        from uptrakitd.events import CertificateRevoked
        order = []
        self.bus.subscribe(ServiceChanged, lambda e: order.append(e.status))
        self.bus.subscribe(CertificateRevoked, lambda e: order.append(e.reason))
        self.successResultOf(self.directory.deactivate(self.service.id))
        self.assertEqual(order, ["deactivated"] + ["cessationOfOperation"] * 3)


class EnrollmentTests(TestCase):
    def test_tokens_uses_and_pending_approval(self):
        from uptrakitd.registry.enrollment import EnrollmentTokens
        ca, store, bus = make_pki(self.mktemp())
        directory, _, _ = make_directory(ca, store, bus)
        tokens = EnrollmentTokens(store)
        once = self.successResultOf(tokens.create("once", kind="mqtt", max_uses=1, auto_approve=False))["token"]
        failure = self.failureResultOf(directory.enroll("agent", "h", once), TokenRejected)
        self.assertIn("mqtt", str(failure.value))
        service, secret = self.successResultOf(directory.enroll("mqtt", "h", once))
        self.assertEqual(service.status, "pending")
        self.failureResultOf(directory.enroll("mqtt", "h2", once), TokenRejected)
        self.assertEqual(len(directory), 1, "a refused token creates nothing")
        self.successResultOf(directory.approve(service.id))
        self.failureResultOf(directory.approve(service.id), Conflict)
        self.assertIs(directory.find_by_enrollment_secret(secret), service)


class IdPrefixTests(TestCase):
    """Issue 37, item 2: the 8-character id the UI shows was refused by `services approve` (404 no route)."""

    def test_a_unique_start_names_the_service_and_an_ambiguous_one_lists_the_matches(self):
        import uuid

        from uptrakitd.errors import Conflict, NotFound
        from uptrakitd.registry import directory as directory_module
        ca, store, bus = make_pki(self.mktemp())
        directory, _, token = make_directory(ca, store, bus)
        ids = iter(["47dceff1-0000-4000-8000-000000000001", "47dceff1-0000-4000-8000-000000000002",
                    "9a0b1c2d-0000-4000-8000-000000000003"])
        self.patch(directory_module.uuid, "uuid4", lambda: uuid.UUID(next(ids)))
        made = [self.successResultOf(directory.enroll("agent", f"h{n}", token))[0] for n in range(3)]
        self.assertIs(directory.resolve("9a0b1c2d"), made[2])
        self.assertIs(directory.resolve("9A0B"), made[2], "any case")
        self.assertIs(directory.resolve(made[0].id), made[0])
        with self.assertRaises(Conflict) as ambiguous:
            directory.resolve("47dceff1")
        self.assertIn(f"2 service ids: {made[0].id}, {made[1].id}", ambiguous.exception.message)
        for unknown in ("ffff", "9a0", "zzzzzzzz"):
            with self.assertRaises(NotFound):
                directory.resolve(unknown)
