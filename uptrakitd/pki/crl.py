"""CRLs: one per served CA generation, signed in a worker process, coalesced, published atomically.

Encoding and signing a 100 000-entry CRL are single calls into cryptography's Rust code that hold
the GIL for 100-250 ms each, so a thread would still stall the reactor; a worker process does not.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..store import Store, ca_generations
from .ca import CaGeneration
from .files import PkiFiles
from .signer import Signer, SignerUnavailable, signer_from_spec
from .state import CaState, CertRecord

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
MAX_RETRY_SECONDS = 60.0
Entry = tuple[int, int, str]  # (serial, revoked_at, reason)


@dataclass(frozen=True)
class PublishedCrl:
    """One signed CRL as served."""

    generation: int
    der: bytes
    pem: bytes
    number: int
    this_update: datetime.datetime
    entries: int
    etag: str = field(default="")

    @property
    def crl(self) -> x509.CertificateRevocationList:
        return x509.load_der_x509_crl(self.der)


def revoked_entries(records: Iterable[CertRecord], generation: int, now_ts: int) -> list[Entry]:
    """Revoked certificates of one CA whose notAfter is not more than 24 h in the past."""
    cutoff = now_ts - GRACE_SECONDS
    return [(r.serial, r.revoked_at, r.reason or "unspecified") for r in records
            if r.ca_generation == generation and r.revoked_at is not None and r.not_after >= cutoff]


def _entry(serial: int, revoked_at: int, reason: str) -> x509.RevokedCertificate:
    builder = (x509.RevokedCertificateBuilder().serial_number(serial)
               .revocation_date(datetime.datetime.fromtimestamp(revoked_at, datetime.timezone.utc)))
    flag = REASONS.get(reason, x509.ReasonFlags.unspecified)
    if flag is not x509.ReasonFlags.unspecified:
        builder = builder.add_extension(x509.CRLReason(flag), critical=False)
    return builder.build()


def sign_crl(ca_cert_der: bytes, signer: Signer, entries: list[Entry], number: int, now_ts: float,
             validity_seconds: int, cache: dict[Entry, x509.RevokedCertificate]) -> tuple[bytes, bytes]:
    """Sign one CA's CRL; returns (DER, PEM). `cache` keeps built entries between rebuilds."""
    cert = x509.load_der_x509_certificate(ca_cert_der)
    revoked = []
    for e in entries:
        built = cache.get(e)
        if built is None:
            built = cache[e] = _entry(*e)
        revoked.append(built)
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:  # external CAs may lack it
        ski = x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    now = datetime.datetime.fromtimestamp(int(now_ts), datetime.timezone.utc)
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=cert.subject, last_update=now, next_update=now + datetime.timedelta(seconds=validity_seconds),
        extensions=[], revoked_certificates=revoked)
    builder = builder.add_extension(x509.CRLNumber(number), critical=False)
    builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                                    critical=False)
    crl = signer.crl(builder)
    return crl.public_bytes(serialization.Encoding.DER), crl.public_bytes(serialization.Encoding.PEM)


_WORKER_CACHES: dict[bytes, dict[Entry, x509.RevokedCertificate]] = {}


def sign_crl_in_worker(ca_cert_der: bytes, signer_spec: tuple[Any, ...], entries: list[Entry], number: int, now_ts: float,
                       validity_seconds: int) -> tuple[bytes, bytes]:
    """sign_crl with a per-CA entry cache that lives as long as the worker process."""
    key = hashlib.sha256(ca_cert_der).digest()
    old = _WORKER_CACHES.get(key, {})
    fresh = {e: old[e] for e in entries if e in old}
    result = sign_crl(ca_cert_der, signer_from_spec(signer_spec), entries, number, now_ts, validity_seconds, fresh)
    _WORKER_CACHES[key] = fresh
    return result


def _signer_of(ca: CaGeneration) -> Signer:
    if ca.signer is None:
        raise SignerUnavailable(f"CA generation {ca.generation}'s key is not available here")
    return ca.signer


def _ca_material(ca: CaGeneration) -> tuple[bytes, tuple[Any, ...]]:
    return ca.cert.public_bytes(serialization.Encoding.DER), _signer_of(ca).spec()


def _published(generation: int, der: bytes, pem: bytes, number: int, now: datetime.datetime,
               entries: int) -> PublishedCrl:
    return PublishedCrl(generation, der, pem, number, now, entries,
                        '"' + hashlib.sha256(der).hexdigest()[:32] + '"')


