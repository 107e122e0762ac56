"""Health, readiness and metrics routes."""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks

from ... import __version__
from ...metrics import Metrics
from ...readiness import Readiness
from ..router import Response, Route, route


def healthz(request: Any) -> Response:
    """Liveness: the reactor answers."""
    return Response(b"ok", "text/plain; charset=utf-8")


class StatusRoutes:
    """`/healthz`, `/readyz`, `/metrics`."""

    def __init__(self, readiness: Readiness, metrics: Metrics, metrics_require_auth: bool = False) -> None:
        self.readiness = readiness
        self.metrics_registry = metrics
        self.metrics_require_auth = metrics_require_auth

    def routes(self) -> list[Route]:
        return [route("GET", r"/healthz", healthz), route("GET", r"/readyz", self.readyz),
                route("GET", r"/metrics", self.metrics, admin=self.metrics_require_auth)]

    @inlineCallbacks
    def readyz(self, request: Any) -> Any:
        checks = yield self.readiness.check()
        ready = all(v == "ok" for v in checks.values())
        return (200 if ready else 503), {"status": "ready" if ready else "not_ready", "checks": checks,
                                         "version": __version__}

    def metrics(self, request: Any) -> Response:
        return Response(self.metrics_registry.render(), "text/plain; version=0.0.4; charset=utf-8")
