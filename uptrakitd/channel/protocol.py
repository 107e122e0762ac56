"""One service's WebSocket: envelope, limits and the state machine's transport side (SPEC §5)."""
from __future__ import annotations

from typing import Any, Protocol, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..listen.closing import DEFAULT_CLOSE_GRACE
from ..trust.identity import RequestContext
from . import wire
from .autobahn_debug import defer_debug_formatting, skip_peer_certificate_details
from .timers import cancel_autobahn_timers, use_plain_timers

log = Logger()
OUTBOUND_CAP = 1024 * 1024
RATE_PER_SECOND = 50.0
RATE_BURST = 100.0
# frames (data fragments and pings) and bytes are limited too: a flood of 1-byte fragments or pings
# is one "message" or none at all, yet costs the reactor as much as thousands
FRAMES_PER_SECOND, FRAME_BURST = 200.0, 400.0
BYTES_PER_SECOND, BYTE_BURST = 1024.0 * 1024, 2.0 * 1024 * 1024
ENROLL_TIMEOUT = 30.0
# after the controller sent its close frame, the peer's reply may follow what it had in flight: this many
# frames and bytes are read for it, then the connection is cut (a peer streaming on would cost the reactor
# a copy of Autobahn's buffer per frame, and memory, until the grace ran out)
FRAMES_AFTER_CLOSE, BYTES_AFTER_CLOSE = 32, 64 * 1024
MAX_UNKNOWN_IN_A_ROW = 10


def buffered_bytes(transport: Any) -> int:
    """Bytes written but not yet accepted by the kernel, summed down a TLS/TCP transport chain.

    The TCP transport (FileDescriptor) holds them in `dataBuffer` past `offset`, and in the chunks written
    since its last write to the socket, counted by its private `_tempDataLen` (read as of Twisted 26.10;
    tests/test_library_internals.py fails when it changes). TLS adds nothing once its handshake is done
    (every WebSocket is past it): TLSMemoryBIOProtocol hands each write to TCP at once."""
    total, seen = 0, 0
    while transport is not None and seen < 6:
        total += getattr(transport, "_tempDataLen", 0) or 0
        data = getattr(transport, "dataBuffer", None)
        if isinstance(data, (bytes, bytearray, memoryview)):
            total += len(data) - (getattr(transport, "offset", 0) or 0)
        transport = getattr(transport, "transport", None)
        seen += 1
    return total


class TokenBucket:
    """≤ rate messages per second with a burst allowance."""

    def __init__(self, clock: IReactorTime, rate: float = RATE_PER_SECOND, burst: float = RATE_BURST) -> None:
        self.clock, self.rate, self.burst = clock, rate, burst
        self.tokens, self.stamp = burst, clock.seconds()

    def take(self, amount: float = 1) -> bool:
        """Spend `amount` tokens; False (and nothing spent) when there are not enough."""
        now = self.clock.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True


class Decider(Protocol):
    """What a socket needs from the hub (uptrakitd.channel.hub.ChannelHub implements it)."""

    clock: IReactorTime

    def opened(self, proto: ServiceChannelProtocol) -> None: ...

    def received(self, proto: ServiceChannelProtocol, message: dict[str, Any]) -> None: ...

    def closed(self, proto: ServiceChannelProtocol) -> None: ...

    def slow_consumer_dropped(self) -> None: ...


class ChannelState:
    """One socket's place in the channel's state machine, changed only through these methods.

    phase: connecting -> anonymous -> enrolling -> enrolled (bearer) -> certifying -> certified; or
    authenticated (identity); rejected when the hub refuses it. The hub decides; the socket records.
    """

    phase: str = "connecting"
    service_id: str | None = None
    serial: int | None = None
    connected_seq: int | None = None   # the change-log seq of this authentication (several controllers)
    unknown_in_row: int = 0
    enroll_timer: Any = None
    renewal_slot: float | None = None   # the moment a deferred renewal was given (ChannelHub._admit_renewal)
    renewal_reask: Any = None   # the call that asks again if the service does not come back by then

    def close(self, reason: str, code: int = wire.POLICY_VIOLATION) -> None:
        raise NotImplementedError

    def become_anonymous(self, enroll_timer: Any = None) -> None:
        """No identity yet: the first message must be `enroll` (before `enroll_timer` fires)."""
        self.phase = "anonymous"
        if enroll_timer is not None:
            self.enroll_timer = enroll_timer

    def become_enrolling(self) -> None:
        """An `enroll` is being handled."""
        self.phase = "enrolling"

    def become_enrolled(self, service_id: str) -> None:
        """Enrolled (bearer or fresh `enrolled`): may request its first certificate."""
        self._cancel_enroll_timer()
        self.phase, self.service_id = "enrolled", service_id

    def become_certifying(self) -> None:
        """Its first certificate is being issued."""
        self.phase = "certifying"

    def become_certified(self) -> None:
        """It has its first certificate: it must reconnect with it (mTLS) to do anything else."""
        self.phase = "certified"

    def become_authenticated(self, service_id: str, serial: int) -> None:
        """Authenticated by a certificate (SPEC §3)."""
        self.phase, self.service_id, self.serial = "authenticated", service_id, serial

    def refuse(self, reason: str, code: int = wire.POLICY_VIOLATION) -> None:
        """Not allowed in: close with a reason from SPEC §5 (1008 unless `code` says otherwise)."""
        self.phase = "rejected"
        self.close(reason, code)

    def count_unknown(self) -> int:
        """One more unknown message in a row; returns how many."""
        self.unknown_in_row += 1
        return self.unknown_in_row

    def reset_unknown(self) -> None:
        """A known message ends the run of unknown ones."""
        self.unknown_in_row = 0

    def _cancel_enroll_timer(self) -> None:
        if self.enroll_timer is not None and self.enroll_timer.active():
            self.enroll_timer.cancel()


