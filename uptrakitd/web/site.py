"""twisted.web Site whose requests learn who they are (SPEC §3) before any resource sees them, and
whose connections must send a request head in time and cannot send a body larger than its route takes."""
from __future__ import annotations

import json
from typing import Any, Callable

from OpenSSL import SSL
from prometheus_client import Counter
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from ..listen.closing import DEFAULT_CLOSE_GRACE, CloseDeadline
from ..listen.guard import mark_authenticated
from ..pki.ocsp import MAX_REQUEST_BYTES
from ..trust.identity import RequestContext, peer_ip_of

log = Logger()
MAX_JSON_BODY = 256 * 1024
DEFAULT_BODY_LIMIT = 64 * 1024
SERVER_HEADER = b"uptrakitd"
HSTS = b"max-age=63072000"   # two years, Mozilla's recommendation; no includeSubDomains: the host's domain is not ours
ACCESS_LOG_SAMPLE = 100  # "sampled": one request in this many
QUIET_ROUTES = frozenset({"/metrics", "/healthz", "/readyz"})  # scraped and probed: logged only with "all"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})  # after a refused body, how long the answer may take to reach a client still sending


def body_limit(method: bytes, path: bytes) -> int:
    """The largest request body a route takes; anything larger is refused (413) while it arrives."""
    path = path.split(b"?", 1)[0]
    if path.startswith(b"/api/v1/ws/"):
        return 0  # a WebSocket upgrade carries no body
    if method == b"POST" and path == b"/api/v1/pki/ocsp":
        return MAX_REQUEST_BYTES
    if path.startswith(b"/api/v1/"):
        return MAX_JSON_BODY
    return DEFAULT_BODY_LIMIT


def handshake_failure(error: SSL.Error) -> str:
    """A bounded label for why a TLS connection failed (OpenSSL's reason strings, grouped)."""
    reasons = [str(e[-1]).lower() for e in (error.args[0] if error.args and isinstance(error.args[0], list) else [])
               if isinstance(e, tuple) and e]
    text = " ".join(reasons)
    for label, words in (("client certificate refused", ("certificate verify failed",)),
                         ("plain http to the tls port", ("http request",)),
                         ("protocol version", ("unsupported protocol", "wrong version number", "version too low")),
                         ("no shared cipher", ("no shared cipher", "no suitable signature")),
                         ("client alert", ("alert",)),
                         ("connection closed during handshake", ("unexpected eof",))):
        if any(w in text for w in words):
            return label
    return "other"


class IdentifiedRequest(Request):
    """A request that carries `context` (RequestContext); headers that cannot be trusted are removed."""

    context: RequestContext
    body_limit = DEFAULT_BODY_LIMIT
    _body_seen = 0
    _caught_up = False

    def handleContentChunk(self, data: bytes) -> None:
        # chunked bodies have no Content-Length to check up front: count while they arrive
        self._body_seen += len(data)
        if self._body_seen > self.body_limit:
            refuse = getattr(self.channel, "refuse_body", None)
            if refuse is not None:
                refuse(self.body_limit)
                return
        super().handleContentChunk(data)

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        # no version disclosure: Twisted would announce "TwistedWeb/<version>"
        if (name.lower() if isinstance(name, bytes) else name.lower().encode()) == b"server":
            value = SERVER_HEADER
        super().setHeader(name, value)

    def process(self) -> None:
        # Request.process() sets self.site itself; before it, the site is only known to the channel.
        site = getattr(self.channel, "site", None)
        resolver: Callable[..., RequestContext] | None = getattr(site, "resolver", None)
        wants_identity: Callable[[bytes], bool] | None = getattr(getattr(site, "resource", None), "wants_identity",
                                                                 None)
        try:
            if resolver is None:
                self.context = _anonymous(self)
            else:
                self.context = resolver(self, identity=wants_identity(self.path) if wants_identity else True)
        except Exception:
            log.failure("identity resolution failed; treating the request as anonymous")
            self.context = _anonymous(self)
        catch_up = getattr(getattr(self.channel, "site", None), "catch_up", None)
        if self.context.unknown is not None and catch_up is not None and not self._caught_up:
            # several controllers: the certificate or service may have been made on another one a moment
            # ago (an agent that enrolled or renewed there and reconnects here): read them, then decide
            self._caught_up = True
            catch_up(self.context.unknown).addBoth(lambda _: None if self.channel is None else self.process())
            return
        if self.context.identity_source == "mtls":
            mark_authenticated(getattr(self.channel, "transport", None))
        if self.isSecure():   # the UI and the API: a browser that once came over TLS never falls back
            self.setHeader(b"Strict-Transport-Security", HSTS)
        super().process()


def _anonymous(request: Any) -> RequestContext:
    peer = peer_ip_of(request)
    return RequestContext(peer_ip=peer, client_ip=peer)




