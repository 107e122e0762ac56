"""The composition root: what the service tree contains, in which order, and which job runs what."""
from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from uptrakitd.process.boot import boot
from uptrakitd.config import build_settings
from uptrakitd.process.daemon import DAY, HOUR, build_daemon
from uptrakitd.process.lifecycle import PeriodicJob

from .helpers import flags_for


class TreeTests(TestCase):
    def daemon(self, **extra):
        tmp = self.mktemp()
        Path(tmp).mkdir()
        flags = flags_for(tmp, **extra)
        return build_daemon(boot(build_settings(flags)), reactor, flags)

    def test_start_order_is_the_tree_order(self):
        d = self.daemon(pki_addr="http://127.0.0.1:1", pki_http="listener")
        self.assertEqual([s.name for s in d], [
            "signals", "data-dir lock", "store", "audit", "audit checkpoint", "crl-worker", "hourly CRL rebuild", "daily CA check",
            "daily server certificate check", "daily record pruning", "daily retention", "channel", "renewal check", "readiness check", "HTTPS", "plain-HTTP PKI",
            "setup warnings", "systemd"])

    def test_periodic_jobs_run_the_right_work_at_the_right_interval(self):
        d = self.daemon()
        expected = {"hourly CRL rebuild": (HOUR, d.crls.rebuild, False),
                    "daily CA check": (DAY, d.ca.check_expiry, True),
                    "daily server certificate check": (DAY, d.server_cert.check_due, True),
                    "renewal check": (60, d.channel.check_renewals, False),
                    "daily record pruning": (DAY, d.ca.prune_expired_records, True),
                    "daily retention": (DAY, d.retention.run, True),
                    "readiness check": (30, d.readiness.check, False),
                    "audit checkpoint": (60, d.audit.checkpoint_if_due, False)}
        jobs = {s.name: s for s in d if isinstance(s, PeriodicJob)}
        self.assertEqual(set(jobs), set(expected))
        for name, (interval, work, at_start) in expected.items():
            job = jobs[name]
            self.assertEqual((job.interval, job.job, job.run_at_start), (interval, work, at_start), name)
            self.assertIs(job.clock, reactor)
