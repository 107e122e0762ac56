"""CRLs: one per served CA generation, rebuilt off the reactor thread, coalesced, published atomically."""
from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from ..files import atomic_write
from .authority import Authority, CertRecord
from .ca import CaGeneration

log = Logger()

REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}
GRACE_SECONDS = 86400


@dataclass(frozen=True)
class PublishedCrl:
    """One signed CRL as served."""

    generation: int
    crl: x509.CertificateRevocationList
    der: bytes
    pem: bytes
    number: int
    this_update: datetime.datetime
    entries: int


def _entry(record: CertRecord) -> x509.RevokedCertificate:
    builder = (x509.RevokedCertificateBuilder()
               .serial_number(record.serial)
               .revocation_date(datetime.datetime.fromtimestamp(record.revoked_at, datetime.timezone.utc)))
    reason = REASONS.get(record.reason or "unspecified", x509.ReasonFlags.unspecified)
    if reason is not x509.ReasonFlags.unspecified:
        builder = builder.add_extension(x509.CRLReason(reason), critical=False)
    return builder.build()


def build_crl(ca: CaGeneration, records: Iterable[CertRecord], number: int, now: datetime.datetime,
              validity: datetime.timedelta, cache: dict[tuple[int, int], x509.RevokedCertificate]) -> PublishedCrl:
    """Sign the CRL of one CA. Entries: its revoked certificates not expired by more than 24 h.

    `cache` keeps built entries between rebuilds (building 100 000 of them is the slow part).
    """
    cutoff = int(now.timestamp()) - GRACE_SECONDS
    revoked = []
    for r in records:
        if r.ca_generation != ca.generation or r.revoked_at is None or r.not_after < cutoff:
            continue
        key = (ca.generation, r.serial)
        entry = cache.get(key)
        if entry is None:
            entry = cache[key] = _entry(r)
        revoked.append(entry)
    try:
        ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:  # external CAs may lack it
        ski = x509.SubjectKeyIdentifier.from_public_key(ca.cert.public_key())
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=ca.cert.subject, last_update=now, next_update=now + validity,
        extensions=[], revoked_certificates=revoked)
    builder = builder.add_extension(x509.CRLNumber(number), critical=False)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    crl = builder.sign(ca.key, ca.signing_hash())
    return PublishedCrl(ca.generation, crl, crl.public_bytes(serialization.Encoding.DER),
                        crl.public_bytes(serialization.Encoding.PEM), number, now, len(revoked))


class CrlPublisher:
    """Keeps the served CRLs current: rebuilds off-thread, coalesces bursts, persists numbers and file."""

    def __init__(self, authority: Authority, store: Any, data_dir: Path, clock: Any,
                 to_thread: Callable[..., Deferred], validity: datetime.timedelta = datetime.timedelta(hours=24),
                 coalesce_seconds: float = 0.5) -> None:
        self.authority = authority
        self.store = store
        self.path = Path(data_dir) / "pki" / "ca.crl"
        self.clock = clock
        self.to_thread = to_thread
        self.validity = validity
        self.coalesce_seconds = coalesce_seconds
        self.current: dict[int, PublishedCrl] = {}
        self.observers: list[Callable[[], Any]] = []
        self._cache: dict[tuple[int, int], x509.RevokedCertificate] = {}
        self._scheduled: Any = None
        self._running: Deferred | None = None
        self._dirty = False
        self._stopped = False

    def publish_sync(self, crls: list[PublishedCrl]) -> None:
        """Install CRLs built at start-up (before the reactor runs)."""
        self.current = {c.generation: c for c in crls}
        atomic_write(self.path, self.bundle_pem(), mode=0o644)

    def build_sync(self, numbers: dict[int, int], now: datetime.datetime) -> list[PublishedCrl]:
        """Build every served CRL in the calling thread (start-up only)."""
        records = list(self.authority.records.values())
        return [build_crl(ca, records, numbers[ca.generation], now, self.validity, self._cache)
                for ca in self.authority.served(now)]

    def bundle_pem(self) -> bytes:
        """Every served CA's CRL as PEM, active first (what nginx/HAProxy/Envoy load)."""
        return b"".join(self.current[g].pem for g in sorted(self.current, reverse=True))

    def bundle_etag(self) -> str:
        return '"' + hashlib.sha256(self.bundle_pem()).hexdigest()[:32] + '"'

    def stop(self) -> Deferred | None:
        """Cancel a pending rebuild; returns the running one (if any) to wait for."""
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        self._dirty = False
        self._stopped = True
        return self._running

    def request_rebuild(self) -> None:
        """Ask for a rebuild soon; several requests close together give one rebuild."""
        if self._stopped or (self._scheduled is not None and self._scheduled.active()):
            return
        self._scheduled = self.clock.callLater(self.coalesce_seconds, self._scheduled_rebuild)

    def _scheduled_rebuild(self) -> None:
        self._scheduled = None
        self.rebuild().addErrback(lambda f: log.failure("CRL rebuild failed", f))

    def rebuild(self) -> Deferred:
        """Rebuild now (or right after the running rebuild); fires when the new CRLs are served."""
        if self._running is not None:
            self._dirty = True
            d = Deferred()
            self._running.addBoth(lambda r: (d.callback(None), r)[1])
            return d
        self._running = self._rebuild()

        def done(result: Any) -> Any:
            self._running = None
            if self._dirty:
                self._dirty = False
                self.request_rebuild()
            return result
        return self._running.addBoth(done)

    @inlineCallbacks
    def _rebuild(self) -> Any:
        from .records import next_crl_number
        now = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc)
        served = self.authority.served(now)
        numbers = yield self.store.run(lambda conn: {ca.generation: next_crl_number(conn, ca.generation)
                                                     for ca in served})
        records = list(self.authority.records.values())  # snapshot taken on the reactor thread
        started = self.clock.seconds()
        crls = yield self.to_thread(lambda: [build_crl(ca, records, numbers[ca.generation], now,
                                                       self.validity, self._cache) for ca in served])
        self.current = {c.generation: c for c in crls}
        bundle = self.bundle_pem()
        yield self.to_thread(atomic_write, self.path, bundle, 0o644)
        log.info("CRLs rebuilt: {summary} in {seconds:.2f}s",
                 summary=", ".join(f"G{c.generation} #{c.number} ({c.entries} entries)" for c in crls),
                 seconds=self.clock.seconds() - started)
        for observer in list(self.observers):
            try:
                observer()
            except Exception:
                log.failure("CRL observer failed")
