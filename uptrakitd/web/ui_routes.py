"""The admin web UI (`/ui/`): static files; every action goes through the admin API with a token."""
from __future__ import annotations

from importlib import resources
from typing import Any

from .router import Response, Route, route

_TYPES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class UiRoutes:
    """Serves the UI's three files with a strict Content-Security-Policy."""

    def __init__(self) -> None:
        folder = resources.files("uptrakitd.web").joinpath("ui")
        self.files = {name: folder.joinpath(name).read_bytes() for name in _TYPES}

    def routes(self) -> list[Route]:
        return [route("GET", r"/", self.to_ui),
                route("GET", r"/ui/?", lambda request: self.serve("index.html")),
                route("GET", r"/ui/(?P<name>index\.html|app\.js|style\.css|favicon\.svg)",
                      lambda request, name: self.serve(name)),
                # browsers ask for /favicon.ico whatever the page links; an SVG with its type works in all current ones
                route("GET", r"/favicon\.ico", lambda request: self.serve("favicon.svg"))]

    def to_ui(self, request: Any) -> Response:
        """`/`: a browser is sent to the UI; the body says where for anything that does not follow redirects."""
        return Response(b'{"ui": "/ui/", "api": "/api/v1/"}\n', "application/json", status=302,
                        headers={"Location": "/ui/"})

    def serve(self, name: str) -> Response:
        return Response(self.files[name], _TYPES[name], headers={
            "Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"})
