"""The audit trail over HTTP: who made an API change (`said_by`), `GET /api/v1/audit` (newest first, filters,
a cursor) and `GET /api/v1/audit/export` (JSON Lines, oldest first, written as it is read: what
`uptrakit-audit verify` checks)."""
from __future__ import annotations

import datetime
import json
from typing import Any

from twisted.internet.defer import inlineCallbacks

from ...audit import SYSTEM, Said, request_id_of
from ...errors import BadRequest
from ...store import Store, audit as stored
from ..router import STREAMED, route

MAX_PAGE = 500
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
    if not text.isdigit() or not low <= int(text) <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}", "invalid_filter")
    return int(text)


def _time(request: Any, name: str) -> int | None:
    """Unix seconds, or an ISO 8601 time (UTC when it names no zone)."""
    text = _arg(request, name)
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{name} must be unix seconds or an ISO 8601 time", "invalid_filter") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return int(when.timestamp())


class AuditRoutes:
    """Reading the trail: admin and read tokens."""

    def __init__(self, store: Store) -> None:
        self.store = store

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
        request.setHeader(b"Content-Type", b"application/jsonl")
        request.setHeader(b"Content-Disposition", b'attachment; filename="uptrakitd-audit.jsonl"')
        request.setHeader(b"Cache-Control", b"no-store")
        last = 0
        while getattr(request, "channel", None) is not None:
            batch = yield self.store.run(stored.after, last, EXPORT_BATCH)
            if not batch:
                break
            request.write(b"".join(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"
                                   for entry in batch))
            last = batch[-1]["seq"]
        if getattr(request, "channel", None) is not None and not request.finished:
            request.finish()
        return STREAMED
