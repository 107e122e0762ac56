"""The audit trail over HTTP: who made an API change (`said_by`), `GET /api/v1/audit` (newest first, filters,
a cursor) and `GET /api/v1/audit/export` (JSON Lines, oldest first, written as it is read: what
`uptrakit-audit verify` checks)."""
from __future__ import annotations

import datetime
from typing import Any, Callable

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger

from ...audit import SYSTEM, Said, request_id_of
from ...errors import BadRequest
from ...store import Store, audit as stored
from ..router import STREAMED, route

log = Logger()
MAX_PAGE = 500
MAX_TIME = 253402300799   # 9999-12-31T23:59:59Z
EXPORT_BATCH = 1000


def said_by(request: Any) -> Said:
    """The admin token (id, name, role) behind an API request, the client address the trusted-proxy rules
    resolved, and the request id it sent."""
    actor = getattr(request, "admin_actor", None)
    context = getattr(request, "context", None)
    return Said(actor or dict(SYSTEM), getattr(context, "client_ip", None),
                request_id_of(request.getHeader(b"x-request-id")))


def unknown_token(audit: Any) -> Any:
    """The router's hook for an admin request with a token nobody holds: AuditTrail.sign_in_failed."""
    def record(request: Any, label: str) -> None:
        said = said_by(request)
        audit.sign_in_failed(said.client, request.method.decode("latin-1"), label, said.request_id)
    return record


def _arg(request: Any, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


def _integer(request: Any, name: str, low: int, high: int) -> int | None:
    text = _arg(request, name)
    if text is None:
        return None
    if not _ascii_digits(text) or not low <= int(text) <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}", "invalid_filter")
    return int(text)


def _ascii_digits(text: str) -> bool:
    """0-9 only, at most 19 of them (str.isdigit also takes '²' and other scripts' digits)."""
    return 0 < len(text) <= 19 and text.isascii() and text.isdigit()


def _time(request: Any, name: str) -> int | None:
    """Unix seconds, or an ISO 8601 time (UTC when it names no zone)."""
    text = _arg(request, name)
    if text is None:
        return None
    if _ascii_digits(text):
        if int(text) > MAX_TIME:
            raise BadRequest(f"{name} must be unix seconds up to {MAX_TIME} or an ISO 8601 time", "invalid_filter")
        return int(text)
    try:
        if not text.isascii() or len(text) > 40:
            raise ValueError(text)
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        raise BadRequest(f"{name} must be unix seconds or an ISO 8601 time", "invalid_filter") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return int(when.timestamp())


class AuditRoutes:
    """Reading the trail: admin and read tokens."""

    def __init__(self, store: Store, checkpoint: Callable[[], Deferred] | None = None) -> None:
        self.store = store
        self.checkpoint = checkpoint   # signs the head first, so an export ends vouched for

    def routes(self) -> list[Any]:
        return [route("GET", r"/api/v1/audit", self.page, admin=True),
                route("GET", r"/api/v1/audit/export", self.export, admin=True)]

    @inlineCallbacks
    def page(self, request: Any) -> Any:
        limit = _integer(request, "limit", 1, MAX_PAGE) or 100
        before = _integer(request, "before", 1, 2**62)
        entries = yield self.store.run(stored.page, before, limit, _arg(request, "action"), _arg(request, "actor"),
                                       _arg(request, "object"), _time(request, "since"), _time(request, "until"))
        return {"entries": entries, "next_before": entries[-1]["seq"] if len(entries) == limit else None}

    @inlineCallbacks
    def export(self, request: Any) -> Any:
        """Oldest first, a batch at a time: read and encoded in the store thread, and the next batch is read only
        once the client took the last one (a slow reader holds one batch, not the trail)."""
        if self.checkpoint is not None:
            try:
                yield self.checkpoint()
            except Exception as e:   # (the export still goes out: the verifier says what is not vouched for)
                log.warn("audit: no checkpoint before the export ({error})", error=str(e))
        request.setHeader(b"Content-Type", b"application/jsonl")
        request.setHeader(b"Content-Disposition", b'attachment; filename="uptrakitd-audit.jsonl"')
        request.setHeader(b"Cache-Control", b"no-store")
        flow = _Flow()
        request.registerProducer(flow, True)
        last = 0
        try:
            while getattr(request, "channel", None) is not None:
                yield flow.writable()
                lines, last = yield self.store.run(_jsonl_after, last)
                if not lines:
                    break
                request.write(lines)
        finally:
            if getattr(request, "channel", None) is not None:
                request.unregisterProducer()
                if not request.finished:
                    request.finish()
        return STREAMED


def _jsonl_after(conn: Any, seq: int) -> tuple[bytes, int]:
    """Store operation: the next batch after `seq` as JSON Lines, and its last sequence number."""
    batch = stored.after(conn, seq, EXPORT_BATCH)
    lines = b"".join(stored.export_line(e).encode() + b"\n" for e in batch)
    return lines, batch[-1]["seq"] if batch else seq


class _Flow:
    """A push producer for a streamed response: the transport pauses it when its buffer is full."""

    def __init__(self) -> None:
        self._waiting: Deferred | None = None

    def writable(self) -> Deferred:
        """Fires when the transport takes more (at once unless paused)."""
        return self._waiting if self._waiting is not None else succeed(None)

    def pauseProducing(self) -> None:
        if self._waiting is None:
            self._waiting = Deferred()

    def resumeProducing(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()   # the client went: the loop sees no channel and ends