# (mypy checks every base pair once there are two; Autobahn's own bases disagree on `peer` and
# `_transport_details`, which is not ours to fix)
class ServiceChannelProtocol(WebSocketServerProtocol, ChannelState):  # type: ignore[misc]
    """Frames in and out for one service (its state: ChannelState); decisions are the hub's."""

    kind: str = "agent"
    hub: Decider
    context: RequestContext
    handshaken = False   # onConnect ran: a refused opening handshake (no Sec-WebSocket-Key…) never gets there
    on_gone: Any = None

    def onConnect(self, request: Any) -> None:
        self.handshaken = True
        self.phase = "connecting"
        self.service_id: str | None = None
        self.serial: int | None = None
        self.in_seq = 1
        self.out_seq = 1
        self.unknown_in_row = 0
        self.closing = False
        self.bucket = TokenBucket(self.hub.clock)
        self.frames = TokenBucket(self.hub.clock, FRAMES_PER_SECOND, FRAME_BURST)
        self.bytes_in = TokenBucket(self.hub.clock, BYTES_PER_SECOND, BYTE_BURST)
        self.enroll_timer: Any = None
        self.on_gone: Any = None
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        self.bearer = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        return None

    def onOpen(self) -> None:
        self.hub.opened(self)

    def onMessageFrameBegin(self, length: int) -> None:
        self._frame_allowed(length)  # over the limit: closing, and onMessage ignores what follows
        super().onMessageFrameBegin(length)

    def onPing(self, payload: bytes) -> None:
        if self._frame_allowed(len(payload)):
            super().onPing(payload)

    def _frame_allowed(self, length: int) -> bool:
        if self.closing or (self.frames.take() and self.bytes_in.take(length)):
            return not self.closing
        log.info("channel: {client} ({service}) sends frames or bytes too fast: closing",
                 client=self.context.client_ip, service=self.service_id)
        self.close(wire.RATE_LIMITED)
        return False

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.closing:
            return
        if not self.bucket.take():
            self.close(wire.RATE_LIMITED)
            return
        if isBinary:
            self.violation(wire.ProtocolViolation("binary_frame", "frames must be JSON text"))
            return
        try:
            message = wire.decode(payload, self.in_seq)
        except wire.ProtocolViolation as e:
            self.violation(e)
            return
        self.in_seq += 1
        try:
            self.hub.received(self, message)
        except wire.ProtocolViolation as e:
            self.violation(e)
        except Exception:
            log.failure("channel message handling failed for {service}", service=self.service_id)
            self.send("error", code="internal_error", message="the controller could not handle this message")

    # How a socket ends (docs/security.md "How a connection ends"): once a close frame is sent or received,
    # nothing the peer sends is kept beyond the few frames that may carry its reply to ours, and the
    # connection is cut after the close grace whatever the peer does (the close-handshake timeout is the
    # grace; when Autobahn drops the connection instead, the TLS layer arms the same deadline). What
    # comes meanwhile is read and dropped rather than left unread: an abort with unread bytes is a reset,
    # which can cost the peer our close frame, and with it the reason.
    _deaf = False

    def dataReceived(self, data: bytes) -> None:
        if self._deaf or self.state == self.STATE_CLOSED:
            return   # Autobahn would append it to its buffer, forever
        if self.state == self.STATE_CLOSING:
            self._after_close_bytes = getattr(self, "_after_close_bytes", 0) + len(data)
            if self._after_close_bytes > BYTES_AFTER_CLOSE:
                self._stop_reading_after_close()
                return
        super().dataReceived(data)

    def processData(self) -> bool:
        if self._deaf:
            return False
        if self.state == self.STATE_CLOSING:
            self._after_close_frames = getattr(self, "_after_close_frames", 0) + 1
            if self._after_close_frames > FRAMES_AFTER_CLOSE:
                self._stop_reading_after_close()
                return False
        return bool(super().processData())

    def _stop_reading_after_close(self) -> None:
        self._deaf = True
        self.data = b""
        log.info("channel: {client} ({service}) kept sending after the close: dropped unread until the "
                 "connection is cut", client=self.context.client_ip, service=self.service_id)

    def connectionLost(self, reason: Any = None) -> None:
        try:
            super().connectionLost(reason)
        finally:
            cancel_autobahn_timers(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.handshaken:   # closed before onConnect: the hub never heard of it
            return
        self._cancel_enroll_timer()
        self.hub.closed(self)
        if self.on_gone is not None and not self.on_gone.called:
            self.on_gone.callback(None)

    def violation(self, error: wire.ProtocolViolation) -> None:
        """Tell the service what was wrong, then close."""
        log.info("channel protocol error from {client} ({service}): {reason}",
                 client=self.context.client_ip, service=self.service_id, reason=str(error))
        self.send("error", code=error.code, message=str(error))
        self.close(wire.PROTOCOL_ERROR)

    def send(self, kind: str, **payload: Any) -> bool:
        """Send one message with the next seq; a socket over its outbound cap is dropped instead."""
        if self.closing or self.phase == "connecting" or self.state != self.STATE_OPEN:
            return False
        if self.over_cap():
            return False
        frame = wire.encode(kind, self.out_seq, **payload)
        self.out_seq += 1
        self.sendMessage(frame, isBinary=False)
        return True

    def send_prepared(self, prepared: Any) -> bool:
        """Send a frame framed once for many sockets (its seq was chosen for this socket's next one)."""
        if self.closing or self.state != self.STATE_OPEN or self.over_cap():
            return False
        self.out_seq += 1
        self.sendPreparedMessage(prepared)
        return True

    def over_cap(self) -> bool:
        """Disconnect a service that stopped reading rather than let its buffer grow (SPEC §5)."""
        if buffered_bytes(self.transport) <= OUTBOUND_CAP:
            return False
        log.warn("service {service} at {client} stopped reading ({size} bytes queued): disconnecting",
                 service=self.service_id, client=self.context.client_ip,
                 size=buffered_bytes(self.transport))
        self.closing = True
        self.hub.slow_consumer_dropped()
        # A close frame would queue behind the data it cannot drain: drop the connection.
        self.dropConnection(abort=True)
        return True

    def close(self, reason: str, code: int = wire.POLICY_VIOLATION) -> None:
        """Close with a reason from SPEC §5."""
        if self.closing or self.state != self.STATE_OPEN:
            return
        self.closing = True
        # sendClose() only admits 1000 and 3000-4999; the contract's 1008/1001 go through sendCloseFrame,
        # which builds the same frame without that application-level check.
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)


