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
        self.assertIn("unknown ca", alert)

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
