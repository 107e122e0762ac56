"""The HTTPS listener: client certificates requested, optional, verified; context swaps at runtime."""
from __future__ import annotations

import ssl as pyssl
from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from uptrakitd.listen.tls import build_context

from .helpers import (tls_refusal, blocking_get, blocking_tls_socket, ca_pem, foreign_ca_and_leaf, https_port, make_csr, run,
                      enrolled_service, require_program, start_controller)


@inlineCallbacks
def issue_client(controller, kind="agent"):
    """(cert_pem, key_pem, service) for a new approved service."""
    service = yield enrolled_service(controller, kind)
    csr, key = make_csr(service.id)
    issued = yield controller.directory.issue_certificate(service.id, csr)
    return issued.pem, key, service


class HandshakeTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_no_client_certificate_is_accepted(self):
        c = yield start_controller(self)

        def get():
            with blocking_tls_socket(https_port(c), ca_pem(c)) as s:
                return blocking_get(s, "/healthz")
        status, body = yield deferToThread(get)
        self.assertEqual((status, body), (200, b"ok"))

    @inlineCallbacks
    def test_own_client_certificate_is_accepted(self):
        c = yield start_controller(self)
        cert, key, _ = yield issue_client(c)

        def get():
            with blocking_tls_socket(https_port(c), ca_pem(c), cert, key) as s:
                return blocking_get(s, "/healthz")
        status, _ = yield deferToThread(get)
        self.assertEqual(status, 200)

    @inlineCallbacks
    def test_foreign_client_certificate_is_refused_at_handshake(self):
        c = yield start_controller(self)
        _, leaf, key = foreign_ca_and_leaf()

        alert = yield tls_refusal(https_port(c), ca_pem(c), leaf, key)
        self.assertIn("unknown ca", alert)   # alert 48

    @inlineCallbacks
    def test_an_expired_client_certificate_is_refused_with_certificate_expired(self):
        import datetime
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        c = yield start_controller(self)
        ca = c.ca.state.active()
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "old")]))
                .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=2)).not_valid_after(now - datetime.timedelta(days=1)))
        leaf = ca.signer.certificate(leaf)
        pem = serialization.Encoding.PEM
        alert = yield tls_refusal(https_port(c), ca_pem(c), leaf.public_bytes(pem),
                                  key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.assertIn("certificate expired", alert)   # alert 45

    @inlineCallbacks
    def test_openssl_sees_server_chain_to_ca_and_refuses_foreign_client(self):
        openssl = require_program("openssl", "apt-get install openssl")
        c = yield start_controller(self)
        tmp = Path(c.tmp)
        (tmp / "ca.pem").write_bytes(ca_pem(c))
        out, err, code = yield run(openssl, "s_client", "-connect", f"127.0.0.1:{https_port(c)}",
                                   "-CAfile", str(tmp / "ca.pem"), "-verify_return_error", "-servername",
                                   "localhost", "-verify_hostname", "localhost", "-brief", env={})
        self.assertIn(b"Verification: OK", err + out)
        self.assertIn(b"Uptrakit Controller", err + out)
        _, leaf, key = foreign_ca_and_leaf()
        (tmp / "leaf.pem").write_bytes(leaf)
        (tmp / "leaf.key").write_bytes(key)
        out, err, code = yield run(openssl, "s_client", "-connect", f"127.0.0.1:{https_port(c)}", "-CAfile",
                                   f"{tmp}/ca.pem", "-cert", f"{tmp}/leaf.pem", "-key", f"{tmp}/leaf.key", "-quiet",
                                   stdin=b"GET /healthz HTTP/1.0\r\n\r\n")
        self.assertNotIn(b"\r\n\r\nok", out)
        self.assertIn(b"alert unknown ca", out + err)


class ContextSwapTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_swap_keeps_open_connections_and_applies_to_new_ones(self):
        c = yield start_controller(self)
        cert, key, _ = yield issue_client(c)
        port, ca = https_port(c), ca_pem(c)
        sock = yield deferToThread(blocking_tls_socket, port, ca, cert, key)
        self.addCleanup(sock.close)
        status, _ = yield deferToThread(blocking_get, sock, "/healthz")
        self.assertEqual(status, 200)
        # New context that trusts only a foreign CA: our client certificate no longer chains.
        from cryptography import x509
        foreign_ca, _, _ = foreign_ca_and_leaf()
        c.tls.install(build_context(c.server_cert.cert, c.server_cert.key,
                                    [x509.load_pem_x509_certificate(foreign_ca)]))
        status, body = yield deferToThread(blocking_get, sock, "/healthz")
        self.assertEqual((status, body), (200, b"ok"), "the open connection keeps its context")

        alert = yield tls_refusal(port, ca, cert, key)
        self.assertIn("unknown ca", alert)
        c.server_cert.install()

        def again():
            with blocking_tls_socket(port, ca, cert, key) as s:
                return blocking_get(s, "/healthz")
        status, _ = yield deferToThread(again)
        self.assertEqual(status, 200)

    @inlineCallbacks
    def test_tls_1_2_offers_only_ecdhe_aead_suites(self):
        import socket
        c = yield start_controller(self)

        def handshake(cipher):
            ctx = pyssl.SSLContext(pyssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = pyssl.CERT_NONE
            ctx.maximum_version = pyssl.TLSVersion.TLSv1_2
            ctx.set_ciphers(cipher)
            try:
                with ctx.wrap_socket(socket.create_connection(("127.0.0.1", https_port(c)))) as s:
                    return s.cipher()[0]
            except pyssl.SSLError as e:
                return "refused" if "handshake failure" in str(e).lower() or "alert" in str(e).lower() else str(e)
        for weak in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256"):
            self.assertEqual((yield deferToThread(handshake, weak)), "refused", weak)
        for strong in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"):
            self.assertEqual((yield deferToThread(handshake, strong)), strong)

    @inlineCallbacks
    def test_tls_below_1_2_refused(self):
        c = yield start_controller(self)

        def old():
            ctx = pyssl.SSLContext(pyssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = pyssl.CERT_NONE
            ctx.minimum_version = pyssl.TLSVersion.TLSv1
            ctx.maximum_version = pyssl.TLSVersion.TLSv1_1
            import socket
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", https_port(c)))) as s:
                return s.version()
        yield self.assertFailure(deferToThread(old), pyssl.SSLError, OSError)


class ProfileTests(TestCase):
    """Mozilla "intermediate", as its own judges see it: openssl for groups and chain, sslyze for the profile."""

    timeout = 120

    @inlineCallbacks
    def test_only_x25519_p256_p384_a_chain_without_the_root_and_hsts(self):
        openssl = require_program("openssl", "apt-get install openssl")
        c = yield start_controller(self)
        ca = str(Path(c.tmp) / "data" / "pki" / "ca.crt")
        for group, offered in (("X25519", True), ("P-256", True), ("P-384", True), ("X448", False),
                               ("P-521", False), ("ffdhe2048", False)):
            out, err, code = yield run(openssl, "s_client", "-connect", f"127.0.0.1:{https_port(c)}", "-CAfile", ca,
                                       "-groups", group, "-showcerts", stdin=b"")
            self.assertEqual(b"Server Temp Key" in out, offered, (group, out[-300:], err[-300:]))
            if offered:
                self.assertIn(b" 0 s:CN = Uptrakit Controller", out)
                self.assertNotIn(b" 1 s:", out, "the self-signed CA is not sent: a client must hold it already")
                self.assertIn(b"Verify return code: 0 (ok)", out)
        out, _, _ = yield run("curl", "-sS", "-D", "-", "-o", "/dev/null", "--cacert", ca,
                              f"https://localhost:{https_port(c)}/api/v1/pki/ca.crt")
        self.assertIn(b"strict-transport-security: max-age=63072000", out.lower())

    @inlineCallbacks
    def test_sslyze_judges_the_https_listener_mozilla_intermediate(self):
        sslyze = require_program(str(Path(__file__).resolve().parent.parent / ".venv-sslyze" / "bin" / "sslyze"),
                                 "python3 -m venv .venv-sslyze && .venv-sslyze/bin/pip install sslyze "
                                 "(its own venv: sslyze pins an older cryptography)")
        c = yield start_controller(self)
        ca = str(Path(c.tmp) / "data" / "pki" / "ca.crt")
        out, err, code = yield run(sslyze, "--mozilla_config=intermediate", "--certinfo_ca_file", ca,
                                   f"127.0.0.1:{https_port(c)}")
        self.assertIn(b"OK - Compliant.", out, out[-1500:])
        self.assertEqual(code, 0)
