"""Health, readiness and metrics routes."""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks

from ..router import Response, Route, route


class StatusRoutes:
    """`/healthz`, `/readyz`, `/metrics`."""

    def __init__(self, controller: Any) -> None:
        self.c = controller

    def routes(self) -> list[Route]:
        return [route("GET", r"/healthz", self.healthz), route("GET", r"/readyz", self.readyz),
                route("GET", r"/metrics", self.metrics)]

    def healthz(self, request: Any) -> Response:
        return Response(b"ok", "text/plain; charset=utf-8")

    @inlineCallbacks
    def readyz(self, request: Any) -> Any:
        checks = yield self.c.readiness()
        ready = all(v == "ok" for v in checks.values())
        return (200 if ready else 503), {"status": "ready" if ready else "not_ready", "checks": checks}

    def metrics(self, request: Any) -> Response:
        return Response(self.c.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
