"""A small JSON router: one place maps errors to statuses, checks admin tokens, answers 404/405."""
from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ..errors import Forbidden, NotFound, PayloadTooLarge, Unauthorized, UptrakitError
from ..jsontext import loads_strict
from .site import MAX_JSON_BODY

log = Logger()


@dataclass
class Response:
    """A non-JSON answer (PEM, DER, text) with its status and headers."""

    body: bytes
    content_type: str
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


STREAMED = object()   # a handler's answer when it wrote and finished the response itself


@dataclass(frozen=True)
class Route:
    """METHOD + path regex -> handler(request, **groups); `admin` routes need an admin bearer token.

    `identity` routes read `request.context.identity`; on every other route a trusted proxy's certificate
    header is not verified (the context says no identity), which saves most of that header's cost.
    """

    method: str
    pattern: re.Pattern[str]
    handler: Callable[..., Any]
    admin: bool = False
    label: str = ""  # the route as metrics and access logs name it, e.g. /api/v1/services/{service_id}
    identity: bool = False


def route(method: str, path: str, handler: Callable[..., Any], admin: bool = False, label: str = "",
          identity: bool = False) -> Route:
    """Build a Route; `path` is a regex matched against the whole request path."""
    return Route(method, re.compile(path), handler, admin, label or route_label(path), identity)


def _finish(request: Any, body: bytes) -> None:
    # a Content-Length instead of chunked encoding: fewer writes, and what OCSP clients expect
    request.setHeader(b"Content-Length", str(len(body)).encode())
    request.write(body if request.method != b"HEAD" else b"")
    request.finish()


def route_label(path: str) -> str:
    """A readable, bounded name for a route regex: named groups become {name}, escapes are undone."""
    label = re.sub(r"\(\?P<(\w+)>(?:[^()]|\([^()]*\))*\)", r"{\1}", path)
    label = re.sub(r"\(\?:[^()]*\)\??", "", label)
    return label.replace("\\.", ".").replace("/?", "/")