class ServiceChannelFactory(WebSocketServerFactory):
    """One endpoint (`agent` or `mqtt`); protocols learn the request's RequestContext from the resource."""

    protocol = ServiceChannelProtocol

    def __init__(self, kind: str, hub: Decider, close_grace: float = DEFAULT_CLOSE_GRACE) -> None:
        super().__init__(server="uptrakitd")   # Autobahn's default names itself and its version
        self.kind = kind
        self.hub = hub
        use_plain_timers(self, hub.clock)
        defer_debug_formatting()
        skip_peer_certificate_details()
        self.next_context: RequestContext | None = None
        self.setProtocolOptions(
            maxFramePayloadSize=wire.MAX_FRAME, maxMessagePayloadSize=wire.MAX_FRAME,
            autoPingInterval=30, autoPingTimeout=60, openHandshakeTimeout=30, closeHandshakeTimeout=close_grace,
            perMessageCompressionAccept=lambda offers: None, failByDrop=False)

    def buildProtocol(self, addr: Any) -> ServiceChannelProtocol:
        proto = cast(ServiceChannelProtocol, super().buildProtocol(addr))
        proto.kind = self.kind
        proto.hub = self.hub
        # the resource hands over the request's context; without one (never on our tree) the peer is all we know
        peer = getattr(addr, "host", None) or "0.0.0.0"
        proto.context, self.next_context = self.next_context or RequestContext(peer, peer), None
        return proto
