"""The HTTPS server certificate: re-issued when due or when its issuer leaves the trusted set, and
the TLS context swapped whenever it, the trusted CAs or the revocation view change."""
from __future__ import annotations

import datetime
from typing import Any, Callable

from cryptography import x509
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from ..pki.authority import CertificateAuthority
from ..pki.ca import CaGeneration
from ..pki.files import PkiFiles
from ..pki.issue import server_cert_due
from ..pki.serials import format_serial
from .tls import SwappableServerContext, build_context

log = Logger()


class ServerCertificate:
    """Owns the server certificate and key, and the context the HTTPS listener hands out."""

    def __init__(self, ca: CertificateAuthority, files: PkiFiles, tls: SwappableServerContext,
                 cert: x509.Certificate, key: Any, names: tuple[str, tuple[str, ...]],
                 run_blocking: Callable[..., Deferred], on_install: Callable[[], Any] = lambda: None,
                 on_refused: Callable[[str], Any] = lambda reason: None) -> None:
        self.ca = ca
        self.files = files
        self.tls = tls
        self.cert = cert
        self.key = key
        self.hostname, self.sans = names
        self.run_blocking = run_blocking
        self.on_install = on_install
        self.on_refused = on_refused

    def install(self) -> None:
        """Build and install a TLS context for the current certificate and the trusted CAs."""
        trusted = self.ca.state.trusted(self.ca.now())
        self.tls.install(build_context(self.cert, self.key, [c.cert for c in trusted], self.ca.state.is_revoked,
                                       self.on_refused))
        self.on_install()
        log.debug("TLS context installed (trusted CA generations {gens})", gens=[c.generation for c in trusted])

    def on_ca_rotated(self, event: Any) -> Deferred | None:
        """CaRotated: trust the new set; re-issue first when our issuer just left it.

        The re-issue comes from the *previous* CA, which both the services that follow this rotation
        and those one rotation behind still trust.
        """
        trusted = self.ca.state.trusted(self.ca.now())
        if self.cert.issuer not in [t.cert.subject for t in trusted]:
            return self.reissue(trusted[-1])
        self.install()
        return None

    def check_due(self) -> Deferred | None:
        """Daily: re-issue when 30 days or less remain."""
        if server_cert_due(self.cert, self.ca.now()):
            return self.reissue()
        return None

    def not_after(self) -> datetime.datetime:
        """When the current server certificate expires."""
        return self.cert.not_valid_after_utc

    @inlineCallbacks
    def reissue(self, ca: CaGeneration | None = None) -> Any:
        """A new certificate (from the active CA unless told), recorded, written, then used."""
        issued, key = yield self.ca.issue_server_certificate(self.hostname, self.sans, ca)
        yield self.run_blocking(self.files.write_server, issued.cert, key)
        self.cert, self.key = issued.cert, key
        self.install()
        log.info("re-issued the server certificate {serial}", serial=format_serial(issued.serial))
        return issued
