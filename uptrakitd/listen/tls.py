"""The HTTPS listener's TLS context: client certificates requested, verified against our CAs.

Revocation is checked in the verify callback against the in-memory records rather than with
OpenSSL's CRL_CHECK: a lookup per handshake instead of re-parsing a 100 000-entry CRL on the
reactor thread at every rebuild, and a revocation takes effect at once instead of at the next CRL.
The context is swapped as a whole when the trusted CAs or the server certificate change; a
connection keeps the context it was accepted with.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from ..pki.serials import format_serial

log = Logger()
# Mozilla "intermediate": X25519, P-256, P-384 (OpenSSL's default adds X448, P-521 and the FFDHE groups)
GROUPS = b"X25519:P-256:P-384"
SSL_MODE_NO_AUTO_CHAIN = 0x00000008   # OpenSSL's ABI constant; pyOpenSSL has no name for it
TLS12_CIPHERS = (b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
                 b"ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")


def build_context(server_cert: x509.Certificate, server_key: Any, trusted_cas: Iterable[x509.Certificate],
                  is_revoked: Callable[[int], bool] = lambda serial: False,
                  refused: Callable[[str], Any] = lambda reason: None) -> SSL.Context:
    """A TLS >= 1.2 server context asking (not requiring) a client certificate; revoked leaves refused."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    # TLS 1.2: ECDHE with AEAD only (Mozilla "intermediate"); TLS 1.3 suites are all AEAD already
    ctx.set_cipher_list(TLS12_CIPHERS)
    # No resumption: a resumed session would skip the certificate check against the newest CRL.
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_session_id(b"uptrakitd")
    # an idle connection (most agents, most of the time) gives its ~34 KB of read/write buffers back; the
    # chain is the server certificate alone: OpenSSL would add the self-signed CA from the verify store,
    # which a client must already hold to trust it (RFC 8446 §4.4.2: a root may be left out)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS | SSL_MODE_NO_AUTO_CHAIN)
    limit_groups(ctx)
    ctx.use_certificate(crypto.X509.from_cryptography(server_cert))
    ctx.use_privatekey(crypto.PKey.from_cryptography_key(server_key))
    ctx.check_privatekey()
    store = ctx.get_cert_store()
    if store is None:
        raise RuntimeError("OpenSSL gave the new context no certificate store")
    cas = list(trusted_cas)
    for ca in cas:
        store.add_cert(crypto.X509.from_cryptography(ca))
    ctx.set_client_ca_list([crypto.X509.from_cryptography(ca).get_subject() for ca in cas])

    def verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            reason = _verify_reason(errno)
            log.info("TLS client certificate refused at depth {depth}: {reason}", depth=depth, reason=reason)
            refused("expired" if "expired" in reason else "not valid yet" if "not yet valid" in reason
                    else "untrusted issuer" if "issuer" in reason or "unable to get" in reason else "invalid")
            return False
        if depth == 0 and is_revoked(cert.get_serial_number()):
            log.info("TLS client certificate refused: serial {serial} is revoked", serial=format_serial(cert.get_serial_number()))
            refused("revoked")
            say_revoked()
            return False
        return True
    ctx.set_verify(SSL.VERIFY_PEER, verify)
    return ctx


def limit_groups(ctx: SSL.Context) -> None:
    """Offer only GROUPS for key exchange. pyOpenSSL has no public call for SSL_CTX_set1_groups_list; the
    bindings it already loads have the same function under its older name (set1_curves_list), used here on
    the context's handle (`Context._context`, pyOpenSSL 26.4; tests/test_library_internals.py). Without it the
    daemon still starts, and says which groups it offers instead."""
    from OpenSSL._util import lib
    setter = getattr(lib, "SSL_CTX_set1_curves_list", None)
    handle = getattr(ctx, "_context", None)
    if setter is None or handle is None or setter(handle, GROUPS) != 1:
        log.warn("TLS: cannot limit key-exchange groups to {groups} with this pyOpenSSL; OpenSSL's defaults "
                 "(X448, P-521 and FFDHE too) are offered", groups=GROUPS.decode())


def say_revoked() -> None:
    """Make the handshake's alert certificate_revoked (44) instead of internal_error (80).

    OpenSSL picks the alert from the verification error on the X509_STORE_CTX, and a refusal by the verify
    callback leaves that error at "ok". pyOpenSSL's callback API does not hand the store context to the
    callback and binds no cert-verify callback; its wrapper, our caller, holds it as `store_ctx` (pyOpenSSL
    26.4), and the bindings it loads have X509_STORE_CTX_set_error. Anything unexpected leaves the alert as it
    was (tests/test_tls.py asserts the alert, so a pyOpenSSL that changes this is noticed)."""
    import sys

    from OpenSSL._util import ffi, lib
    try:
        store_ctx = sys._getframe(2).f_locals.get("store_ctx")
        if store_ctx is not None and ffi.typeof(store_ctx) is ffi.typeof("X509_STORE_CTX *"):
            lib.X509_STORE_CTX_set_error(store_ctx, lib.X509_V_ERR_CERT_REVOKED)
    except (AttributeError, TypeError, ValueError):
        pass


def _verify_reason(errno: int) -> str:
    from OpenSSL._util import ffi, lib
    try:
        return ffi.string(lib.X509_verify_cert_error_string(errno)).decode()
    except Exception:
        return f"verify error {errno}"


@implementer(IOpenSSLServerConnectionCreator)
class SwappableServerContext:
    """Connection creator whose context can be replaced at runtime without touching open connections."""

    def __init__(self, context: SSL.Context | None = None) -> None:
        self.context = context
        self.generation = 0

    def install(self, context: SSL.Context) -> None:
        """Use `context` for every connection accepted from now on."""
        self.context = context
        self.generation += 1

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        if self.context is None:
            raise RuntimeError("no TLS context installed yet")
        return SSL.Connection(self.context, None)
