"""The channel hub: connected services, the per-state message handling, broadcasts (SPEC §5)."""
from __future__ import annotations

import datetime
import secrets
from collections import defaultdict
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .. import services as services_mod
from .. import tokens
from ..errors import Conflict, UptrakitError
from ..pki.serials import format_serial
from . import wire
from .protocol import ENROLL_TIMEOUT, MAX_UNKNOWN_IN_A_ROW, ServiceChannelFactory, ServiceChannelProtocol

log = Logger()
DEFAULT_PING_INTERVAL = 30


class ChannelResource(WebSocketResource):
    """Hands the request's RequestContext (SPEC §3) to the protocol the handshake creates."""

    def render(self, request: Any) -> Any:
        self._factory.next_context = getattr(request, "context", None)
        return super().render(request)


class ChannelHub:
    """Shared by both endpoints: who is connected, and what each message does."""

    def __init__(self, controller: Any, clock: Any) -> None:
        self.c = controller
        self.clock = clock
        self.connected: dict[str, ServiceChannelProtocol] = {}
        self.sockets: set[ServiceChannelProtocol] = set()
        self.factories = {kind: ServiceChannelFactory(kind, self) for kind in ("agent", "mqtt")}
        self.resources = {f"/api/v1/ws/{kind}": ChannelResource(f) for kind, f in self.factories.items()}
        self._renewal_asked: set[int] = set()
        self._renewal_loop: LoopingCall | None = None
        self.slow_consumers = 0
        self.enroll_timeout = ENROLL_TIMEOUT

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.c.pki.rotation_observers.append(self.on_rotation)
        self.c.pki.revocation_observers.append(self.on_revocation)
        self._renewal_loop = LoopingCall(self.check_renewals)
        self._renewal_loop.clock = self.clock
        self._renewal_loop.start(60, now=False)

    @inlineCallbacks
    def stop(self, reason: str = "controller shutting down") -> Any:
        """Tell every service we are restarting, close with 1001, wait (briefly) for the closes."""
        if self._renewal_loop is not None and self._renewal_loop.running:
            self._renewal_loop.stop()
        waits = []
        for proto in list(self.sockets):
            if proto.phase != "connecting" and not proto.closing:
                proto.send("server_restarting", reason=reason)
                d: Deferred = Deferred()
                proto.on_gone = d
                waits.append(d.addTimeout(3, self.clock, onTimeoutCancel=lambda *_: None))
                proto.close("server restarting", code=wire.GOING_AWAY)
        if waits:
            yield DeferredList(waits, consumeErrors=True)

    def metrics_slow_consumer(self) -> None:
        self.slow_consumers += 1
        self.c.metrics.slow_consumers.inc()

    # -- connection events ---------------------------------------------------------------------

    def opened(self, proto: ServiceChannelProtocol) -> None:
        self.sockets.add(proto)
        ctx = proto.context
        if ctx is not None and ctx.identity is not None:
            self._authenticate(proto)
        elif ctx is not None and ctx.rejected_code in ("revoked", "invalid"):
            proto.phase = "rejected"
            log.info("channel: evidence from {client} rejected ({reason})", client=ctx.client_ip, reason=ctx.rejected)
            proto.close(wire.CERT_REVOKED if ctx.rejected_code == "revoked" else wire.CERT_NOT_RECOGNIZED)
        elif proto.bearer is not None:
            self._resume_enrollment(proto)
        else:
            proto.phase = "anonymous"
            proto.enroll_timer = self.clock.callLater(self.enroll_timeout, self._enroll_timeout, proto)

    def closed(self, proto: ServiceChannelProtocol, code: int | None, reason: str | None) -> None:
        self.sockets.discard(proto)
        if proto.service_id and self.connected.get(proto.service_id) is proto:
            del self.connected[proto.service_id]
        gone = getattr(proto, "on_gone", None)
        if gone is not None and not gone.called:
            gone.callback(None)

    def _enroll_timeout(self, proto: ServiceChannelProtocol) -> None:
        if proto.phase == "anonymous":
            proto.close(wire.ENROLLMENT_TIMEOUT)

    def _authenticate(self, proto: ServiceChannelProtocol) -> None:
        identity = proto.context.identity
        service = self.c.service_records.get(identity.service_id)
        if service is None or service.kind != proto.kind:
            proto.phase = "rejected"
            proto.close(wire.CERT_NOT_RECOGNIZED)
            return
        if service.status == "deactivated":
            proto.phase = "rejected"
            proto.close(wire.SERVICE_DEACTIVATED)
            return
        if service.status != "approved":
            proto.phase = "rejected"
            proto.close(wire.SERVICE_NOT_APPROVED)
            return
        old = self.connected.get(service.id)
        if old is not None and old is not proto:
            old.close(wire.SUPERSEDED)
            self.connected.pop(service.id, None)
        proto.phase = "authenticated"
        proto.service_id, proto.serial = service.id, identity.serial
        self.connected[service.id] = proto
        self._record_connection(proto, service)
        self._supersede_older(service.id, identity.serial)
        proto.send("service_settings", ping_interval=service.ping_interval_seconds or DEFAULT_PING_INTERVAL,
                   renewal_window_hours=self.c.renewal_window_hours(),
                   ca_bundle_hash=self.c.pki.authority.bundle_hash(self.c.pki.now()),
                   trust_domain=self.c.settings.trust_domain)
        log.info("service {service} ({kind}) connected from {client} via {source}", service=service.id,
                 kind=service.kind, client=proto.context.client_ip, source=proto.context.identity_source)
        if identity.ca_generation != self.c.pki.authority.active().generation:
            # It missed (or lost the answer to) the renewal a rotation asked for: ask again.
            proto.send("request_cert_renewal", reason="ca_rotation")
        else:
            self._maybe_ask_renewal(proto)

    def _supersede_older(self, service_id: str, serial: int) -> None:
        """A service that authenticates with a certificate no longer needs the ones issued before it.

        Newer ones are left alone: an answer that was lost on the way is useless without the key the
        service discarded, and revoking on issue would lock out a service whose answer was lost.
        """
        issued = self.c.pki.authority.by_service.get(service_id, [])  # in issue order
        position = next((i for i, r in enumerate(issued) if r.serial == serial), 0)
        for record in issued[:position]:
            if record.revoked_at is None and record.purpose == "client":
                self.c.pki.revoke(record.serial, "superseded").addErrback(
                    lambda f, s=record.serial: None if f.check(Conflict) else
                    log.failure("could not supersede {serial}", f, serial=format_serial(s)))

    def _resume_enrollment(self, proto: ServiceChannelProtocol) -> None:
        wanted = tokens.token_hash(proto.bearer)
        service = next((s for s in self.c.service_records.values()
                        if s.enrollment_secret_hash and secrets.compare_digest(s.enrollment_secret_hash, wanted)), None)
        if service is None or service.kind != proto.kind:
            proto.phase = "rejected"
            proto.close(wire.SECRET_NOT_RECOGNIZED)
            return
        proto.phase = "enrolled"
        proto.service_id = service.id
        self._record_connection(proto, service)

    def _record_connection(self, proto: ServiceChannelProtocol, service: Any) -> None:
        ctx = proto.context
        now = int(self.clock.seconds())
        service.ip_address, service.proxy_ip = ctx.client_ip, ctx.proxy_ip
        service.identity_source, service.last_seen_at = ctx.identity_source, now
        self.c.store.run(services_mod.record_connection, service.id, ctx.client_ip, ctx.proxy_ip,
                         ctx.identity_source, now).addErrback(
            lambda f: log.failure("could not record the connection of {service}", f, service=service.id))

    # -- messages ------------------------------------------------------------------------------

    def received(self, proto: ServiceChannelProtocol, message: dict[str, Any]) -> None:
        handler = {
            ("anonymous", "enroll"): self._on_enroll,
            ("enrolled", "request_certificate"): self._on_request_certificate,
            ("authenticated", "ping"): self._on_ping,
            ("authenticated", "renew_certificate"): self._on_renew,
        }.get((proto.phase, message["type"]))
        if handler is None:
            proto.unknown_in_row += 1
            if proto.unknown_in_row >= MAX_UNKNOWN_IN_A_ROW:
                raise wire.ProtocolViolation("unknown_types", f"{MAX_UNKNOWN_IN_A_ROW} unknown messages in a row")
            return
        proto.unknown_in_row = 0
        d = handler(proto, message)
        if isinstance(d, Deferred):
            d.addErrback(self._handler_failed, proto)

    def _handler_failed(self, failure: Any, proto: ServiceChannelProtocol) -> None:
        if failure.check(wire.ProtocolViolation):
            proto.violation(failure.value)
        elif failure.check(UptrakitError):
            proto.send("error", code=failure.value.code, message=failure.value.message)
        elif failure.check(tokens.TokenRejected):
            proto.send("error", code="enrollment_refused", message=str(failure.value))
        else:
            log.failure("channel handler failed for {service}", failure, service=proto.service_id)
            proto.send("error", code="internal_error", message="the controller could not handle this message")

    @inlineCallbacks
    def _on_enroll(self, proto: ServiceChannelProtocol, message: dict[str, Any]) -> Any:
        hostname = wire.field(message, "hostname", str, max_len=253)
        friendly = wire.field(message, "friendly_name", str, required=False, max_len=200)
        token = wire.field(message, "enrollment_token", str, max_len=200)
        caps = wire.field(message, "capabilities", list, required=False) or []
        if len(caps) > 64 or not all(isinstance(c, str) and len(c) <= 64 for c in caps):
            raise wire.ProtocolViolation("invalid_message", "enroll: capabilities must be up to 64 short strings")
        if not hostname.strip():
            raise wire.ProtocolViolation("invalid_message", "enroll: hostname must not be empty")
        secret = tokens.new_token("upt_es_")

        def enroll(conn: Any) -> Any:
            record = tokens.consume_enrollment_token(conn, token, proto.kind)
            status = "approved" if record["auto_approve"] else "pending"
            return services_mod.insert_service(conn, proto.kind, hostname, status, friendly_name=friendly,
                                               capabilities=caps, enrollment_secret_hash=tokens.token_hash(secret))
        proto.phase = "enrolling"
        try:
            service = yield self.c.store.run(enroll)
        except tokens.TokenRejected as e:
            proto.phase = "anonymous"
            log.info("enrollment from {client} refused: {reason}", client=proto.context.client_ip, reason=str(e))
            proto.send("error", code="enrollment_refused", message=str(e))
            return
        service.enrollment_secret_hash = tokens.token_hash(secret)
        self.c.service_records[service.id] = service
        if proto.enroll_timer is not None and proto.enroll_timer.active():
            proto.enroll_timer.cancel()
        proto.phase, proto.service_id = "enrolled", service.id
        self._record_connection(proto, service)
        log.info("service {service} ({kind}, {host}) enrolled from {client}, status {status}", service=service.id,
                 kind=service.kind, host=hostname, client=proto.context.client_ip, status=service.status)
        proto.send("enrolled", service_id=service.id, enrollment_secret=secret, status=service.status)

    @inlineCallbacks
    def _on_request_certificate(self, proto: ServiceChannelProtocol, message: dict[str, Any]) -> Any:
        csr = wire.field(message, "csr_pem", str)
        service = self.c.service_records[proto.service_id]
        if service.status != "approved":
            proto.send("error", code="service_not_approved", message=f"service is {service.status}")
            proto.close(wire.SERVICE_NOT_APPROVED)
            return
        issued = yield self.c.issue_certificate(service.id, csr)
        yield self.c.store.run(services_mod.update_fields, service.id, enrollment_secret_hash=None)
        service.enrollment_secret_hash = None
        self._send_certificate(proto, issued)

    def _send_certificate(self, proto: ServiceChannelProtocol, issued: Any) -> None:
        bundle = self.c.pki.authority.bundle_pem(self.c.pki.now())
        proto.send("certificate", cert_pem=issued.pem.decode("ascii"), ca_bundle_pem=bundle.decode("ascii"),
                   not_after=int(issued.cert.not_valid_after_utc.timestamp() * 1000))

    def _on_ping(self, proto: ServiceChannelProtocol, message: dict[str, Any]) -> None:
        service_ts = wire.field(message, "service_ts", (int, float))
        now = self.clock.seconds()
        proto.send("pong", service_ts=service_ts, controller_ts=int(now * 1000))
        service = self.c.service_records.get(proto.service_id)
        if service is not None:
            service.last_seen_at = int(now)
            self.c.store.run(services_mod.update_fields, service.id, last_seen_at=int(now)).addErrback(
                lambda f: log.failure("could not record last_seen_at", f))

    @inlineCallbacks
    def _on_renew(self, proto: ServiceChannelProtocol, message: dict[str, Any]) -> Any:
        csr = wire.field(message, "csr_pem", str)
        old_serial = proto.serial
        issued = yield self.c.issue_certificate(proto.service_id, csr)
        self._send_certificate(proto, issued)
        proto.close(wire.CERT_ROTATED)
        self._renewal_asked.discard(old_serial)
        # The old certificate is revoked when the service comes back with the new one (see
        # _supersede_older), not now: if the answer is lost on the way (a proxy closing the socket
        # before flushing it, here), revoking now would lock the service out for good.
        log.info("service {service} renewed: {new} issued to replace {old}", service=proto.service_id,
                 old=format_serial(old_serial), new=format_serial(issued.serial))

    # -- pushes --------------------------------------------------------------------------------

    def broadcast(self, kind: str, targets: list[ServiceChannelProtocol] | None = None, **payload: Any) -> int:
        """Send to every authenticated service; framed once per distinct next seq. Returns how many."""
        groups: dict[int, list[ServiceChannelProtocol]] = defaultdict(list)
        for proto in (targets if targets is not None else list(self.connected.values())):
            if proto.phase == "authenticated" and not proto.closing:
                groups[proto.out_seq].append(proto)
        sent = 0
        factory = self.factories["agent"]
        for seq, protos in groups.items():
            prepared = factory.prepareMessage(wire.encode(kind, seq, **payload), isBinary=False)
            for proto in protos:
                if proto.send_prepared(prepared):
                    sent += 1
        return sent

    def on_rotation(self, result: dict[str, Any]) -> int:
        """PKI rotation hook: new bundle, then ask everyone to renew."""
        targets = [p for p in self.connected.values() if p.phase == "authenticated"]
        self.broadcast("ca_bundle_updated", targets, ca_bundle_pem=result["ca_bundle_pem"],
                       ca_bundle_hash=result["ca_bundle_hash"])
        return self.broadcast("request_cert_renewal", targets, reason="ca_rotation")

    def on_revocation(self, record: Any) -> None:
        proto = self.connected.get(record.service_id) if record.service_id else None
        if proto is not None and proto.serial == record.serial and not proto.closing:
            log.info("closing the socket of {service}: its certificate {serial} was revoked",
                     service=record.service_id, serial=format_serial(record.serial))
            proto.close(wire.CERT_REVOKED)

    def close_service(self, service_id: str, reason: str) -> None:
        proto = self.connected.get(service_id)
        if proto is not None:
            proto.close(reason)
        for p in list(self.sockets):
            if p.service_id == service_id and p is not proto:
                p.close(reason)

    def check_renewals(self) -> None:
        # forget requests for certificates no longer connected (renewed, revoked, gone)
        self._renewal_asked &= {p.serial for p in self.connected.values()}
        for proto in list(self.connected.values()):
            self._maybe_ask_renewal(proto)

    def _maybe_ask_renewal(self, proto: ServiceChannelProtocol) -> None:
        record = self.c.pki.authority.records.get(proto.serial)
        if record is None or record.serial in self._renewal_asked:
            return
        window = datetime.timedelta(hours=self.c.renewal_window_hours()).total_seconds()
        if record.not_after - self.clock.seconds() <= window:
            self._renewal_asked.add(record.serial)
            proto.send("request_cert_renewal", reason="expiring")
