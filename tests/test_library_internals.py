"""The private parts of Twisted, Autobahn and pyOpenSSL the daemon reads, each checked against the installed
version: an upgrade that renames or retypes one fails here, by name, instead of silently turning a guard or a
measurement off. Each use carries a comment naming the version it was read from (Twisted 26.10, Autobahn
26.11, pyOpenSSL 26.4)."""
from __future__ import annotations

import inspect

from twisted.trial.unittest import TestCase


class TwistedInternalsTests(TestCase):
    def test_the_write_buffers_a_slow_socket_is_measured_by_are_there(self):
        """channel/protocol.py buffered_bytes: TCP's pending bytes and TLS's unsent application data."""
        from twisted.internet.abstract import FileDescriptor
        from twisted.protocols.tls import TLSMemoryBIOProtocol
        self.assertIn("_tempDataLen", inspect.getsource(FileDescriptor.write))
        self.assertIn("_appSendBuffer", inspect.getsource(TLSMemoryBIOProtocol))

    def test_a_lost_request_has_no_channel(self):
        """web/router.py: `request.channel is None` is how a route sees that its client is gone."""
        from twisted.web.http import Request
        self.assertIn("self.channel = None", inspect.getsource(Request.connectionLost))


class AutobahnInternalsTests(TestCase):
    def test_the_batched_timer_and_timings_are_there(self):
        """channel/timers.py replaces the factory's `_batched_timer`; channel/autobahn_debug.py formats
        `Timings._timings` lazily and replaces the module's `pformat`."""
        import autobahn.websocket.protocol as protocol
        from autobahn.twisted.websocket import WebSocketServerFactory
        factory = WebSocketServerFactory()
        self.assertTrue(hasattr(factory, "_batched_timer"))
        self.assertTrue(callable(getattr(factory._batched_timer, "call_later", None)))
        self.assertIsInstance(protocol.Timings()._timings, dict)
        self.assertIn("pformat(", inspect.getsource(protocol), "the module's log calls format with pformat")


class PyOpenSSLInternalsTests(TestCase):
    def test_the_bindings_and_handles_the_tls_profile_uses_are_there(self):
        """listen/tls.py: SSL_CTX_set1_curves_list on the context's handle (key-exchange groups),
        X509_STORE_CTX_set_error through the verify wrapper's `store_ctx` (alert 44), and the verify error
        strings."""
        from OpenSSL import SSL
        from OpenSSL._util import ffi, lib
        for name in ("SSL_CTX_set1_curves_list", "X509_STORE_CTX_set_error", "X509_verify_cert_error_string",
                     "X509_V_ERR_CERT_REVOKED"):
            self.assertTrue(hasattr(lib, name), name)
        ctx = SSL.Context(SSL.TLS_METHOD)
        self.assertEqual(ffi.typeof(ctx._context), ffi.typeof("SSL_CTX *"))
        wrapper = inspect.getsource(SSL._VerifyHelper)
        self.assertIn("store_ctx", wrapper, "say_revoked reads the wrapper's store_ctx two frames up")
