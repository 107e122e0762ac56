"""The CA as the running daemon uses it: issue, revoke, rotate. Every change is committed first.

What follows from a change (OCSP cache, CRL rebuild, TLS context, service sockets) is not done
here: the CA publishes `CertificateRevoked` / `CaRotated` on the event bus and the components that
care subscribe (see uptrakitd.process.daemon for who, and in which order).
"""
from __future__ import annotations

import datetime
from typing import Any, Callable, Iterable

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..audit import BY_SYSTEM, AuditTrail, Said, audited
from ..errors import StorageUnavailable, BadRequest, Conflict, NotFound
from ..events import CaRotated, CertificateRevoked, EventBus
from uptrakitd.observability.metrics import Metrics
from ..store import DuplicateRow, Store, ca_generations, certificates
from .ca import AUTO_ROTATE_WHEN_LEFT, CaGeneration, create_ca
from .crl import REASONS
from .keys import FileKeys
from .files import PkiFiles
from .issue import Issued, issue_client_certificate, issue_in_worker, issue_server_certificate, load_csr
from .serials import format_serial, parse_serial
from .state import CapReached, CaState, CertRecord, insert_generation, insert_issued

log = Logger()


class CertificateAuthority:
    """Issue, revoke and rotate against the in-memory CaState and the store, then announce it."""

    def __init__(self, state: CaState, store: Store, bus: EventBus, metrics: Metrics, files: PkiFiles,
                 clock: IReactorTime, run_blocking: Callable[..., Deferred],
                 pki_addr: Callable[[], str | None], trust_domain: str, keys: Any = None,
                 worker: Callable[..., Deferred] | None = None, audit: AuditTrail | None = None) -> None:
        self.state = state
        self.audit = audit
        self.keys = keys if keys is not None else FileKeys(files)   # where new CA keys are kept
        self.worker = worker   # submit(fn, *args) to the PKI worker process (None: here, as unit tests do)
        self._materials: dict[int, tuple[CaGeneration, bytes, tuple[Any, ...]]] = {}
        self.store = store
        self.bus = bus
        self.metrics = metrics
        self.files = files
        self.clock = clock
        self.run_blocking = run_blocking
        self.pki_addr = pki_addr
        self.trust_domain = trust_domain
        self._rotating = False

    def now(self) -> datetime.datetime:
        """The clock's time as an aware UTC datetime."""
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc)

    def bundle_pem(self) -> bytes:
        """The trusted CA bundle, active first (the bytes served, pushed and hashed)."""
        return self.state.bundle_pem(self.now())

    def bundle_hash(self) -> str:
        """Lowercase hex SHA-256 of bundle_pem()."""
        return self.state.bundle_hash(self.now())

    # -- issuing -------------------------------------------------------------------------------

    @inlineCallbacks
    def issue_for_service(self, csr_pem: str | bytes, service_id: str, kind: str,
                          lifetime: datetime.timedelta, cap: int | None = None) -> Any:
        """Check a CSR and sign it with the active CA, then record it; fires with Issued.

        With a worker (the daemon's PKI worker process), the CSR check and the signature run there, off
        the reactor; a CsrRejected comes back as is. Without one (unit tests), they run here.
        """
        ca = self.state.active()
        if self.worker is None or ca.signer is None:
            issued = issue_client_certificate(ca, load_csr(csr_pem), service_id, kind, self.trust_domain, lifetime,
                                              self.pki_addr(), self.now())
        else:
            cert_der, signer_spec = self._material(ca)
            der = yield self.worker(issue_in_worker, cert_der, signer_spec, ca.generation, ca.external, csr_pem,
                                    service_id, kind, self.trust_domain, lifetime.total_seconds(), self.pki_addr(),
                                    self.clock.seconds())
            cert = x509.load_der_x509_certificate(der)
            issued = Issued(cert, cert.serial_number, ca.generation)
        try:
            yield self._record(issued, service_id, "client", cap)
        except CapReached:
            raise Conflict(f"service already holds {cap} valid certificates; connect with the newest one (older "
                           "ones are revoked then) before asking for another", "too_many_certificates") from None
        log.info("issued certificate {serial} to service {service_id} (CA G{generation}, until {not_after})",
                 serial=format_serial(issued.serial), service_id=service_id, generation=ca.generation,
                 not_after=issued.cert.not_valid_after_utc.isoformat())
        return issued

    def _material(self, ca: CaGeneration) -> tuple[bytes, tuple[Any, ...]]:
        """The CA's certificate (DER) and signer spec for the worker, serialised once per generation."""
        cached = self._materials.get(ca.generation)
        if cached is None or cached[0] is not ca:
            assert ca.signer is not None
            cached = (ca, ca.cert.public_bytes(Encoding.DER), ca.signer.spec())
            self._materials[ca.generation] = cached
        return cached[1], cached[2]

    @inlineCallbacks
    def issue_server_certificate(self, hostname: str, sans: Iterable[str], ca: CaGeneration | None = None) -> Any:
        """A recorded server certificate from `ca` (default: the active CA); fires with (Issued, key)."""
        # (off the reactor: the CA key may be in a token)
        issued, key = yield self.run_blocking(issue_server_certificate, ca or self.state.active(), hostname,
                                              tuple(sans), self.pki_addr(), self.now())
        # recorded before anyone uses it: a certificate the records lack would get OCSP "unknown"
        yield self._record(issued, None, "server")
        return issued, key

    @inlineCallbacks
    def _record(self, issued: Issued, service_id: str | None, purpose: str, cap: int | None = None) -> Any:
        said = Said({"kind": "service", "id": service_id}) if service_id else BY_SYSTEM
        record = yield audited(self.audit, self.store, insert_issued, issued, service_id, purpose,
                               int(self.clock.seconds()), cap, action="certificate.issued",
                               obj={"kind": "certificate", "id": format_serial(issued.serial)},
                               details={"purpose": purpose, "service_id": service_id,
                                        "ca_generation": issued.ca_generation,
                                        "not_after": issued.cert.not_valid_after_utc.isoformat()}, said=said)
        self.state.add_record(record)
        return record

    # -- revoking ------------------------------------------------------------------------------

    @inlineCallbacks
    def revoke(self, serial: int, reason: str, said: Said = BY_SYSTEM) -> Any:
        """Revoke durably, then announce it (OCSP, CRL, TLS and sockets follow); fires with the CertRecord."""
        if reason not in REASONS:
            raise BadRequest(f"unknown revocation reason {reason!r}; one of {', '.join(REASONS)}",
                             "invalid_reason")
        record = self.state.records.get(serial)
        if record is None:
            raise NotFound(f"no certificate with serial {format_serial(serial)}", "certificate_not_found")
        if record.revoked_at is not None:
            raise Conflict(f"certificate {format_serial(serial)} is already revoked", "already_revoked")
        if record.purpose == "server":
            # revoking it would leave the daemon serving a revoked certificate until the next re-issue
            raise Conflict(f"certificate {format_serial(serial)} is this controller's own server certificate; it is "
                           "not revoked through the API. It is re-issued automatically 30 days before expiry and "
                           "on every CA rotation: rotate the CA to replace it now.", "server_certificate")
        revoked_at = int(self.clock.seconds())
        yield audited(self.audit, self.store, certificates.mark_revoked, format_serial(serial), revoked_at, reason,
                      action="certificate.revoked", obj={"kind": "certificate", "id": format_serial(serial)},
                      details={"reason": reason, "service_id": record.service_id, "purpose": record.purpose},
                      said=said)
        yield self.apply_revocations([format_serial(serial)], revoked_at, reason)
        return record

    def apply_revocations(self, serials: list[str], revoked_at: int, reason: str) -> Deferred:
        """Make revocations that are already committed effective here: records, metrics, the event."""
        events = []
        for serial in serials:
            record = self.state.records.get(parse_serial(serial))
            if record is None or record.revoked_at is not None:
                continue
            record.revoked_at, record.reason = revoked_at, reason
            self.metrics.revocations.labels(reason).inc()
            log.info("revoked {serial} ({reason})", serial=serial, reason=reason)
            events.append(CertificateRevoked(record.serial, record.service_id, record.ca_generation, reason,
                                             revoked_at))
        return _publish_in_order(self.bus, events)

    @inlineCallbacks
    def adopt_certificate(self, serial_hex: str, row: Any = None) -> Any:
        """Another controller issued or revoked this certificate: read its record (unless given) and make it
        known here; a revocation then takes effect here as if made here (OCSP, CRL, TLS, the socket)."""
        if row is None:
            row = yield self.store.run(certificates.load_one, serial_hex)
        if row is None:
            return None
        serial = int(row["serial"], 16)
        record = self.state.records.get(serial)
        if record is None:
            record = CertRecord(serial, row["service_id"], row["purpose"], row["ca_generation"], row["not_before"],
                                row["not_after"])
            self.state.add_record(record)
        if row["revoked_at"] is not None and record.revoked_at is None:
            yield self.apply_revocations([row["serial"]], row["revoked_at"], row["revocation_reason"])
        return record

    def supersede_older(self, service_id: str, serial: int) -> None:
        """A service that authenticates with a certificate no longer needs the ones issued before it.

        Newer ones are left alone: an answer that was lost on the way is useless without the key the
        service discarded, and revoking on issue would lock out a service whose answer was lost.
        """
        issued = self.state.by_service.get(service_id, [])  # in issue order
        position = next((i for i, r in enumerate(issued) if r.serial == serial), 0)
        for record in issued[:position]:
            if record.revoked_at is None and record.purpose == "client":
                self.revoke(record.serial, "superseded").addErrback(_superseded_failed, record.serial)

    # -- rotation ------------------------------------------------------------------------------

    @property
    def rotating(self) -> bool:
        """True while a rotation runs."""
        return self._rotating

    @inlineCallbacks
    def rotate(self, said: Said = BY_SYSTEM, trigger: str = "api") -> Any:
        """Create generation n+1, make it active, then announce it (SPEC §4.6); fires with the API's answer."""
        active = self.state.active()
        if active.external:
            raise BadRequest("the CA is external (--ca-cert/--ca-key); rotate it outside uptrakitd",
                             "external_ca")
        if self._rotating:
            raise Conflict("a CA rotation is already running", "rotation_in_progress")
        self._rotating = True
        try:
            generation = active.generation + 1
            signer = yield self.run_blocking(self.keys.new, generation)
            cert = yield self.run_blocking(create_ca, generation, self.pki_addr(), self.now(), signer)
            try:
                key_file, key_sealed = yield self.run_blocking(self.keys.save, generation, signer)
            except OSError as e:   # a full or read-only disk: nothing was committed, nothing changed
                log.error("CA rotation refused: the new CA key could not be written ({error})", error=e.strerror or e)
                raise StorageUnavailable(f"storage unavailable: the new CA key could not be written "
                                         f"({e.strerror or e})") from None
            ca = CaGeneration(generation, cert, signer, False)
            try:
                yield audited(self.audit, self.store, insert_generation, ca, key_file, int(self.clock.seconds()),
                              key_sealed, action="ca.rotated", obj={"kind": "ca_generation", "id": str(generation)},
                              details={"previous": active.generation, "fingerprint": ca.fingerprint,
                                       "custody": ca.custody, "not_after": ca.not_after.isoformat(),
                                       "trigger": trigger}, said=said)
            except DuplicateRow:
                # several controllers: another one created this generation a moment ago
                raise Conflict(f"CA generation {generation} was just created by another controller",
                               "rotation_in_progress") from None
            notified = yield self._activate(ca, active.generation)
            return {"generation": generation, "fingerprint": ca.fingerprint, "not_after": ca.not_after.isoformat(),
                    "ca_bundle_hash": self.bundle_hash(), "notified": notified}
        finally:
            self._rotating = False

    @inlineCallbacks
    def _activate(self, ca: CaGeneration, previous: int, where: str = "") -> Any:
        """Make a committed generation active here and announce it; fires with how many services were told."""
        self.state.add_generation(ca)
        try:
            yield self.run_blocking(self.files.write_bundle, self.bundle_pem())
        except OSError as e:   # the generation is committed: the file is only a copy for operators and proxies
            log.error("the CA bundle file could not be written ({error}); it is written again at the next start "
                      "or rotation", error=e.strerror or e)
        log.info("rotated the CA{where}: generation {generation} ({cn}) is active, G{previous} stays trusted",
                 where=where, generation=ca.generation, cn=ca.common_name, previous=previous)
        # subscribers: CRLs rebuilt, TLS context swapped, then services told (they answer how many)
        results = yield self.bus.publish(CaRotated(ca.generation, previous, self.bundle_hash()))
        return sum(r for r in results if isinstance(r, int))

    @inlineCallbacks
    def adopt_generation(self, generation: int) -> Any:
        """Another controller rotated the CA: load the new generation (its key sealed in the database),
        make it active here and announce it, as `rotate` does; fires with how many services were told."""
        if generation in self.state.generations:
            return 0
        row = yield self.store.run(ca_generations.load_one, generation)
        if row is None or row["external"]:
            return 0
        cert = x509.load_pem_x509_certificate(row["cert_pem"].encode())
        signer = yield self.run_blocking(self.keys.load, generation, row["key_file"], row["key_sealed"])
        previous = self.state.active().generation
        notified = yield self._activate(CaGeneration(generation, cert, signer, False), previous,
                                        " (on another controller)")
        return notified

    def prune_expired_records(self) -> int:
        """Daily: drop long-expired certificate records from memory; fires nothing, returns how many."""
        gone = self.state.prune_expired(self.clock.seconds())
        if gone:
            log.info("forgot {count} certificate records expired more than a day ago (the store keeps them)",
                     count=gone)
        return gone

    def check_expiry(self) -> Deferred | None:
        """Daily: rotate automatically when the active CA has less than 183 days left."""
        active = self.state.active()
        if active.external or self._rotating or active.not_after - self.now() >= AUTO_ROTATE_WHEN_LEFT:
            return None
        log.info("active CA expires {when}: rotating automatically", when=active.not_after.isoformat())
        return self.rotate(trigger="expiry")


def _superseded_failed(failure: Failure, serial: int) -> None:
    if not failure.check(Conflict):  # revoked meanwhile: nothing to do
        log.failure("could not supersede {serial}", failure, serial=format_serial(serial))


@inlineCallbacks
def _publish_in_order(bus: EventBus, events: list[Any]) -> Any:
    for event in events:
        yield bus.publish(event)


__all__ = ["CertificateAuthority", "CertRecord"]
