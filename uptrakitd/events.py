"""One publish/subscribe bus for what happened in the daemon, with plain-data events.

Failure policy (the only one): a subscriber that raises or whose Deferred fails is logged and
counted (`uptrakit_event_subscriber_failures_total`); the publisher and the other subscribers go
on. Subscribers run in the order they subscribed, one after the other; a subscriber that returns
a Deferred is waited for before the next runs, so the composition root decides the order in which
effects happen (e.g. on a rotation: CRLs, then the TLS context, then the broadcast to services).

Events carry ids, serials and generations, never live objects, so that another controller process
could deliver them later (serialise with `dataclasses.asdict`).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.logger import Logger

log = Logger()
E = TypeVar("E")


@dataclass(frozen=True)
class CertificateRevoked:
    """A certificate we issued was revoked (committed)."""

    serial: int
    service_id: str | None
    ca_generation: int
    reason: str
    revoked_at: int


@dataclass(frozen=True)
class CaRotated:
    """A new CA generation became active; `bundle_hash` names the new trusted bundle."""

    generation: int
    previous: int
    bundle_hash: str


@dataclass(frozen=True)
class NetworkSettingsChanged:
    """Runtime network settings were stored and apply from the next request on."""

    fields: tuple[str, ...]


@dataclass(frozen=True)
class ServiceChanged:
    """An enrolled service's status changed (approved, rejected, deactivated)."""

    service_id: str
    status: str


class EventBus:
    """Synchronous-first publish/subscribe with one failure policy (see the module docstring)."""

    def __init__(self, on_failure: Callable[[str], Any] | None = None) -> None:
        self._subscribers: dict[type, list[Callable[[Any], Any]]] = defaultdict(list)
        self._on_failure = on_failure

    def subscribe(self, event_type: type[E], subscriber: Callable[[E], Any]) -> None:
        """Call `subscriber(event)` for every published event of `event_type`, in subscription order."""
        self._subscribers[event_type].append(subscriber)

    def publish(self, event: Any) -> Deferred:
        """Deliver `event`; fires with the results of the subscribers that succeeded, in order."""
        return self._deliver(event, list(self._subscribers.get(type(event), ())))

    @inlineCallbacks
    def _deliver(self, event: Any, subscribers: list[Callable[[Any], Any]]) -> Any:
        results = []
        for subscriber in subscribers:
            try:
                result = yield maybeDeferred(subscriber, event)
            except Exception:
                name = type(event).__name__
                log.failure("event subscriber {subscriber} failed on {event}", subscriber=_name(subscriber),
                            event=name)
                if self._on_failure is not None:
                    self._on_failure(name)
                continue
            results.append(result)
        return results


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
