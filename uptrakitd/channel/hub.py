"""The channel hub: who is connected, what each message does, and the pushes (SPEC §5).

The protocol (protocol.py) owns one socket's frames, limits and state; the hub decides, by asking
the services directory and the CA, and tells the protocol what it has become. The hub learns about
revocations, rotations and service changes from the event bus.
"""
from __future__ import annotations

import datetime
import math
from typing import Any, Callable

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..config import DEFAULT_ROTATION_RENEWAL_RATE
from uptrakitd.registry.directory import ServiceDirectory
from uptrakitd.registry.enrollment import TokenRejected
from ..errors import UptrakitError
from ..events import CaRotated, CertificateRevoked, ServiceChanged
from uptrakitd.observability.metrics import Metrics
from ..pki.authority import CertificateAuthority
from ..pki.serials import format_serial
from uptrakitd.registry.runtime_settings import RuntimeSettings
from ..trust.identity import Identity
from . import wire
from ..listen.closing import DEFAULT_CLOSE_GRACE
from .protocol import ENROLL_TIMEOUT, MAX_UNKNOWN_IN_A_ROW, ServiceChannelFactory, ServiceChannelProtocol, TokenBucket

log = Logger()
DEFAULT_PING_INTERVAL = 30
RENEWALS_PER_SECOND = DEFAULT_ROTATION_RENEWAL_RATE   # --rotation-renewal-rate
MAX_RENEWAL_SPREAD = 600
EARLY_RENEWALS_BURST = 2            # renewals a service may ask for unprompted (not due, not asked) at once
EARLY_RENEWAL_EVERY = 6 * 3600.0    # and then one per this many seconds: one agent cannot grow the CRL without bound
REASK_GRACE = 1.0   # seconds past a deferred renewal's moment before the controller asks again


def renewal_spread(services: int, per_second: int = RENEWALS_PER_SECOND) -> int:
    """Seconds over which `services` renewals asked at once should arrive (0: at once)."""
    return min(MAX_RENEWAL_SPREAD, math.ceil(services / per_second)) if services > 1 else 0
RENEWAL_CHECK_SECONDS = 60


class ChannelResource(WebSocketResource):
    """Hands the request's RequestContext (SPEC §3) to the protocol the handshake creates."""

    def __init__(self, factory: Any) -> None:
        super().__init__(factory)
        self.factory = factory

    def render(self, request: Any) -> Any:
        self.factory.next_context = getattr(request, "context", None)
        return super().render(request)


