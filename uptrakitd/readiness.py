"""The /readyz checks: the database answers, the active CA can sign, every served CRL is fresh."""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks

from .pki.authority import CertificateAuthority
from .pki.crl import CrlPublisher
from .store import Store, ping

DATABASE_TIMEOUT = 2.0


class Readiness:
    """Answers whether this daemon can do its job right now."""

    def __init__(self, store: Store, ca: CertificateAuthority, crls: CrlPublisher) -> None:
        self.store = store
        self.ca = ca
        self.crls = crls

    @inlineCallbacks
    def check(self) -> Any:
        """Fires with {"database", "ca", "crl"}: "ok" or what is wrong."""
        try:
            yield self.store.run(ping).addTimeout(DATABASE_TIMEOUT, self.ca.clock)
            database = "ok"
        except Exception as e:
            database = f"unavailable ({type(e).__name__})"
        now = self.ca.now()
        active = self.ca.state.active()
        ca = "ok" if not active.expired(now) and active.key is not None else "active CA unusable"
        stale = self.crls.stale(now)
        if stale:
            crl = f"CRL of generation {stale[-1]} missing or stale"
        elif self.crls.behind(now):
            crl = f"CRLs lack revocations of the last {self.crls.lag_seconds():.0f}s (rebuild failing?)"
        else:
            crl = "ok"
        return {"database": database, "ca": ca, "crl": crl}