def json_body(request: Any, allowed: Iterable[str]) -> dict[str, Any]:
    """The request body as a JSON object with only `allowed` keys, or BadRequest/PayloadTooLarge.

    An unknown key is an error, never ignored: a misspelt field must not silently take its default.
    """
    from ..errors import BadRequest
    raw = request.content.read(MAX_JSON_BODY + 1) if request.content is not None else b""
    if len(raw) > MAX_JSON_BODY:
        raise PayloadTooLarge("request body is too large")
    if not raw.strip():
        return {}
    try:
        value = loads_strict(raw)
    except ValueError as e:
        raise BadRequest(f"request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(value, dict):
        raise BadRequest("request body must be a JSON object", "invalid_json")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise BadRequest(f"{unknown[0][:100]}: unknown field (allowed: {', '.join(sorted(allowed)) or 'none'})",
                         "invalid_field")
    return value


def iso(ts: int | float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC (the HTTP API's timestamp form)."""
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def int_field(body: dict[str, Any], name: str, low: int, high: int, nullable: bool = True) -> int | None:
    """An integer body field within [low, high] (None when absent, or null if allowed); BadRequest else."""
    from ..errors import BadRequest
    if name not in body or (body[name] is None and nullable):
        return None
    value = body[name]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(f"{name}: must be an integer from {low} to {high}" + (" (or null)" if nullable else ""),
                         "invalid_field")
    return value


def bearer_token(request: Any) -> str | None:
    """The token of an `Authorization: Bearer …` header, if any."""
    header = request.getHeader(b"authorization")
    if not header:
        return None
    scheme, _, token = header.decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class Router(Resource):
    """Dispatches every path itself (isLeaf) so routes, 404, 405 and errors are decided in one place."""

    isLeaf = True

    def __init__(self, routes: list[Route], check_admin: Callable[[str, str], bool | None] | None = None,
                 describe_admin: Callable[[str], Any] | None = None,
                 on_unknown_token: Callable[[Any, str], None] | None = None) -> None:
        self.describe_admin = describe_admin   # the audit trail's actor for a token (AdminTokenRegistry.describe)
        self.on_unknown_token = on_unknown_token   # (request, route label): the audit trail's sign-in failures
        super().__init__()
        self.routes = routes
        self._identity_routes = [r for r in routes if r.identity]
        self.check_admin = check_admin
        self.resources: dict[str, Resource] = {}   # WebSocket endpoints: they always read identity

    def wants_identity(self, path: bytes) -> bool:
        """Whether the request for `path` may read its identity (a WebSocket endpoint or an identity route)."""
        text = path.decode("latin-1")
        return text in self.resources or any(r.pattern.fullmatch(text) for r in self._identity_routes)

    def render(self, request: Any) -> Any:
        path = request.path.decode("latin-1")
        method = request.method.decode("latin-1")
        resource = self.resources.get(path)
        request.route_label = path if resource is not None else "unmatched"
        if resource is not None:  # WebSocket endpoints take over the connection themselves
            if method != "GET":
                request.setHeader(b"Allow", b"GET")
                return self._write_error(request, UptrakitError(f"method {method} not allowed",
                                                                "method_not_allowed"), status=405)
            if b"websocket" not in (request.getHeader(b"upgrade") or b"").lower():
                # answer in JSON like every route (Autobahn would send an HTML page naming its version)
                request.setHeader(b"Upgrade", b"websocket")
                return self._write_error(request, UptrakitError("this is a WebSocket endpoint: send an Upgrade "
                                                                "request (see docs/protocol.md)", "upgrade_required"),
                                         status=426)
            return resource.render(request)
        matched = [(r, m) for r in self.routes if (m := r.pattern.fullmatch(path))]
        if not matched:
            return self._write_error(request, NotFound(f"no route for {path[:200]}"))
        methods = {r.method for r, _ in matched}
        allowed = sorted(methods | ({"HEAD"} if "GET" in methods else set()))
        lookup = "GET" if method == "HEAD" else method
        chosen = next(((r, m) for r, m in matched if r.method == lookup), None)
        if chosen is None:
            request.setHeader(b"Allow", ", ".join(allowed).encode())
            return self._write_error(request, UptrakitError(f"method {method} not allowed", "method_not_allowed"),
                                     status=405)
        r, m = chosen
        request.route_label = r.label
        if r.admin:
            token = bearer_token(request)
            if token is None:
                request.setHeader(b"WWW-Authenticate", b'Bearer realm="uptrakitd"')
                return self._write_error(request, Unauthorized("admin token required (Authorization: Bearer …)"))
            verdict = self.check_admin(token, lookup) if self.check_admin else None
            if verdict is None:
                if self.on_unknown_token is not None:
                    self.on_unknown_token(request, r.label)
                request.setHeader(b"WWW-Authenticate", b'Bearer realm="uptrakitd", error="invalid_token"')
                return self._write_error(request, Unauthorized("admin token not recognized"))
            if verdict is False:
                return self._write_error(request, Forbidden(f"this token may not {method} here"))
            request.admin_actor = self.describe_admin(token) if self.describe_admin else None
        d = maybeDeferred(r.handler, request, **m.groupdict())
        d.addCallbacks(lambda result: self._write_result(request, result),
                       lambda failure: self._write_failure(request, failure))
        return NOT_DONE_YET

    def _write_result(self, request: Any, result: Any) -> None:
        if getattr(request, "channel", None) is None or request.finished or result is STREAMED:   # (no channel: gone)
            return
        if isinstance(result, Response):
            request.setResponseCode(result.status)
            request.setHeader(b"Content-Type", result.content_type.encode())
            for name, value in result.headers.items():
                request.setHeader(name.encode(), value.encode())
            body = result.body
        else:
            status = 200
            if isinstance(result, tuple):
                status, result = result
            request.setResponseCode(status)
            request.setHeader(b"Content-Type", b"application/json")
            body = json.dumps(result).encode() + b"\n"
        if not request.responseHeaders.hasHeader(b"cache-control"):
            request.setHeader(b"Cache-Control", b"no-store")
        _finish(request, body)

    def _write_failure(self, request: Any, failure: Failure) -> None:
        if getattr(request, "channel", None) is None or request.finished:   # (no channel: the client went)
            return
        if isinstance(failure.value, UptrakitError):
            body = self._write_error(request, failure.value)
        else:
            log.failure("unexpected error answering {method} {path}", failure,
                        method=request.method.decode("latin-1"), path=request.path.decode("latin-1")[:200])
            body = self._write_error(request, UptrakitError("internal error", "internal_error"), status=500)
        _finish(request, body)

    def _write_error(self, request: Any, error: UptrakitError, status: int | None = None) -> bytes:
        request.setResponseCode(status or error.status)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        answer = {"error": error.message, "code": error.code}
        if error.field:
            answer["field"] = error.field
        body = json.dumps(answer).encode() + b"\n"
        return b"" if request.method == b"HEAD" else body
