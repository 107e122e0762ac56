"""The /readyz checks: the database answers, the active CA can sign, every served CRL is fresh."""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks

from uptrakitd.pki.authority import CertificateAuthority
from uptrakitd.pki.crl import CrlPublisher
from uptrakitd.store import Store, read_probe, write_probe

DATABASE_TIMEOUT = 2.0
WRITE_PROBE_EVERY = 10.0  # seconds: a probe answered within this reuses the last write's result
SIGNER_PROBE_EVERY = 2.0  # seconds: a CA key in a token is tried again after this (unplugged, back)


class Readiness:
    """Answers whether this daemon can do its job right now."""

    def __init__(self, store: Store, ca: CertificateAuthority, crls: CrlPublisher, freshness: Any = None) -> None:
        self.store = store
        self.freshness = freshness   # several controllers: cluster.ClusterFreshness
        self.ca = ca
        self.crls = crls
        self._last_probe: tuple[float, str] | None = None
        self._signer_probe: tuple[float, str, Any] | None = None
        self.last: dict[str, str] = {}  # the latest answer, for the uptrakit_ready gauge

    @inlineCallbacks
    def check(self) -> Any:
        """Fires with {"database", "ca", "crl"} (and "cluster" with several controllers): "ok" or what is wrong."""
        database = yield self._database()
        now = self.ca.now()
        active = self.ca.state.active()
        ca = "ok" if not active.expired(now) and active.signer is not None else "active CA unusable"
        if ca == "ok":
            ca = yield self._signer(active.signer)
        stale = self.crls.stale(now)
        if stale:
            crl = f"CRL of generation {stale[-1]} missing or stale"
        elif self.crls.behind(now):
            crl = f"CRLs lack revocations of the last {self.crls.lag_seconds():.0f}s (rebuild failing?)"
        else:
            crl = "ok"
        self.last = {"database": database, "ca": ca, "crl": crl}
        if self.freshness is not None:
            self.last["cluster"] = (f"stale ({self.freshness.staleness():.0f} s without a confirmed read of the "
                                    f"other controllers' changes)" if self.freshness.stale() else "ok")
        return self.last

    @inlineCallbacks
    def _signer(self, signer: Any) -> Any:
        # a key in a token: one signature off the reactor, at most every 2 s (a token's state can change any time)
        if signer.in_memory:
            return "ok"
        now = self.ca.clock.seconds()
        if self._signer_probe is None or now - self._signer_probe[0] >= SIGNER_PROBE_EVERY or \
                self._signer_probe[2] is not signer:
            try:
                yield self.ca.run_blocking(signer.check).addTimeout(DATABASE_TIMEOUT, self.ca.clock)
                result = "ok"
            except Exception as e:
                result = f"CA key unavailable ({getattr(e, 'message', None) or type(e).__name__})"
            self._signer_probe = (now, result, signer)
        return self._signer_probe[1]

    @inlineCallbacks
    def _database(self) -> Any:
        # a read every time; a write (which fails on a full disk when reads still work) at most every 10 s
        now = self.ca.clock.seconds()
        try:
            yield self.store.run(read_probe).addTimeout(DATABASE_TIMEOUT, self.ca.clock)
        except Exception as e:
            return f"unavailable ({getattr(e, 'message', None) or type(e).__name__})"
        if self._last_probe is None or now - self._last_probe[0] >= WRITE_PROBE_EVERY:
            try:
                yield self.store.run(write_probe, int(now)).addTimeout(DATABASE_TIMEOUT, self.ca.clock)
                result = "ok"
            except Exception as e:
                result = f"not writable ({getattr(e, 'message', None) or type(e).__name__})"
            self._last_probe = (now, result)
        return self._last_probe[1]
