"""Per-call timers for Autobahn factories.

Autobahn batches its protocol timers (open/close handshake, auto-ping) into 200 ms buckets whose
reactor call is never cancelled, even when every timer in it is: a closed connection leaves a
pending call behind for up to the longest timeout (30 s). Twisted's own timer heap handles tens of
thousands of timers, and a cancelled one is gone at once, so a stopped daemon leaves nothing behind.
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class PlainTimer:
    """The `call_later` Autobahn's factories use, as plain reactor calls."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock

    def call_later(self, delay: float, func: Callable[..., Any], *args: Any, **kwargs: Any) -> IDelayedCall:
        """Like reactor.callLater."""
        return self.clock.callLater(delay, func, *args, **kwargs)


def use_plain_timers(factory: Any, clock: IReactorTime) -> None:
    """Give an Autobahn WebSocket factory plain (cancellable) timers instead of its batched ones."""
    # Autobahn 26.11 reads only .call_later() of it (tests/test_library_internals.py checks it is still there)
    factory._batched_timer = PlainTimer(clock)


_AUTOBAHN_TIMERS = ("openHandshakeTimeoutCall", "closeHandshakeTimeoutCall", "serverConnectionDropTimeoutCall",
                    "autoPingPendingCall", "autoPingTimeoutCall")


def cancel_autobahn_timers(protocol: Any) -> None:
    """After the connection is gone: Autobahn cancels its close-handshake timer only when the peer's close
    frame arrives, so a peer that vanished leaves it pending (a stopped daemon then still has calls)."""
    for name in _AUTOBAHN_TIMERS:
        call = getattr(protocol, name, None)
        if call is not None and getattr(call, "active", lambda: False)():
            call.cancel()
        if call is not None:
            setattr(protocol, name, None)
