"""A connection the daemon has decided to close is gone within a bounded grace, whatever the peer does.

A clean close waits for the peer: TLS for its close_notify, TCP for the kernel to take what is still
queued. A peer that never answers and never reads (or keeps sending) would hold the socket, its slot
under the connection caps and whatever the layers above buffer, for as long as it likes. Every layer
that is asked to close (`loseConnection`) therefore also arms a timer that aborts the connection
after `grace` seconds (`--close-grace`, docs/security.md "How a connection ends").
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from ..config import ConnectionLimits

DEFAULT_CLOSE_GRACE = ConnectionLimits.close_grace


class CloseDeadline:
    """At most one pending abort for one connection: armed by a close, cancelled when the connection ends."""

    __slots__ = ("call", "ended")
    ENDED: CloseDeadline   # shared by every connection that is gone: arming it does nothing

    def __init__(self, ended: bool = False) -> None:
        self.call: IDelayedCall | None = None
        self.ended = ended

    def arm(self, call_later: Callable[..., IDelayedCall], grace: float, abort: Callable[[], Any]) -> None:
        """Abort after `grace` seconds (`call_later`: a clock's callLater) unless the connection is gone by
        then; a second arm changes nothing."""
        if self.call is None and not self.ended:
            self.call = call_later(grace, self._fire, abort)

    def _fire(self, abort: Callable[[], Any]) -> None:
        self.call = None
        abort()

    @staticmethod
    def end(deadline: CloseDeadline | None) -> CloseDeadline:
        """The connection is gone: cancel `deadline` if armed; returns the shared deadline that never arms
        (the layers above may still ask a gone connection to close while they learn it is gone)."""
        if deadline is not None and deadline.call is not None:
            if deadline.call.active():
                deadline.call.cancel()
            deadline.call = None
        return CloseDeadline.ENDED


CloseDeadline.ENDED = CloseDeadline(ended=True)


class ClosingTLSProtocol(TLSMemoryBIOProtocol):
    """TLS whose close (sent close_notify, waiting for the peer's) is cut after the grace."""

    factory: ClosingTLSFactory
    _deadline: CloseDeadline | None = None

    def loseConnection(self) -> None:
        super().loseConnection()
        if self._deadline is None:
            self._deadline = CloseDeadline()
        self._deadline.arm(self.factory.clock.callLater, self.factory.grace, self.abortConnection)

    def connectionLost(self, reason: Any = None) -> None:
        self._deadline = CloseDeadline.end(self._deadline)
        super().connectionLost(reason)


class ClosingTLSFactory(TLSMemoryBIOFactory):
    """TLSMemoryBIOFactory whose connections close within `grace` seconds of being asked to."""

    protocol = ClosingTLSProtocol

    def __init__(self, contextFactory: Any, isClient: bool, wrappedFactory: Any, clock: IReactorTime,
                 grace: float = DEFAULT_CLOSE_GRACE) -> None:
        super().__init__(contextFactory, isClient, wrappedFactory)
        self.clock = clock
        self.grace = grace