class GuardedChannel(HTTPChannel):
    """HTTP/1.1 channel with a deadline for each request head and per-route body limits.

    Twisted's idle timeout is reset by every byte, so one byte every few seconds would hold a socket
    forever; the head deadline counts from the connection's start (the TLS handshake included) or
    from the first byte of the next request on a kept-alive connection.
    """

    head_timeout = 10.0
    counters: dict[str, Counter] = {}
    fast_ocsp: Any = None   # web.ocsp_fast.OcspFastPath: OCSP answered without the request machinery
    _fed = False            # HTTPChannel holds bytes of a request that is not done
    _head_timer: Any = None
    _request_line: bytes | None = None
    _closing = False
    _deadline: CloseDeadline | None = None
    close_grace = DEFAULT_CLOSE_GRACE
    # set by a listen.guard.ConnectionGuard that does not wrap this channel: told when the connection ends
    guard: Any = None
    peer_ip = ""
    counted = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.callLater(self.head_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        self._count("head_timeouts")
        log.debug("closing a connection that sent no complete request head in {seconds}s", seconds=self.head_timeout)
        transport: Any = self.transport
        transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return  # whatever a client still sends after the daemon decided to close (a refusal, a 400, …)
        if self.fast_ocsp is not None and self._answer_directly(data):
            return
        if self.line_mode and self._request_line is None and self._head_timer is None:
            self._arm()  # the first byte of the next request on a kept-alive connection
        self._fed = True
        super().dataReceived(data)

    def _answer_directly(self, data: bytes) -> bool:
        """OCSP on an idle connection, complete in this one read, answered by web.ocsp_fast (its contract is
        there); anything else goes the ordinary way. Idle: no request in HTTPChannel's hands (`_fed`, ours:
        set when bytes go to it, cleared when a request is done), and no head of ours begun."""
        if self.requests or self._fed or not self.line_mode or self._request_line is not None:
            return False
        answer = self.fast_ocsp.respond(data, lambda: getattr(self.transport.getPeer(), "host", None)
                                        if self.transport is not None else None)
        if answer is None:
            return False
        response, close = answer
        self._disarm()
        self.resetTimeout()
        transport: Any = self.transport
        transport.write(response)
        if close:
            self.loseConnection()
        return True

    def requestDone(self, request: Any) -> None:
        self._fed = False   # bytes after this request (pipelined) come back through dataReceived
        super().requestDone(request)

    def lineReceived(self, line: bytes) -> None:
        if self._request_line is None and line:
            self._request_line = line
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        self._disarm()
        parts = (self._request_line or b"").split(b" ")
        self._request_line = None
        limit = body_limit(parts[0], parts[1] if len(parts) > 1 else b"/")
        self.requests[-1].body_limit = limit
        if self.length is not None and self.length > limit:
            self.refuse_body(limit)
            return
        super().allHeadersReceived()

    def refuse_body(self, limit: int) -> None:
        """Answer 413 and close, without reading the rest of the body."""
        self._count("bodies_refused")
        body = json.dumps({"error": f"request body larger than this route takes ({limit} bytes)",
                           "code": "payload_too_large"}).encode() + b"\n"
        transport: Any = self.transport
        transport.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.loseConnection()

    def loseConnection(self) -> None:
        """HTTPChannel's (it lets go of the transport's producer so TLS can close), then: nothing more is
        read, and the connection is cut after the close grace (TLS waits for a close_notify, TCP for a
        reader, and a client still sending may give neither: listen.closing)."""
        self._closing = True
        super().loseConnection()
        transport: Any = self.transport
        if self._deadline is None:
            self._deadline = CloseDeadline()
        if transport is not None:
            self._deadline.arm(self.callLater, self.close_grace, transport.abortConnection)

    def connectionLost(self, reason: Any = None) -> None:
        if reason is not None and reason.check(SSL.Error):
            failures = self.counters.get("tls_handshake_failures")
            if failures is not None:
                failures.labels(handshake_failure(reason.value)).inc()
        self._disarm()
        self._deadline = CloseDeadline.end(self._deadline)
        guard, self.guard = self.guard, None
        if guard is not None:
            guard.gone(self)
        super().connectionLost(reason)

    def _count(self, what: str) -> None:
        counter = self.counters.get(what)
        if counter is not None:
            counter.inc()


class IdentifyingSite(Site):
    """Site whose requests are resolved by `resolver` before the resource tree runs."""

    requestFactory = IdentifiedRequest

    def __init__(self, resource: Any, resolver: Callable[..., RequestContext] | None = None,
                 head_timeout: float = GuardedChannel.head_timeout, counters: dict[str, Counter] | None = None,
                 access_log: str = "off", fast_ocsp: Any = None, close_grace: float = DEFAULT_CLOSE_GRACE,
                 catch_up: Callable[[Any], Any] | None = None, **kw: Any) -> None:
        super().__init__(resource, **kw)
        self.close_grace = close_grace
        self.access_log = access_log
        # OCSP on the fast path bypasses the request machinery, and so the access log: only when it is off
        self.fast_ocsp = fast_ocsp if access_log == "off" else None
        self._seen = 0
        self.resolver = resolver
        self.catch_up = catch_up   # several controllers: Cluster.catch_up
        self.displayTracebacks = False
        self.head_timeout = head_timeout
        self.counters = counters or {}

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if isinstance(channel, GuardedChannel):
            channel.head_timeout, channel.counters = self.head_timeout, self.counters
            channel.close_grace = self.close_grace
            channel.fast_ocsp = self.fast_ocsp
        return channel

    protocol = GuardedChannel  # type: ignore[assignment]  # HTTP/1.1 only: no HTTP/2 here

    def log(self, request: Any) -> None:
        route_name = getattr(request, "route_label", "unmatched")
        method = request.method.decode("latin-1")
        requests = self.counters.get("http_requests")
        if requests is not None:
            requests.labels(route_name, method if method in KNOWN_METHODS else "other", str(request.code)).inc()
        if self.access_log == "off" or (self.access_log == "sampled" and route_name in QUIET_ROUTES):
            return
        self._seen += 1
        if self.access_log == "sampled" and self._seen % ACCESS_LOG_SAMPLE:
            return
        # without header values (they may carry certificates or tokens) or the query string
        ctx = getattr(request, "context", None)
        log.info("{client} {method} {path} {status}", client=ctx.client_ip if ctx else "-", method=method,
                 path=request.path.decode("latin-1")[:200], route=route_name, status=request.code,
                 identity_source=ctx.identity_source if ctx else "none")
