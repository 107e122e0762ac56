"""The admin web UI (`/ui/`): static files; every action goes through the admin API with a token."""
from __future__ import annotations

from importlib import resources

from .router import Response, Route, route

_TYPES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class UiRoutes:
    """Serves the UI's three files with a strict Content-Security-Policy."""

    def __init__(self) -> None:
        folder = resources.files("uptrakitd.web").joinpath("ui")
        self.files = {name: folder.joinpath(name).read_bytes() for name in _TYPES}

    def routes(self) -> list[Route]:
        return [route("GET", r"/ui/?", lambda request: self.serve("index.html")),
                route("GET", r"/ui/(?P<name>index\.html|app\.js|style\.css)", lambda request, name: self.serve(name))]

    def serve(self, name: str) -> Response:
        return Response(self.files[name], _TYPES[name], headers={
            "Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"})
