"""Data that does not grow forever (issue 25): certificate rows deleted --certificate-retention-days after expiry,
spent enrollment tokens after 30 days, in batches with their audit entries; and a start that reads no record
that cannot matter."""
from __future__ import annotations

import random
import time

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.registry import retention
from uptrakitd.config import ConfigError, build_settings

from .helpers import start_controller

DAY = 86400


def add_certificates(conn, rows: list[tuple[int, int | None]], service_id: str) -> list[str]:
    """Certificate rows (not_after, revoked_at) for one service; returns their serials."""
    serials = []
    for not_after, revoked_at in rows:
        serial = f"{random.getrandbits(159) | 1 << 158:040X}"
        serials.append(serial)
        conn.execute("INSERT INTO certificates (serial, service_id, purpose, ca_generation, not_before, not_after, "
                     "cert_pem, issued_at, revoked_at, revocation_reason) VALUES (?, ?, 'client', 1, ?, ?, '-', ?, "
                     "?, ?)", (serial, service_id, not_after - 7 * DAY, not_after, not_after - 7 * DAY, revoked_at,
                               "keyCompromise" if revoked_at else None))
    return serials


class RetentionTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_rows_past_retention_go_in_batches_with_their_entries_and_the_rest_stays(self):
        c = yield start_controller(self, certificate_retention_days=3)
        token = yield c.enrollment_tokens.create("one use", max_uses=1, auto_approve=True)
        before = int(time.time())
        service, _ = yield c.directory.enroll("agent", "host", token["token"])
        now = int(time.time())
        old = [(now - 4 * DAY, None)] * (retention.BATCH + 10) + [(now - 5 * DAY, now - 9 * DAY)]
        recent = [(now - 2 * DAY, now - 8 * DAY), (now + DAY, None)]
        gone = yield c.store.run(add_certificates, old, service.id)
        kept = yield c.store.run(add_certificates, recent, service.id)

        def tokens(conn):
            conn.execute("INSERT INTO enrollment_tokens (id, name, token_hash, max_uses, uses, created_at, "
                         "expires_at, used_up_at) VALUES ('t-expired', 'x', 'h1', NULL, 0, ?, ?, NULL), "
                         "('t-used-long-ago', 'x', 'h2', 1, 1, ?, NULL, ?), ('t-used-lately', 'x', 'h3', 1, 1, ?, "
                         "NULL, ?)", (now - 60 * DAY, now - 40 * DAY, now - 60 * DAY, now - 31 * DAY,
                                      now - 60 * DAY, now - 10 * DAY))
            return conn.execute("SELECT used_up_at FROM enrollment_tokens WHERE name = 'one use'").fetchone()[0]
        used_up_at = yield c.store.run(tokens)
        self.assertTrue(before <= used_up_at <= now, f"its one use was counted, and when: {used_up_at} not in "
                                                      f"[{before}, {now}]")

        done = yield retention.Retention(c.store, c.audit, reactor, 3, c.metrics.pruned_rows).run()
        self.assertEqual(done, {"certificates": len(gone), "enrollment_tokens": 2})

        def left(conn):
            serials = {r[0] for r in conn.execute("SELECT serial FROM certificates").fetchall()}
            ids = {r[0] for r in conn.execute("SELECT id FROM enrollment_tokens").fetchall()}
            entries = [r[0] for r in conn.execute("SELECT details FROM audit_log WHERE action = 'retention.pruned' "
                                                  "ORDER BY seq").fetchall()]
            return serials, ids, entries
        serials, ids, entries = yield c.store.run(left)
        self.assertEqual(set(gone) & serials, set())
        self.assertLessEqual(set(kept), serials)
        self.assertEqual(ids - {token["id"]}, {"t-used-lately"})
        self.assertEqual(len(entries), 3, "two batches of certificates, one of tokens: an entry each")
        self.assertEqual(c.metrics.pruned_rows.labels("certificates")._value.get(), len(gone))
        again = yield retention.Retention(c.store, c.audit, reactor, 3).run()
        self.assertEqual(again, {"certificates": 0, "enrollment_tokens": 0})

    @inlineCallbacks
    def test_a_start_reads_no_record_expired_over_a_day_ago(self):
        c = yield start_controller(self)
        token = yield c.enrollment_tokens.create("x", auto_approve=True)
        service, _ = yield c.directory.enroll("agent", "host", token["token"])
        now = int(time.time())
        long_expired = yield c.store.run(add_certificates, [(now - 3 * DAY, None)] * 50, service.id)
        lately = yield c.store.run(add_certificates, [(now - 3600, now - 7200), (now + DAY, None)], service.id)
        tmp = c.tmp
        yield c.stopService()
        again = yield start_controller(self, tmp=tmp)
        held = {f"{serial:040X}" for serial in again.ca.state.records}
        self.assertEqual(set(long_expired) & held, set())
        self.assertLessEqual(set(lately), held, "an hour-old expiry is still on the CRL: loaded")
        self.assertEqual(len(again.ca.state.by_service[service.id]), 2)

    def test_one_day_is_refused(self):
        for value, ok in (("0", True), ("2", True), ("1", False), ("-3", False)):
            flags = {"data_dir": self.mktemp(), "certificate_retention_days": value}
            if ok:
                self.assertEqual(build_settings(flags).certificate_retention_days, int(value))
            else:
                with self.assertRaises(ConfigError) as refused:
                    build_settings(flags)
                self.assertIn("certificate_retention_days", str(refused.exception))
