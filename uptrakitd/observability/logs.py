"""Log output: Twisted's text lines, or one JSON object per line that a log pipeline can ingest.

A JSON line is `{"time": ISO 8601 UTC, "level", "logger", "message" (rendered), ...the event's own
fields as plain JSON values}`; a failure adds `error` and `traceback`. Never Twisted's internal
serialisation (`log_format` templates, class UUIDs, `log_flattened`).
"""
from __future__ import annotations

import datetime
import json
from typing import IO, Any

from twisted.logger import (FileLogObserver, FilteringLogObserver, ILogObserver, LogLevel, LogLevelFilterPredicate,
                            formatEvent, formatEventAsClassicLogText, formatTime)
from zope.interface import implementer

from uptrakitd.printable import escape_controls, has_control

_LEGACY = {"message", "system", "isError", "printed", "why", "failure", "time", "format", "format_args"}
_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}


def _plain(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth < 3 and isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    if depth < 3 and isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    return str(value)[:500]


def json_record(event: dict[str, Any]) -> dict[str, Any]:
    """The JSON object for one Twisted log event."""
    when = datetime.datetime.fromtimestamp(event.get("log_time") or 0, datetime.timezone.utc)
    level = event.get("log_level")
    message = formatEvent(event)
    if not message and isinstance(event.get("message"), tuple):
        message = " ".join(str(m) for m in event["message"])
    record: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", "info"),
        "logger": str(event.get("log_namespace") or event.get("system") or "-"),
        "message": message,
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY or key in record:
            continue
        record[key] = _plain(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    return record


@implementer(ILogObserver)
class JsonLineObserver:
    """Writes json_record(event) + newline to a stream."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            line = json.dumps(json_record(event), ensure_ascii=False, separators=(",", ":"))
        except Exception as e:  # a log line must never take the daemon down
            line = json.dumps({"time": "", "level": "error", "logger": "uptrakitd.observability.logs",
                               "message": f"unserialisable log event: {e}"})
        self.stream.write(line + "\n")
        self.stream.flush()


def text_observer(stream: IO[str]) -> FileLogObserver:
    """Twisted's text lines (`textFileLogObserver`), with the time prefix made once per second: Twisted works
    out the local time zone for every line, half of a line's cost, and a line per connection, issuance and
    revocation made that ~4 % of the reactor during a 5,000-agent rotation (py-spy)."""
    made: list[Any] = [None, "-"]

    def stamp(when: float | None) -> str:
        second = None if when is None else int(when)
        if second != made[0]:
            made[0], made[1] = second, formatTime(second)   # the format has whole seconds: the same text
        return str(made[1])

    return FileLogObserver(stream, lambda event: formatEventAsClassicLogText(_escaped(event), formatTime=stamp))


def _escaped(event: dict[str, Any]) -> dict[str, Any]:
    """The event with control characters in its text fields escaped: a value from a peer (a host name, a
    header) must not start a line of its own or drive the terminal. The event itself is shared with other
    observers: a copy, and only when a field needs it."""
    dirty = [key for key, value in event.items()
             if isinstance(value, str) and not key.startswith("log_") and has_control(value)]
    if not dirty:
        return event
    copy = dict(event)
    for key in dirty:
        copy[key] = escape_controls(event[key])
    return copy


# Twisted's listening port logs every failed accept (EMFILE, ENOBUFS…) and every EMFILE recovery: a flood
# that exhausts descriptors made 4,129 such lines (issue: file descriptors)
_ACCEPT_NOISE = ("Could not accept new connection", "EMFILE encountered", "EMFILE recovery",
                 "Re-reserving EMFILE recovery")
ACCEPT_LOG_EVERY = 10.0


@implementer(ILogObserver)
class AcceptErrorThrottle:
    """Passes at most one accept-error line per ACCEPT_LOG_EVERY seconds to `inner`, saying how many like
    it were left out since the last one; every other event goes through untouched."""

    def __init__(self, inner: ILogObserver, every: float = ACCEPT_LOG_EVERY) -> None:
        self.inner = inner
        self.every = every
        self.last = float("-inf")
        self.dropped = 0

    def __call__(self, event: dict[str, Any]) -> None:
        text = event.get("log_format")
        if not isinstance(text, str) or not text.startswith(_ACCEPT_NOISE):
            self.inner(event)
            return
        now = event.get("log_time") or 0.0
        if now - self.last < self.every:
            self.dropped += 1
            return
        self.last = now
        if self.dropped:
            event = dict(event, log_format=text + " ({uptrakit_dropped} more accept errors in the last "
                                                  "{uptrakit_every:.0f} s were not logged)",
                         uptrakit_dropped=self.dropped, uptrakit_every=self.every)
            self.dropped = 0
        self.inner(event)


def log_observer(log_format: str, log_level: str, stream: IO[str]) -> ILogObserver:
    """The daemon's observer: text or JSON lines, dropping events below `log_level`, accept errors throttled."""
    inner = JsonLineObserver(stream) if log_format == "json" else text_observer(stream)
    return AcceptErrorThrottle(FilteringLogObserver(inner, [LogLevelFilterPredicate(
        defaultLogLevel=_LEVELS[log_level])]))
