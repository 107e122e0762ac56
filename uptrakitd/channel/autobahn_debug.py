"""Autobahn formats two debug lines per connection eagerly (`pformat` of ~40 settings, and of the
transport details) whether debug logging is on or not: 2.3 % of the reactor in a 5,000-agent rotation
(py-spy, docs/performance.md). `defer_debug_formatting()` makes that `pformat` lazy: the text is built
only if a debug line is really written.
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
    protocol.Timings.__str__ = lambda self: pformat(self._timings)  # type: ignore[method-assign]
    protocol.pformat = _Lazy  # type: ignore[assignment]
