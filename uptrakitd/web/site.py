"""twisted.web Site whose requests learn who they are (SPEC §3) before any resource sees them."""
from __future__ import annotations

from typing import Any, Callable

from twisted.logger import Logger
from twisted.web.server import Request, Site

from ..trust.identity import RequestContext, peer_ip_of

log = Logger()


class IdentifiedRequest(Request):
    """A request that carries `context` (RequestContext); headers that cannot be trusted are removed."""

    context: RequestContext

    def process(self) -> None:
        # Request.process() sets self.site itself; before it, the site is only known to the channel.
        resolver: Callable[[Any], RequestContext] | None = getattr(getattr(self.channel, "site", None), "resolver",
                                                                   None)
        try:
            self.context = resolver(self) if resolver else _anonymous(self)
        except Exception:
            log.failure("identity resolution failed; treating the request as anonymous")
            self.context = _anonymous(self)
        super().process()


def _anonymous(request: Any) -> RequestContext:
    peer = peer_ip_of(request)
    return RequestContext(peer_ip=peer, client_ip=peer)


class IdentifyingSite(Site):
    """Site whose requests are resolved by `resolver` before the resource tree runs."""

    requestFactory = IdentifiedRequest

    def __init__(self, resource: Any, resolver: Callable[[Any], RequestContext] | None = None, **kw: Any) -> None:
        super().__init__(resource, **kw)
        self.resolver = resolver
        self.displayTracebacks = False

    def log(self, request: Any) -> None:
        # Access log without header values (they may carry certificates or tokens).
        ctx = getattr(request, "context", None)
        log.debug("{client} {method} {path} {code}", client=ctx.client_ip if ctx else "-",
                  method=request.method.decode("latin-1"), path=request.path.decode("latin-1")[:200],
                  code=request.code)