class CrlPublisher:
    """Keeps the served CRLs current: rebuilds in a worker process, coalesces bursts, persists numbers.

    Subscribes (through the composition root) to `CertificateRevoked` (a rebuild soon) and
    `CaRotated` (a rebuild now, finished before the rotation is announced).
    """

    def __init__(self, state: CaState, store: Store, files: PkiFiles, clock: IReactorTime,
                 run_blocking: Callable[..., Deferred], worker: Callable[..., Deferred] | None = None,
                 validity: datetime.timedelta = datetime.timedelta(hours=24), coalesce_seconds: float = 0.5,
                 lag_grace: float = 30.0) -> None:
        self.state = state
        self.store = store
        self.files = files
        self.clock = clock
        self.run_blocking = run_blocking
        self.validity = validity
        self.coalesce_seconds = coalesce_seconds
        self.current: dict[int, PublishedCrl] = {}
        self.bundle = b""
        self.bundle_etag = '""'
        self.worker = worker   # PkiWorker.submit; without one (unit tests) a CRL is signed by run_blocking
        self._scheduled: Any = None
        self._running: Deferred | None = None
        self._dirty = False
        self._stopped = False
        self._retry_delay = 0.0
        self.lag_grace = lag_grace
        self._revocations_seen = 0               # revocations announced since start
        self._missing_since: float | None = None  # when the first one the served CRLs lack happened

    @staticmethod
    def _bundle_of(crls: list[PublishedCrl]) -> bytes:
        return b"".join(c.pem for c in sorted(crls, key=lambda c: c.generation, reverse=True))

    def _publish(self, crls: list[PublishedCrl]) -> None:
        self.current = {c.generation: c for c in crls}
        self.bundle = self._bundle_of(crls)
        # the bundle's ETag from the members' (already hashed off the reactor), not a hash of 5 MB here
        self.bundle_etag = '"' + hashlib.sha256("".join(c.etag for c in crls).encode()).hexdigest()[:32] + '"'

    def publish_at_start(self, numbers: dict[int, int], now: datetime.datetime) -> bool:
        """Serve CRLs at start-up (before the reactor runs); True when they still need a rebuild.

        The CRLs written last time are served as they are when they cover every served generation,
        are still valid, and no revocation happened after they were signed; the rebuild then runs
        once the listeners are up (a 100 000-entry CRL takes seconds to build). Otherwise they are
        built here, in the calling thread.
        """
        stored = self._stored_crls(now)
        if stored is not None:
            self._publish(stored)
            log.info("serving the stored CRLs ({summary}); rebuilding after start",
                     summary=", ".join(f"G{c.generation} #{c.number}" for c in stored))
            return True
        out = []
        records = list(self.state.records.values())
        for ca in self.state.served(now):
            entries = revoked_entries(records, ca.generation, int(now.timestamp()))
            der, pem = sign_crl(ca.cert.public_bytes(serialization.Encoding.DER), _signer_of(ca), entries,
                                numbers[ca.generation], now.timestamp(),
                                int(self.validity.total_seconds()), {})
            out.append(_published(ca.generation, der, pem, numbers[ca.generation],
                                  now.replace(microsecond=0), len(entries)))
        self.files.write_crls(self._bundle_of(out))
        self._publish(out)
        return False

    def _stored_crls(self, now: datetime.datetime) -> list[PublishedCrl] | None:
        try:
            pem = self.files.crl_path.read_bytes()
            end = b"-----END X509 CRL-----"
            pems = [part.strip() + b"\n" + end + b"\n" for part in pem.split(end) if part.strip()]
            crls = [(x509.load_pem_x509_crl(p), p) for p in pems]
        except (OSError, ValueError):
            return None
        served = {ca.generation: ca for ca in self.state.served(now)}
        found: dict[int, PublishedCrl] = {}
        # the file is ours (written atomically in the 0700 data dir): matched by issuer, not re-verified
        for crl, crl_pem in crls:
            ca = next((c for c in served.values() if c.cert.subject == crl.issuer), None)
            if ca is None or crl.next_update_utc is None:
                continue
            try:
                number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            except x509.ExtensionNotFound:
                continue
            this_update = crl.last_update_utc
            if now >= crl.next_update_utc or now - this_update > datetime.timedelta(hours=1):
                return None
            der = base64.b64decode(b"".join(crl_pem.strip().splitlines()[1:-1]))
            found[ca.generation] = _published(ca.generation, der, crl_pem, number, this_update, len(crl))
        if set(found) != set(served):
            return None
        newest = max((r.revoked_at or 0 for r in self.state.records.values()), default=0)
        if newest >= min(c.this_update.timestamp() for c in found.values()):
            return None   # a revocation the stored CRLs may lack (e.g. a kill -9 before the rebuild)
        return list(found.values())

    def bundle_pem(self) -> bytes:
        """Every served CA's CRL as PEM, active first (what nginx/HAProxy/Envoy load)."""
        return self.bundle

    def stale(self, now: datetime.datetime) -> list[int]:
        """Generations whose CRL should be served but is missing or past its validity."""
        return [ca.generation for ca in self.state.served(now)
                if (crl := self.current.get(ca.generation)) is None or now > crl.this_update + self.validity]

    def lag_seconds(self) -> float:
        """For how long the served CRLs have lacked a revocation (0 when they include every one)."""
        return 0.0 if self._missing_since is None else max(0.0, self.clock.seconds() - self._missing_since)

    def behind(self, now: datetime.datetime) -> bool:
        """True when a revocation has been missing from the served CRLs for more than `lag_grace`."""
        return self.lag_seconds() > self.lag_grace

    def stop(self) -> Deferred | None:
        """Cancel a pending rebuild; returns the running rebuild (if any) to wait for."""
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        self._dirty = False
        self._stopped = True
        return self._running

    def on_revoked(self, event: Any) -> None:
        """CertificateRevoked: rebuild soon."""
        self._revocations_seen += 1
        if self._missing_since is None:
            self._missing_since = self.clock.seconds()
        self.request_rebuild()

    def on_ca_rotated(self, event: Any) -> Deferred:
        """CaRotated: rebuild now; fires when the new CRLs are served."""
        return self.rebuild()

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
            d: Deferred = Deferred()

            def after(result: Any) -> Any:
                d.callback(None)
                return result
            self._running.addBoth(after)
            return d
        self._running = self._rebuild()

        def done(result: Any) -> Any:
            self._running = None
            if isinstance(result, Failure):
                self._retry_later()
            else:
                self._retry_delay = 0.0
                if self._dirty:
                    self._dirty = False
                    self.request_rebuild()
            return result
        return self._running.addBoth(done)

    def _retry_later(self) -> None:
        # a failed rebuild (disk full, worker died) is retried with backoff until one succeeds
        self._retry_delay = min(MAX_RETRY_SECONDS, max(1.0, self._retry_delay * 2))
        if self._stopped or (self._scheduled is not None and self._scheduled.active()):
            return
        log.warn("CRL rebuild failed; retrying in {seconds:.0f}s", seconds=self._retry_delay)
        self._scheduled = self.clock.callLater(self._retry_delay, self._scheduled_rebuild)

    def _sign(self, ca: CaGeneration, entries: list[Entry], number: int, now: datetime.datetime) -> Deferred:
        submit = self.worker if self.worker is not None else self.run_blocking
        return submit(sign_crl_in_worker, *_ca_material(ca), entries, number, now.timestamp(),
                      int(self.validity.total_seconds()))

    @inlineCallbacks
    def warm(self) -> Any:
        """Start the worker and fill its entry cache, so the first rebuild after start is a warm one."""
        now = datetime.datetime.fromtimestamp(int(self.clock.seconds()), datetime.timezone.utc)
        records = list(self.state.records.values())
        for ca in self.state.served(now):
            entries = yield self.run_blocking(revoked_entries, records, ca.generation, int(now.timestamp()))
            if entries and not self._stopped:
                current = self.current.get(ca.generation)
                yield self._sign(ca, entries, current.number if current else 0, now)

    @inlineCallbacks
    def _rebuild(self) -> Any:
        now = datetime.datetime.fromtimestamp(int(self.clock.seconds()), datetime.timezone.utc)
        served = self.state.served(now)
        numbers = yield self.store.run(ca_generations.next_crl_numbers, [ca.generation for ca in served])
        records = list(self.state.records.values())  # snapshot taken on the reactor thread
        covered, started = self._revocations_seen, self.clock.seconds()
        crls = []
        for ca in served:
            entries = yield self.run_blocking(revoked_entries, records, ca.generation, int(now.timestamp()))
            der, pem = yield self._sign(ca, entries, numbers[ca.generation], now)
            published = yield self.run_blocking(_published, ca.generation, der, pem, numbers[ca.generation], now,
                                                len(entries))
            crls.append(published)
        # the file first: whoever sees the new CRLs served (a test, a proxy's timer) finds them on disk too
        yield self.run_blocking(self.files.write_crls, self._bundle_of(crls))
        self._publish(crls)
        # revocations that came in while this one was built are still missing: they count from its start
        self._missing_since = None if covered == self._revocations_seen else started
        log.info("CRLs rebuilt: {summary} in {seconds:.2f}s",
                 summary=", ".join(f"G{c.generation} #{c.number} ({c.entries} entries)" for c in crls),
                 seconds=self.clock.seconds() - started)
