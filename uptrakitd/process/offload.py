"""Run blocking or CPU-heavy work in the reactor's thread pool."""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool


def in_thread(reactor: Any, fn: Callable[..., Any], *args: Any, **kw: Any) -> Deferred:
    """fn(*args) in `reactor`'s thread pool; fires with its result."""
    return deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args, **kw)
