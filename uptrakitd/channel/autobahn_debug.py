"""Per-connection work Autobahn does that uptrakitd never uses (found by py-spy in a 5,000-agent
rotation, docs/performance.md):

- it formats two debug lines per connection eagerly (`pformat` of ~40 settings, and of the transport
  details) whether debug logging is on or not: 2.3 % of the reactor. `defer_debug_formatting()` makes
  that `pformat` lazy: the text is built only if a debug line is really written;
- it parses the TLS peer's certificate into a dict twice per connection (at `connectionMade` and again
  when the WebSocket opens) for `transport_details.peer_cert`: 9 % of the reactor in a rotation (1,000
  agents). uptrakitd reads identity from the certificate OpenSSL verified (trust.identity), never from
  there: `skip_peer_certificate_details()` leaves it None.
"""
from __future__ import annotations

from pprint import pformat
from typing import Any


class _Lazy:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return pformat(self.value)

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def defer_debug_formatting() -> None:
    """Replace autobahn.websocket.protocol's module-level `pformat` by a lazy one: its two log calls get a
    value that formats itself when written; `Timings.__str__`, its only other user, keeps the real one."""
    import autobahn.websocket.protocol as protocol
    # through Timings' public mapping (iteration and [key]), as Autobahn 26.11's own __str__ prints it
    protocol.Timings.__str__ = lambda self: pformat({key: self[key] for key in self})  # type: ignore[method-assign]
    protocol.pformat = _Lazy  # type: ignore[assignment]


def _no_details(transport: Any) -> None:
    return None


def skip_peer_certificate_details() -> None:
    """Leave Autobahn's `transport_details.peer_cert` None instead of parsing the peer's certificate (twice)
    on every connection; both module-level names it is called through are replaced."""
    import autobahn.twisted.util as util
    import autobahn.twisted.websocket as websocket
    util.extract_peer_certificate = _no_details
    websocket.extract_peer_certificate = _no_details
