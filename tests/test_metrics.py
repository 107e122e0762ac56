"""/metrics as Prometheus reads it (the official parser): what an alert needs is there, nothing doubled."""
from __future__ import annotations

import platform

import treq
import twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from .helpers import (DATA, ROOT, ca_pem, foreign_ca_and_leaf, https_client, https_port, new_leaf, request_json,
                      require_program, run, start_controller, tls_refusal, url)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class MetricsTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def scrape(self, c, token=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = yield https_client(c).get(url(c, "/metrics"), headers=headers)
        text = yield treq.text_content(r)
        return r.code, text

    @inlineCallbacks
    def test_families_an_operator_alerts_on(self):
        from uptrakitd import __version__
        c = yield start_controller(self)
        yield request_json(c, "GET", "/healthz", token=None)
        _, foreign_cert, foreign_key = foreign_ca_and_leaf()
        yield tls_refusal(https_port(c), ca_pem(c), foreign_cert, foreign_key)
        issued, _, _ = yield new_leaf(c)
        yield request_json(c, "POST", f"/api/v1/certificates/{issued.serial:X}/revoke", {"reason": "keyCompromise"})
        status, text = yield self.scrape(c)
        self.assertEqual(status, 200)
        got = samples(text)
        names = {name for name, _ in got}
        self.assertEqual([n for n in names if n.endswith("_created")], [])
        for required in ("process_open_fds", "process_max_fds", "process_resident_memory_bytes",
                         "process_cpu_seconds_total", "uptrakit_crl_lag_seconds", "uptrakit_services_on_previous_ca",
                         "uptrakit_ca_rotation_in_progress"):
            self.assertIn(required, names)
        self.assertNotIn("uptrakit_build_info", text, "an unauthenticated scrape learns no version")
        self.assertNotIn(platform.python_version(), text)
        status, text = yield self.scrape(c, (c.settings.data_dir / "admin.token").read_text().strip())
        got = samples(text)
        self.assertEqual(got[("uptrakit_build_info", (("python", platform.python_version()),
                                                      ("twisted", twisted.__version__), ("version", __version__)))], 1)
        active = c.ca.state.active()
        self.assertEqual(got[("uptrakit_ca_expiry_timestamp_seconds", (("generation", "1"), ("role", "active")))],
                         active.not_after.timestamp())
        self.assertEqual(got[("uptrakit_server_certificate_expiry_timestamp_seconds", ())],
                         c.server_cert.not_after().timestamp())
        self.assertLess(got[("uptrakit_crl_age_seconds", (("generation", "1"),))], 60)
        self.assertGreaterEqual(got[("uptrakit_http_requests_total",
                                     (("method", "GET"), ("route", "/healthz"), ("status", "200")))], 1)
        self.assertEqual(got[("uptrakit_http_requests_total", (("method", "POST"),
                              ("route", "/api/v1/certificates/{serial}/revoke"), ("status", "200")))], 1)
        self.assertEqual(got[("uptrakit_tls_client_certificates_refused_total", (("reason", "untrusted issuer"),))], 1)
        self.assertEqual(got[("uptrakit_revocations_total", (("reason", "keyCompromise"),))], 1)
        self.assertIn(("uptrakit_identity_decisions_total", (("code", ""), ("outcome", "absent"), ("source", "none"))),
                      got)

    @inlineCallbacks
    def test_metrics_can_require_a_token(self):
        c = yield start_controller(self, metrics_require_auth=True)
        status, _ = yield self.scrape(c)
        self.assertEqual(status, 401)
        status, text = yield self.scrape(c, (c.settings.data_dir / "admin.token").read_text().strip())
        self.assertEqual(status, 200)
        self.assertIn("uptrakit_build_info", text)


class AlertRulesTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_promtool_accepts_the_rules_and_their_unit_tests_pass(self):
        promtool = require_program("promtool", "apt-get install prometheus")
        rules = ROOT / "etc" / "prometheus" / "uptrakitd-alerts.yml"
        out, err, code = yield run(promtool, "check", "rules", str(rules))
        self.assertEqual(code, 0, out + err)
        out, err, code = yield run(promtool, "test", "rules", str(DATA / "prometheus" / "alerts-test.yml"))
        self.assertEqual(code, 0, out + err)

    @inlineCallbacks
    def test_every_metric_the_rules_use_is_exposed(self):
        import re
        used = set(re.findall(r"\buptrakit_\w+", (ROOT / "etc" / "prometheus" / "uptrakitd-alerts.yml").read_text()))
        c = yield start_controller(self)
        yield c.readiness.check()
        yield request_json(c, "GET", "/api/v1/whoami", token=None)
        # a labelled counter shows once a label is used: one OCSP answer (garbage: malformedRequest)
        yield https_client(c).get(url(c, "/api/v1/pki/ocsp/AAAA"))
        r = yield https_client(c).get(url(c, "/metrics"))
        exposed = {s.name for family in text_string_to_metric_families((yield treq.text_content(r)))
                   for s in family.samples}
        self.assertEqual(used - exposed, set())
