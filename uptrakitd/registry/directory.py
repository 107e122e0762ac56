"""The services directory: every enrolled service (agents, MQTT bridges), enrollment, approval,
deactivation and certificate issuance for them. The in-memory records and the store change here
and nowhere else."""
from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from uptrakitd.registry.enrollment import consume_enrollment_token
from uptrakitd.audit import BY_SYSTEM, AuditTrail, Said, audited
from uptrakitd.errors import Conflict, Forbidden, NotFound, StorageUnavailable
from uptrakitd.events import EventBus, ServiceChanged
from uptrakitd.pki.authority import CertificateAuthority
from uptrakitd.registry.runtime_settings import RuntimeSettings
from uptrakitd.store import Store, certificates, services as stored
from uptrakitd.registry.tokens import new_token, token_hash

log = Logger()
DEACTIVATION_REASON = "cessationOfOperation"
# valid (unrevoked, unexpired) client certificates one service may hold: the one in use, a renewal
# whose answer may have been lost, and a retry; using the newest revokes the others (supersede)
MAX_VALID_CERTIFICATES = 3


@dataclass(slots=True)
class ServiceRecord:
    """One service as the controller knows it (in memory, in step with the store)."""

    id: str
    kind: str
    hostname: str
    status: str
    created_at: int
    friendly_name: str | None = None
    capabilities: list[str] = field(default_factory=list)
    ip_address: str | None = None
    proxy_ip: str | None = None
    identity_source: str | None = None
    last_seen_at: int | None = None
    cert_lifetime_hours: int | None = None
    ping_interval_seconds: int | None = None
    enrollment_secret_hash: str | None = None
    controller: str | None = None   # several controllers: the one that holds its socket (None: none, or SQLite)


def load_services(conn: Any) -> list[ServiceRecord]:
    """Store operation: every service as a ServiceRecord."""
    return [ServiceRecord(**row) for row in stored.load_all(conn)]


def _enroll(conn: Any, record: ServiceRecord, token: str, now: float) -> tuple[ServiceRecord, dict[str, Any]]:
    token_record = consume_enrollment_token(conn, token, record.kind, now)
    record.status = "approved" if token_record["auto_approve"] else "pending"
    stored.insert(conn, record.id, record.kind, record.hostname, record.status, record.created_at,
                  record.friendly_name, record.capabilities, record.enrollment_secret_hash)
    return record, dict(token_record)


