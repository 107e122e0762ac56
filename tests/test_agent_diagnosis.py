"""The reference agent's one-line explanations of a refused connection (the nginx cases run in tests/e2e)."""
from __future__ import annotations

from twisted.trial.unittest import TestCase

from uptrakitd.agent.client import explain_refusal
from uptrakitd.channel import wire


class ExplainRefusalTests(TestCase):
    def test_tls_alerts_name_cause_and_fix(self):
        # the messages pyOpenSSL gives for the alerts HAProxy, Envoy and Caddy send
        cases = {
            "[('SSL routines', '', 'tlsv1 alert unknown ca')]": "re-download ca.crt on the proxy",
            "[('SSL routines', '', 'sslv3 alert certificate revoked')]": "enrolled again",
            "[('SSL routines', '', 'certificate verify failed')]": "--server-ca",
            "[('SSL routines', '', 'tlsv1 alert bad certificate')]": "re-download ca.crt on the proxy",
        }
        for error, fix in cases.items():
            self.assertIn(fix, explain_refusal("mtls", False, "connection was closed uncleanly", error), error)
        required = explain_refusal("anonymous", False, None, "[('SSL routines', '', 'tlsv13 alert certificate required')]")
        self.assertIn("ssl_verify_client optional", required)

    def test_upgrade_statuses(self):
        upgrade = "connection was closed uncleanly (WebSocket connection upgrade failed [{}]: Bad Request)"
        self.assertIn("lacks the new CA", explain_refusal("mtls", False, upgrade.format(400), None))
        self.assertIn("Upgrade and Connection", explain_refusal("bearer", False, upgrade.format(400), None))
        self.assertIn("cannot reach the controller", explain_refusal("mtls", False, upgrade.format(502), None))

    def test_an_unseen_certificate_points_at_the_proxy_trust(self):
        self.assertIn("--trusted-proxy", explain_refusal("mtls", True, wire.ENROLLMENT_TIMEOUT, None))
        # an agent enrolling without a certificate is simply slow, not misconfigured
        self.assertIsNone(explain_refusal("anonymous", True, wire.ENROLLMENT_TIMEOUT, None))
        self.assertIsNone(explain_refusal("mtls", True, wire.CERT_ROTATED, None))