class ChannelHub:
    """Shared by both endpoints: who is connected, and what each message does."""

    def __init__(self, directory: ServiceDirectory, ca: CertificateAuthority, runtime: RuntimeSettings,
                 metrics: Metrics, clock: IReactorTime, trust_domain: str,
                 enroll_timeout: float = ENROLL_TIMEOUT, renewals_per_second: int = RENEWALS_PER_SECOND,
                 close_grace: float = DEFAULT_CLOSE_GRACE,
                 barrier: Callable[[int], Deferred | None] | None = None) -> None:
        self.directory = directory
        self.ca = ca
        self.runtime = runtime
        self.metrics = metrics
        self.clock = clock
        self.trust_domain = trust_domain
        self.enroll_timeout = enroll_timeout
        self.renewals_per_second = renewals_per_second   # a rotation's renewals, paced for this controller
        self.connected: dict[str, ServiceChannelProtocol] = {}
        self.last_rotation: dict[str, Any] | None = None  # generation, at, notified: for rotation progress
        self.sockets: set[ServiceChannelProtocol] = set()
        self.factories = {kind: ServiceChannelFactory(kind, self, close_grace) for kind in ("agent", "mqtt")}
        self.resources = {f"/api/v1/ws/{kind}": ChannelResource(f) for kind, f in self.factories.items()}
        self._renewal_asked: set[int] = set()
        # renewals admitted at the pace asked of services (--rotation-renewal-rate), whatever they do: a client
        # that ignores `within_seconds` gets `renewal_deferred` with a moment to come back instead of a CSR
        # check and a signature
        self._admission = TokenBucket(clock, float(renewals_per_second), float(renewals_per_second))
        self._next_slot = 0.0   # the last moment given to a deferred renewal
        self._early: dict[str, TokenBucket] = {}   # per service: renewals asked for before they were due
        self._stopping = False
        self._turns: set[Any] = set()   # pending broadcast_in_turns calls, cancelled by stop()
        self.barrier = barrier   # several controllers: Cluster.barrier (renewals wait until all trust the CA)

    def is_connected(self, service_id: str) -> bool:
        """True while the service holds an authenticated socket."""
        return service_id in self.connected

    @inlineCallbacks
    def stop(self, reason: str = "controller shutting down") -> Any:
        """Tell every service we are restarting, close with 1001, wait (briefly) for the closes."""
        self._stopping = True
        for call in list(self._turns):
            if call.active():
                call.cancel()
        self._turns.clear()
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
        for proto in list(self.sockets):   # peers that did not answer the close in time: cut them off
            drop = getattr(proto, "dropConnection", None)
            if drop is not None and getattr(proto, "transport", None) is not None:
                drop(abort=True)

    def slow_consumer_dropped(self) -> None:
        """A socket was dropped because it stopped reading."""
        self.metrics.slow_consumers.inc()

    # -- connection events ---------------------------------------------------------------------

    def opened(self, proto: ServiceChannelProtocol) -> None:
        self.sockets.add(proto)
        ctx = proto.context
        if ctx.identity is not None:
            self._authenticate(proto, ctx.identity)
        elif ctx.rejected_code == "cluster_stale":   # another controller can decide; this one cannot now
            proto.refuse(wire.CLUSTER_STALE, wire.TRY_AGAIN_LATER)
        elif ctx.rejected_code in ("revoked", "deactivated", "invalid", "unknown"):
            log.info("channel: evidence from {client} rejected ({reason})", client=ctx.client_ip, reason=ctx.rejected)
            proto.refuse({"revoked": wire.CERT_REVOKED, "deactivated": wire.SERVICE_DEACTIVATED}.get(
                ctx.rejected_code or "", wire.CERT_NOT_RECOGNIZED))
        elif proto.bearer is not None:
            self._resume_enrollment(proto, proto.bearer)
        else:
            proto.become_anonymous(self.clock.callLater(self.enroll_timeout, self._enroll_timeout, proto))

    def closed(self, proto: ServiceChannelProtocol) -> None:
        self.sockets.discard(proto)
        if proto.renewal_reask is not None and proto.renewal_reask.active():
            proto.renewal_reask.cancel()
        if proto.service_id and self.connected.get(proto.service_id) is proto:
            del self.connected[proto.service_id]
            if not self._stopping:   # at stop, the controller leaves the database's list in one go
                self.directory.record_disconnection(proto.service_id)

    def _enroll_timeout(self, proto: ServiceChannelProtocol) -> None:
        if proto.phase == "anonymous":
            proto.close(wire.ENROLLMENT_TIMEOUT)

    def _authenticate(self, proto: ServiceChannelProtocol, identity: Identity) -> None:
        service = self.directory.get(identity.service_id)
        if service is None or service.kind != proto.kind:
            proto.refuse(wire.CERT_NOT_RECOGNIZED)
            return
        if service.status == "deactivated":
            proto.refuse(wire.SERVICE_DEACTIVATED)
            return
        if service.status != "approved":
            proto.refuse(wire.SERVICE_NOT_APPROVED)
            return
        old = self.connected.pop(service.id, None)
        if old is not None and old is not proto:
            old.close(wire.SUPERSEDED)
        proto.become_authenticated(service.id, identity.serial)
        self.connected[service.id] = proto
        self.directory.record_connection(service, proto.context.client_ip, proto.context.proxy_ip,
                                         proto.context.identity_source).addCallback(_noted, proto)
        self.ca.supersede_older(service.id, identity.serial)
        proto.send("service_settings", ping_interval=service.ping_interval_seconds or DEFAULT_PING_INTERVAL,
                   renewal_window_hours=self.runtime.renewal_window_hours(),
                   ca_bundle_hash=self.ca.bundle_hash(), trust_domain=self.trust_domain)
        log.info("service {service} ({kind}) connected from {client} via {source}", service=service.id,
                 kind=service.kind, client=proto.context.client_ip, source=proto.context.identity_source)
        if identity.ca_generation != self.ca.state.active().generation:
            # It missed (or lost the answer to) the renewal a rotation asked for: ask again.
            proto.send("request_cert_renewal", reason="ca_rotation")
        else:
            self._maybe_ask_renewal(proto)

    def _resume_enrollment(self, proto: ServiceChannelProtocol, bearer: str) -> None:
        service = self.directory.find_by_enrollment_secret(bearer)
        if service is None or service.kind != proto.kind:
            proto.refuse(wire.SECRET_NOT_RECOGNIZED)
            return
        proto.become_enrolled(service.id)
        self.directory.record_connection(service, proto.context.client_ip, proto.context.proxy_ip,
                                         proto.context.identity_source)

    # -- messages ------------------------------------------------------------------------------

    def received(self, proto: ServiceChannelProtocol, message: dict[str, Any]) -> None:
        handler = {
            ("anonymous", "enroll"): self._on_enroll,
            ("enrolled", "request_certificate"): self._on_request_certificate,
            ("authenticated", "ping"): self._on_ping,
            ("authenticated", "renew_certificate"): self._on_renew,
        }.get((proto.phase, message["type"]))
        if handler is None:
            if proto.count_unknown() >= MAX_UNKNOWN_IN_A_ROW:
                raise wire.ProtocolViolation("unknown_types", f"{MAX_UNKNOWN_IN_A_ROW} unknown messages in a row")
            return
        proto.reset_unknown()
        d = handler(proto, message)
        if isinstance(d, Deferred):
            d.addErrback(self._handler_failed, proto)

    def _handler_failed(self, failure: Any, proto: ServiceChannelProtocol) -> None:
        if failure.check(wire.ProtocolViolation):
            proto.violation(failure.value)
        elif failure.check(UptrakitError):
            proto.send("error", code=failure.value.code, message=failure.value.message)
        else:
            log.failure("channel handler failed for {service}", failure, service=proto.service_id)
            proto.send("error", code="internal_error", message="the controller could not handle this message")

    @inlineCallbacks
    def _on_enroll(self, proto: ServiceChannelProtocol, message: dict[str, Any]) -> Any:
        hostname = wire.field(message, "hostname", str, max_len=253, name_like=True)
        friendly = wire.field(message, "friendly_name", str, required=False, max_len=200, name_like=True)
        token = wire.field(message, "enrollment_token", str, max_len=200)
        caps = wire.field(message, "capabilities", list, required=False) or []
        if len(caps) > 64 or not all(isinstance(c, str) and len(c) <= 64 for c in caps):
            raise wire.ProtocolViolation("invalid_message", "enroll: capabilities must be up to 64 short strings")
        if not hostname.strip():
            raise wire.ProtocolViolation("invalid_message", "enroll: hostname must not be empty")
        proto.become_enrolling()
        try:
            service, secret = yield self.directory.enroll(proto.kind, hostname, token, friendly, caps)
        except TokenRejected as e:
            proto.become_anonymous()
            log.info("enrollment from {client} refused: {reason}", client=proto.context.client_ip, reason=str(e))
            proto.send("error", code="enrollment_refused", message=str(e))
            return
        proto.become_enrolled(service.id)
        self.directory.record_connection(service, proto.context.client_ip, proto.context.proxy_ip,
                                         proto.context.identity_source)
        log.info("service {service} ({kind}, {host}) enrolled from {client}, status {status}", service=service.id,
                 kind=service.kind, host=hostname, client=proto.context.client_ip, status=service.status)
        proto.send("enrolled", service_id=service.id, enrollment_secret=secret, status=service.status)

    @inlineCallbacks
    def _on_request_certificate(self, proto: ServiceChannelProtocol, message: dict[str, Any]) -> Any:
        csr = wire.field(message, "csr_pem", str)
        service = self.directory.require(_service_id(proto))
        if service.status != "approved":
            proto.send("error", code="service_not_approved", message=f"service is {service.status}")
            proto.close(wire.SERVICE_NOT_APPROVED)
            return
        # one certificate per enrollment: later requests on this socket are unknown messages, and the
        # enrollment secret stops working once this one is issued
        proto.become_certifying()
        try:
            issued = yield self.directory.issue_certificate(service.id, csr, first=True)
        except Exception:
            proto.become_enrolled(service.id)  # a refused CSR may be corrected and sent again
            raise
        proto.become_certified()
        self._send_certificate(proto, issued)

    def _send_certificate(self, proto: ServiceChannelProtocol, issued: Any) -> None:
        proto.send("certificate", cert_pem=issued.pem.decode("ascii"), ca_bundle_pem=self.ca.bundle_pem().decode(),
                   not_after=int(issued.cert.not_valid_after_utc.timestamp() * 1000))

    def _on_ping(self, proto: ServiceChannelProtocol, message: dict[str, Any]) -> None:
        service_ts = wire.field(message, "service_ts", (int, float))
        proto.send("pong", service_ts=service_ts, controller_ts=int(self.clock.seconds() * 1000))
        service = self.directory.get(_service_id(proto))
        if service is not None:
            self.directory.touch(service)

    def _admit_renewal(self, proto: ServiceChannelProtocol) -> float | None:
        """None: renew now; else the seconds after which to ask again: each deferred service gets a moment
        of its own, one every 1/rate seconds after those already given out, so they come back at the pace
        the controller admits (a shared or random moment brought most back too early, deferred again).
        A service asking again before its moment keeps that moment: one socket repeating its request
        cannot push every other service's moment further out."""
        now = self.clock.seconds()
        slot = getattr(proto, "renewal_slot", None)
        if slot is not None and slot > now:
            return round(slot - now, 1)
        if self._admission.take():
            proto.renewal_slot = None
            return None
        self._next_slot = max(self._next_slot, now + 1.0) + 1.0 / self.renewals_per_second
        proto.renewal_slot = slot = self._next_slot
        # the controller drives the pace: a client that does not know `renewal_deferred` (or ignores its
        # retry_after_seconds) is asked again at its moment, so it still renews, at the controller's rate
        if proto.renewal_reask is not None and proto.renewal_reask.active():
            proto.renewal_reask.cancel()
        proto.renewal_reask = self.clock.callLater(slot - now + REASK_GRACE, self._ask_again, proto, slot)
        return round(slot - now, 1)

    def _ask_again(self, proto: ServiceChannelProtocol, slot: float) -> None:
        """A deferred renewal's moment passed and the service did not come back: request_cert_renewal again
        (with the reason a service acts on: its certificate is from an older CA generation, or expiring)."""
        proto.renewal_reask = None
        if self._stopping or proto.phase != "authenticated" or proto.closing or proto.renewal_slot != slot:
            return
        record = self.ca.state.records.get(proto.serial or 0)
        reason = "ca_rotation" if record is not None and record.ca_generation != self.ca.state.active().generation \
            else "expiring"
        self.metrics.renewals_asked_again.inc()
        if proto.serial is not None:
            self._renewal_asked.add(proto.serial)   # asked: its renewal is due now
        proto.send("request_cert_renewal", reason=reason)

    def _renewal_due(self, proto: ServiceChannelProtocol) -> bool:
        """The certificate is in its renewal window, from an older CA generation, or the controller asked."""
        record = self.ca.state.records.get(proto.serial or 0)
        if record is None:
            return True   # (the directory refuses what it does not know)
        return (record.not_after - self.clock.seconds() <= self.runtime.renewal_window_hours() * 3600
                or record.ca_generation != self.ca.state.active().generation or record.serial in self._renewal_asked)

    def _refuse_early(self, proto: ServiceChannelProtocol) -> bool:
        """True (and the service told why) for an unprompted renewal past the service's small allowance: each
        renewal puts the certificate it replaces on the CRL for that certificate's lifetime plus a day."""
        if self._renewal_due(proto):
            return False
        service_id = _service_id(proto)
        bucket = self._early.get(service_id)
        if bucket is None:
            bucket = self._early[service_id] = TokenBucket(self.clock, 1 / EARLY_RENEWAL_EVERY,
                                                           EARLY_RENEWALS_BURST)
        if bucket.take():
            return False
        record = self.ca.state.records[proto.serial or 0]
        due = record.not_after - self.runtime.renewal_window_hours() * 3600
        self.metrics.renewals_refused_early.inc()
        proto.send("error", code="renewal_not_due", due_at=int(due), message=(
            f"certificate {format_serial(record.serial)} is not due for renewal until "
            f"{datetime.datetime.fromtimestamp(due, datetime.timezone.utc).isoformat(timespec='seconds')} (its "
            f"renewal window), and this service renewed unprompted {EARLY_RENEWALS_BURST} times already: renew "
            "inside the window or when asked (request_cert_renewal)"))
        return True

    @inlineCallbacks
    def _on_renew(self, proto: ServiceChannelProtocol, message: dict[str, Any]) -> Any:
        slot = proto.renewal_slot   # (a service asking again before its moment is told that moment again)
        if (slot is None or slot <= self.clock.seconds()) and self._refuse_early(proto):
            return
        wait = self._admit_renewal(proto)
        if wait is not None:
            self.metrics.renewals_deferred.inc()
            proto.send("error", code="renewal_deferred", retry_after_seconds=wait,
                       message=f"too many renewals at once: renew again in {wait:g} s")
            return
        csr = wire.field(message, "csr_pem", str)
        old_serial = proto.serial or 0
        issued = yield self.directory.issue_certificate(_service_id(proto), csr)
        self._send_certificate(proto, issued)
        proto.close(wire.CERT_ROTATED)
        self._renewal_asked.discard(old_serial)
        # The old certificate is revoked when the service comes back with the new one (see
        # CertificateAuthority.supersede_older), not now: if the answer is lost on the way (a proxy
        # closing the socket before flushing it, here), revoking now would lock the service out for good.
        log.info("service {service} renewed: {new} issued to replace {old}", service=proto.service_id,
                 old=format_serial(old_serial), new=format_serial(issued.serial))

    # -- pushes --------------------------------------------------------------------------------

    def broadcast(self, kind: str, targets: list[ServiceChannelProtocol] | None = None, **payload: Any) -> int:
        """Send to every authenticated service; framed once per distinct next seq. Returns how many."""
        return self.broadcast_in_turns([(kind, payload)], targets)

    def broadcast_in_turns(self, messages: list[tuple[str, dict[str, Any]]],
                           targets: list[ServiceChannelProtocol] | None = None, per_turn: int = 250,
                           then: Callable[[], Any] | None = None) -> int:
        """Send `messages`, in order, to every authenticated service in `targets`, `per_turn` sockets per
        reactor turn (5,000 sockets at once held the reactor for 0.7 s: every other request waited), then call
        `then()` once the last turn is done.

        Each frame is encoded once per distinct next seq, when it is sent, so a socket that got something
        else in between still gets the right seq. Returns how many sockets were authenticated at the start.
        """
        todo = [p for p in (targets if targets is not None else list(self.connected.values()))
                if p.phase == "authenticated" and not p.closing]
        factory = self.factories["agent"]
        prepared: dict[tuple[int, int], Any] = {}

        def send(protos: list[ServiceChannelProtocol]) -> None:
            for proto in protos:
                for index, (kind, payload) in enumerate(messages):
                    if proto.phase != "authenticated" or proto.closing:
                        break
                    frame = prepared.get((index, proto.out_seq))
                    if frame is None:
                        frame = factory.prepareMessage(wire.encode(kind, proto.out_seq, **payload), isBinary=False)
                        prepared[(index, proto.out_seq)] = frame
                    if not proto.send_prepared(frame):
                        break

        def turn(start: int) -> None:
            self._turns = {call for call in self._turns if call.active()}
            send(todo[start:start + per_turn])
            if start + per_turn < len(todo) and not self._stopping:
                self._turns.add(self.clock.callLater(0, turn, start + per_turn))
            elif then is not None and not self._stopping:
                then()
        turn(0)
        return len(todo)

    def on_ca_rotated(self, event: CaRotated) -> int:
        """CaRotated: the new bundle, then ask everyone to renew; returns how many were asked."""
        targets = [p for p in self.connected.values() if p.phase == "authenticated"]
        bundle = self.ca.bundle_pem()
        # every service asked at once would renew at once: each renewal is a CSR check, a signature, an
        # fsync'd insert and a full mTLS reconnect. Spread them over a window the signing rate can take.
        # The sockets are served a few hundred per reactor turn.
        updated = ("ca_bundle_updated", {"ca_bundle_pem": bundle.decode("ascii"), "ca_bundle_hash": event.bundle_hash})
        renew = ("request_cert_renewal", {"reason": "ca_rotation", "within_seconds": renewal_spread(len(targets), self.renewals_per_second)})
        waiting = self.barrier(event.generation) if self.barrier is not None else None
        bundled: Deferred = Deferred()
        # the bundle reaches every socket first: renewal requests (and the reconnects they cause) would
        # otherwise compete with it for the reactor, and the last sockets would wait seconds for their bundle.
        # Several controllers: a renewed service may reconnect to any of them, so the requests also wait until
        # all of them trust the new CA (cluster.TrustedGeneration)
        asked = self.broadcast_in_turns([updated], targets, then=lambda: bundled.callback(None))
        ready = bundled if waiting is None else DeferredList([bundled, waiting], fireOnOneErrback=True,
                                                             consumeErrors=True)
        ready.addCallback(lambda _: self.broadcast_in_turns(
            [renew], [p for p in targets if p.phase == "authenticated" and not p.closing]))
        ready.addErrback(lambda f: log.failure("rotation: renewal requests not sent", f))
        self.last_rotation = {"generation": event.generation, "at": self.clock.seconds(), "notified": asked}
        return asked

    def on_revoked(self, event: CertificateRevoked) -> None:
        """CertificateRevoked: close the socket that authenticated with it."""
        proto = self.connected.get(event.service_id) if event.service_id else None
        if proto is not None and proto.serial == event.serial and not proto.closing:
            log.info("closing the socket of {service}: its certificate {serial} was revoked",
                     service=event.service_id, serial=format_serial(event.serial))
            proto.close(wire.CERT_REVOKED)

    def connected_elsewhere(self, service_id: str, seq: int, controller_id: str) -> None:
        """Another controller authenticated this service (change `seq`): the socket here is superseded if
        it is the older one. A socket whose own note is not committed yet, or committed later, is newer."""
        proto = self.connected.get(service_id)
        if proto is None or proto.closing or proto.connected_seq is None or proto.connected_seq > seq:
            return
        log.info("service {service} connected to controller {controller_id}: closing its older socket here",
                 service=service_id, controller_id=controller_id)
        proto.close(wire.SUPERSEDED)

    def on_service_changed(self, event: ServiceChanged) -> None:
        """ServiceChanged: a deactivated or rejected service loses its sockets; an approved one that waits on
        its enrollment socket is told at once (instead of finding out at its next retry, up to a minute later)."""
        if event.status == "approved":
            for proto in list(self.sockets):
                if proto.service_id == event.service_id and proto.phase == "enrolled":
                    proto.send("service_approved", service_id=event.service_id)
            return
        reason = {"deactivated": wire.SERVICE_DEACTIVATED, "rejected": wire.SERVICE_NOT_APPROVED}.get(event.status)
        if reason is None:
            return
        for proto in list(self.sockets):
            if proto.service_id == event.service_id:
                proto.close(reason)

    def check_renewals(self) -> None:
        """Periodic: ask connected services inside their renewal window to renew (once per certificate)."""
        # forget requests for certificates no longer connected (renewed, revoked, gone)
        self._renewal_asked &= {p.serial for p in self.connected.values()}
        for proto in list(self.connected.values()):
            self._maybe_ask_renewal(proto)

    def _maybe_ask_renewal(self, proto: ServiceChannelProtocol) -> None:
        record = self.ca.state.records.get(proto.serial or 0)
        if record is None or record.serial in self._renewal_asked:
            return
        if record.not_after - self.clock.seconds() <= self.runtime.renewal_window_hours() * 3600:
            self._renewal_asked.add(record.serial)
            proto.send("request_cert_renewal", reason="expiring")


def _service_id(proto: ServiceChannelProtocol) -> str:
    """The service a socket in an enrolled or authenticated phase belongs to."""
    if proto.service_id is None:
        raise wire.ProtocolViolation("invalid_state", "no service is attached to this socket")
    return proto.service_id


def _noted(seq: int | None, proto: ServiceChannelProtocol) -> None:
    proto.connected_seq = seq
