"""Health, readiness and metrics routes."""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import inlineCallbacks

from ... import __version__
from uptrakitd.observability.metrics import Metrics
from uptrakitd.observability.readiness import Readiness
from ..router import Response, Route, bearer_token, route

# what an unauthenticated peer may learn (docs/security.md "What a peer learns"): liveness, readiness and
# the operational metrics, never which versions run (a scanner's first question); a read or admin token
# gets them
_VERSIONED_FAMILY = b"uptrakit_build_info"


def healthz(request: Any) -> Response:
    """Liveness: the reactor answers."""
    return Response(b"ok", "text/plain; charset=utf-8")


class StatusRoutes:
    """`/healthz`, `/readyz`, `/metrics`."""

    def __init__(self, readiness: Readiness, metrics: Metrics, metrics_require_auth: bool = False,
                 check_token: Callable[[str, str], bool | None] = lambda token, method: None) -> None:
        self.readiness = readiness
        self.metrics_registry = metrics
        self.metrics_require_auth = metrics_require_auth
        self.check_token = check_token

    def _authenticated(self, request: Any) -> bool:
        token = bearer_token(request)
        return token is not None and bool(self.check_token(token, "GET"))

    def routes(self) -> list[Route]:
        return [route("GET", r"/healthz", healthz), route("GET", r"/readyz", self.readyz),
                route("GET", r"/metrics", self.metrics, admin=self.metrics_require_auth)]

    @inlineCallbacks
    def readyz(self, request: Any) -> Any:
        checks = yield self.readiness.check()
        ready = all(v == "ok" for v in checks.values())
        body = {"status": "ready" if ready else "not_ready", "checks": checks}
        if self._authenticated(request):
            body["version"] = __version__
        return (200 if ready else 503), body

    def metrics(self, request: Any) -> Response:
        text = self.metrics_registry.render()
        if not self.metrics_require_auth and not self._authenticated(request):
            text = b"".join(line for line in text.splitlines(keepends=True) if _VERSIONED_FAMILY not in line)
        return Response(text, "text/plain; version=0.0.4; charset=utf-8")