def _used_up(done: tuple[ServiceRecord, dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """The enrollment token's own entry when this enrollment was its last use."""
    token = done[1]
    if token["max_uses"] is None or token["uses"] + 1 < token["max_uses"]:
        return []
    return [("enrollment_token.used_up", {"kind": "enrollment_token", "id": token["id"]},
             {"uses": token["uses"] + 1, "by": done[0].id})]


def _deactivate(conn: Any, service_id: str, revoked_at: int) -> list[str]:
    # one transaction: a crash leaves the service either active with valid certificates, or
    # deactivated with every certificate revoked — never deactivated with valid ones
    stored.update_fields(conn, service_id, status="deactivated", enrollment_secret_hash=None)
    return certificates.revoke_all_of_service(conn, service_id, revoked_at, DEACTIVATION_REASON)


class ServiceDirectory:
    """Owns the service records; every change is committed, applied in memory, then announced."""

    def __init__(self, store: Store, ca: CertificateAuthority, runtime: RuntimeSettings, bus: EventBus,
                 clock: IReactorTime, records: list[ServiceRecord], controller_id: str | None = None,
                 audit: AuditTrail | None = None) -> None:
        self.audit = audit
        self.store = store
        self.ca = ca
        self.runtime = runtime
        self.bus = bus
        self.clock = clock
        self._records = {r.id: r for r in records}
        self._issuing: set[str] = set()   # services with a certificate being issued (one at a time)
        self.controller_id = controller_id   # with PostgreSQL: this controller, among several (cluster.Cluster)

    # -- reading -------------------------------------------------------------------------------

    def get(self, service_id: str) -> ServiceRecord | None:
        """The service with this id (any case, canonical UUID), or None."""
        record = self._records.get(service_id)  # the canonical form: no parsing on the hot path
        if record is not None:
            return record
        try:
            return self._records.get(str(uuid.UUID(service_id)))
        except (ValueError, TypeError, AttributeError):
            return None

    def resolve(self, text: str) -> ServiceRecord:
        """The service named by its id or by a unique start of it of 4 or more characters (the UI and `services
        list` show 8): NotFound, or Conflict naming the services an ambiguous start matches."""
        found = self.get(text)
        if found is not None:
            return found
        prefix = text.lower()
        if len(prefix) >= 4 and all(c in "0123456789abcdef-" for c in prefix):
            matches = sorted(r.id for r in self._records.values() if r.id.startswith(prefix))
            if len(matches) == 1:
                return self._records[matches[0]]
            if matches:
                raise Conflict(f"{text} is the start of {len(matches)} service ids: {', '.join(matches[:10])}"
                               f"{' …' if len(matches) > 10 else ''}: give more of it", "ambiguous_id")
        raise NotFound("no such service", "service_not_found")

    def require(self, service_id: str) -> ServiceRecord:
        """get(), or NotFound."""
        service = self.get(service_id)
        if service is None:
            raise NotFound("no such service", "service_not_found")
        return service

    def __contains__(self, service_id: object) -> bool:
        return service_id in self._records

    def __iter__(self) -> Iterator[ServiceRecord]:
        return iter(list(self._records.values()))

    def __len__(self) -> int:
        return len(self._records)

    def find_by_enrollment_secret(self, secret: str) -> ServiceRecord | None:
        """The service still waiting for its first certificate with this enrollment secret."""
        wanted = token_hash(secret)
        return next((s for s in self._records.values()
                     if s.enrollment_secret_hash and secrets.compare_digest(s.enrollment_secret_hash, wanted)), None)

    # -- changing ------------------------------------------------------------------------------

    @inlineCallbacks
    def enroll(self, kind: str, hostname: str, token: str, friendly_name: str | None = None,
               capabilities: list[str] | None = None) -> Any:
        """Create a service with an enrollment token; fires with (ServiceRecord, enrollment secret).

        TokenRejected when the token cannot be used (nothing is created then).
        """
        secret = new_token("upt_es_")
        record = ServiceRecord(id=str(uuid.uuid4()), kind=kind, hostname=hostname, status="pending",
                               created_at=int(time.time()), friendly_name=friendly_name,
                               capabilities=list(capabilities or []), enrollment_secret_hash=token_hash(secret))
        record, _ = yield audited(self.audit, self.store, _enroll, record, token, time.time(),
                                  action="service.enrolled", obj={"kind": "service", "id": record.id},
                                  details=lambda done: {"kind": done[0].kind, "hostname": done[0].hostname,
                                                        "status": done[0].status, "enrollment_token": done[1]["id"]},
                                  also=_used_up, said=Said({"kind": "service", "id": record.id}))
        self._records[record.id] = record
        return record, secret

    @inlineCallbacks
    def issue_certificate(self, service_id: str, csr_pem: str | bytes, first: bool = False) -> Any:
        """Check the CSR and sign it for an approved service; fires with Issued.

        `first`: the certificate that ends enrollment; the enrollment secret stops working.
        """
        service = self.require(service_id)
        if service.status != "approved":
            raise Forbidden(f"service is {service.status}, not approved", "service_not_approved")
        if service.id in self._issuing:
            raise Conflict("a certificate for this service is being issued already: wait for its answer",
                           "issue_in_progress")
        valid = self.ca.state.valid_client_certificates(service.id, self.clock.seconds())
        if valid >= MAX_VALID_CERTIFICATES:
            raise Conflict(f"service already holds {valid} valid certificates; connect with the newest one "
                           "(older ones are revoked then) before asking for another", "too_many_certificates")
        self._issuing.add(service.id)   # one issue in flight per service on this controller
        try:
            secret = service.enrollment_secret_hash
            if first:
                # one-time: consumed before anything is signed (step-ca records a token's jti first), so of several
                # sockets presenting it, on any controller, one gets a certificate
                if not secret or not (yield self.store.run(stored.take_enrollment_secret, service.id, secret)):
                    raise Conflict("this enrollment's certificate was issued already: one per enrollment",
                                   "enrollment_used")
                service.enrollment_secret_hash = None
            try:
                issued = yield self.ca.issue_for_service(csr_pem, service.id, service.kind,
                                                         self.runtime.lifetime_for(service.cert_lifetime_hours),
                                                         cap=MAX_VALID_CERTIFICATES)
            except Exception:
                if first and secret:   # a refused CSR may be corrected and sent again
                    yield self.store.run(stored.give_back_enrollment_secret, service.id, secret)
                    service.enrollment_secret_hash = secret
                raise
            return issued
        finally:
            self._issuing.discard(service.id)

    @inlineCallbacks
    def update(self, service_id: str, changes: dict[str, Any], said: Said = BY_SYSTEM) -> Any:
        """Change writable fields (lifetime, ping interval, friendly name); fires with the record. What really
        changed is recorded as `service.updated` (old and new value of each field)."""
        service = self.require(service_id)
        changed = {key: {"old": getattr(service, key), "new": value} for key, value in changes.items()
                   if getattr(service, key) != value}
        if changed:
            yield audited(self.audit, self.store, lambda conn, sid: stored.update_fields(conn, sid, **changes),
                          service.id, action="service.updated", obj={"kind": "service", "id": service.id},
                          details={"changed": changed}, said=said)
            for key, value in changes.items():
                setattr(service, key, value)
        return service

    def approve(self, service_id: str, said: Said = BY_SYSTEM) -> Any:
        """pending -> approved; fires with the record (Conflict when not pending)."""
        return self._decide(service_id, "approved", said)

    def reject(self, service_id: str, said: Said = BY_SYSTEM) -> Any:
        """pending -> rejected (its socket is closed); fires with the record."""
        return self._decide(service_id, "rejected", said)

    @inlineCallbacks
    def _decide(self, service_id: str, status: str, said: Said) -> Any:
        service = self.require(service_id)
        if service.status != "pending":
            raise Conflict(f"service is {service.status}, not pending", "not_pending")
        yield audited(self.audit, self.store, lambda conn, sid: stored.update_fields(conn, sid, status=status),
                      service.id, action=f"service.{status}", obj={"kind": "service", "id": service.id},
                      details={"hostname": service.hostname, "kind": service.kind}, said=said)
        service.status = status
        yield self.bus.publish(ServiceChanged(service.id, status))
        return service

    @inlineCallbacks
    def deactivate(self, service_id: str, said: Said = BY_SYSTEM) -> Any:
        """Deactivate and revoke every certificate of the service, in one transaction; fires with the record.

        Idempotent: deactivating again revokes whatever is still valid (nothing, normally).
        """
        service = self.require(service_id)
        revoked_at = int(self.clock.seconds())
        was = service.status
        serials = yield audited(self.audit, self.store, _deactivate, service.id, revoked_at,
                                action="service.deactivated", obj={"kind": "service", "id": service.id},
                                details=lambda serials: {"revoked": list(serials), "was": was}, said=said)
        service.status, service.enrollment_secret_hash = "deactivated", None
        if was != "deactivated":
            log.info("service {service} deactivated", service=service.id)
            # announced before the revocations, so its socket is closed with "service deactivated"
            yield self.bus.publish(ServiceChanged(service.id, "deactivated"))
        yield self.ca.apply_revocations(serials, revoked_at, DEACTIVATION_REASON)
        return service

    @inlineCallbacks
    def refresh(self, service_id: str, values: dict[str, Any] | None = None) -> Any:
        """Another controller changed this service: read it (unless given) and make memory agree; a status
        change is announced here as well (its sockets on this controller are closed when it was deactivated)."""
        if values is None:
            values = yield self.store.run(stored.load_one, service_id)
        if values is None:
            return None
        service = self._records.get(service_id)
        if service is None:
            service = self._records[service_id] = ServiceRecord(**values)
            return service
        was = service.status
        for key, value in values.items():
            setattr(service, key, value)
        if service.status != was:
            log.info("service {service} is {status} (changed on another controller)", service=service_id,
                     status=service.status)
            yield self.bus.publish(ServiceChanged(service.id, service.status))
        return service

    def record_connection(self, service: ServiceRecord, client_ip: str, proxy_ip: str | None,
                          source: str) -> Deferred:
        """Note (in memory at once, durably soon) where a service connected from and how; fires with the
        change-log seq of the note (PostgreSQL; None with SQLite or when it could not be written)."""
        now = int(self.clock.seconds())
        service.ip_address, service.proxy_ip = client_ip, proxy_ip
        service.identity_source, service.last_seen_at = source, now
        service.controller = self.controller_id
        return self.store.run(stored.record_connection, service.id, client_ip, proxy_ip, source, now).addErrback(
            _not_recorded, "the connection of " + service.id)

    def record_disconnection(self, service_id: str) -> None:
        """Several controllers: this one no longer holds the service's socket (the others are told)."""
        service = self._records.get(service_id)
        if self.controller_id is None or service is None:
            return
        if service.controller == self.controller_id:
            service.controller = None
        self.store.run(stored.record_disconnection, service_id).addErrback(
            _not_recorded, "the disconnection of " + service_id)

    def holder(self, service: ServiceRecord, here: bool) -> tuple[bool, str | None]:
        """(connected, which controller holds its socket): this one when `here`, else the one the database
        names; the controller is None with SQLite (there is only one)."""
        if here:
            return True, self.controller_id
        elsewhere = service.controller if service.controller != self.controller_id else None
        return elsewhere is not None, elsewhere

    def touch(self, service: ServiceRecord) -> None:
        """Note that a service was seen now (a ping)."""
        now = int(self.clock.seconds())
        service.last_seen_at = now
        self.store.run(stored.update_fields, service.id, last_seen_at=now).addErrback(
            _not_recorded, "last_seen_at of " + service.id)


def _not_recorded(failure: Any, what: str) -> None:
    """A best-effort note that could not be written: a warning while the database is away (expected, and
    said by the store already), a traceback for anything else."""
    if failure.check(StorageUnavailable):
        log.warn("could not record {what}: the database cannot be reached", what=what)
    else:
        log.failure("could not record {what}", failure, what=what)
