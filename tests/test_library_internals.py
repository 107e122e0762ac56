"""The private parts of Twisted, Autobahn and pyOpenSSL the daemon reads, each checked against the installed
version: an upgrade that renames or retypes one fails here, by name, instead of silently turning a guard or a
measurement off. Each use carries a comment naming the version it was read from (Twisted 26.10, Autobahn
26.11, pyOpenSSL 26.4). There are five (`NoOtherInternalsTests.LIBRARY`); the scan there fails on a sixth."""
from __future__ import annotations

import inspect

from twisted.trial.unittest import TestCase


class TwistedInternalsTests(TestCase):
    def test_the_write_buffer_a_slow_socket_is_measured_by_is_there(self):
        """channel/protocol.py buffered_bytes: TCP's pending bytes (`dataBuffer` past `offset`, and
        `_tempDataLen`)."""
        from twisted.internet.abstract import FileDescriptor
        self.assertIn("self._tempDataLen += len(data)", inspect.getsource(FileDescriptor.write))
        self.assertIn("self.offset", inspect.getsource(FileDescriptor.doWrite))

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
        timings = protocol.Timings()
        timings.track("a")
        self.assertEqual(list(timings), ["a"])   # channel/autobahn_debug.py prints it through its mapping
        self.assertIsInstance(timings["a"], float)
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


class NoOtherInternalsTests(TestCase):
    """Every underscore name the package reads from an object not its own, and every private module it imports,
    is one of these: a new one fails here until it is listed, with its test above."""

    LIBRARY = {   # the library internals the daemon depends on (five), each checked above
        "_tempDataLen": "Twisted's FileDescriptor: bytes a slow socket has not taken (channel/protocol.py)",
        "_batched_timer": "Autobahn's factory timer, replaced by plain reactor calls (channel/timers.py)",
        "_context": "pyOpenSSL's SSL_CTX handle, to limit key-exchange groups (listen/tls.py)",
        "OpenSSL._util": "pyOpenSSL's bindings: the groups call, alert 44, verify error strings (listen/tls.py)",
        "_getframe": "the `store_ctx` local of pyOpenSSL's verify wrapper, for alert 44 (listen/tls.py)",
    }
    OTHERS = {   # not library internals
        "_exit": "os._exit, the public way to exit at once", "_replace": "namedtuple's public method",
        "_index": "store.common.Row's own field", "_after_close_bytes": "the protocol's own counter",
        "_after_close_frames": "the protocol's own counter",
    }

    def test_only_the_listed_private_names_are_read(self):
        import ast
        from pathlib import Path

        import uptrakitd
        found: dict[str, str] = {}
        for path in sorted(Path(uptrakitd.__file__).parent.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                name = None
                if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                    owner = node.value
                    own = isinstance(owner, ast.Name) and owner.id in ("self", "cls") or (
                        isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super")
                    name = None if own else node.attr
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                        node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2 and \
                        isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("_") and \
                        not str(node.args[1].value).startswith("__"):
                    name = str(node.args[1].value)
                elif isinstance(node, ast.ImportFrom) and node.module and any(
                        part.startswith("_") and not part.startswith("__") for part in node.module.split(".")):
                    name = node.module
                if name is not None:
                    found.setdefault(name, f"{path.name}:{getattr(node, 'lineno', 0)}")
        unknown = {name: where for name, where in found.items() if name not in self.LIBRARY and name not in self.OTHERS}
        self.assertEqual(unknown, {}, "a private name of another module is read: list it, with a test")
        self.assertEqual(sorted(set(self.LIBRARY) - set(found)), [], "listed but no longer read: drop it")
        self.assertLessEqual(len(self.LIBRARY), 5)
