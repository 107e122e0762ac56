"""Public PKI routes: CA bundle, CRLs, OCSP (served on HTTPS and on the plain-HTTP PKI listener)."""
from __future__ import annotations

import email.utils
import hashlib
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from ..errors import NotFound, PayloadTooLarge
from ..metrics import CounterChildren
from ..pki.authority import CertificateAuthority
from ..pki.crl import CrlPublisher
from ..pki.ocsp import MAX_REQUEST_BYTES, OcspAnswer, OcspDecodeError, OcspResponder, decode_get_path
from .router import Response, Route, route

OCSP_GET = r"(?:/api/v1/pki)?(?:/[^?]*)?/ocsp/(?P<encoded>.+)"


class PkiRoutes:
    """Handlers for the public PKI routes."""

    def __init__(self, ca: CertificateAuthority, crls: CrlPublisher, ocsp: OcspResponder,
                 fast_ocsp: OcspFastPath | None = None) -> None:
        self.ca = ca
        self.crls = crls
        self.ocsp = ocsp
        self.fast_ocsp = fast_ocsp

    def routes(self) -> list[Route]:
        return [
            route("GET", r"/api/v1/pki/ca\.crt", self.ca_bundle),
            route("GET", r"/api/v1/pki/ca/(?P<generation>[0-9]{1,6})\.crt", self.ca_der),
            route("GET", r"/api/v1/pki/ca\.crl", self.crl_bundle),
            route("GET", r"/api/v1/pki/crl/(?P<generation>[0-9]{1,6})\.crl", self.crl_der),
            route("POST", r"/api/v1/pki/ocsp", self.ocsp_post),
            route("GET", OCSP_GET, self.ocsp_get, label="/api/v1/pki/ocsp/{encoded}"),
        ]

    def ca_bundle(self, request: Any) -> Response:
        body = self.ca.bundle_pem()
        return _conditional(request, Response(body, "application/x-pem-file"))

    def ca_der(self, request: Any, generation: str) -> Response:
        """One CA generation's certificate, DER: what AIA caIssuers points to."""
        ca = next((c for c in self.ca.state.served(self.ca.now()) if c.generation == int(generation)), None)
        if ca is None:
            raise NotFound(f"no CA generation {int(generation)} is served", "ca_not_found")
        return _conditional(request, Response(ca.cert.public_bytes(Encoding.DER), "application/pkix-cert"))

    def crl_bundle(self, request: Any) -> Response:
        crls = self.crls
        newest = max(c.this_update for c in crls.current.values())
        return _conditional(request, Response(crls.bundle_pem(), "application/x-pem-file",
                                              headers={"Last-Modified": _http_date(newest)}), crls.bundle_etag)

    def crl_der(self, request: Any, generation: str) -> Response:
        crl = self.crls.current.get(int(generation))
        if crl is None:
            raise NotFound(f"no CRL is served for CA generation {int(generation)}", "crl_not_found")
        return _conditional(request, Response(crl.der, "application/pkix-crl",
                                              headers={"Last-Modified": _http_date(crl.this_update)}), crl.etag)

    def ocsp_post(self, request: Any) -> Response:
        body = request.content.read(MAX_REQUEST_BYTES + 1) if request.content is not None else b""
        if len(body) > MAX_REQUEST_BYTES:
            raise PayloadTooLarge("OCSP request larger than 64 KiB")
        return self._respond(self.ocsp.answer(body, _peer(request)))

    def ocsp_get(self, request: Any, encoded: str) -> Response:
        # request.path keeps percent-escapes and '/', which is what the encoded request needs.
        raw = request.uri.decode("latin-1").split("?", 1)[0]
        encoded = raw.split("/ocsp/", 1)[1]
        try:
            der = decode_get_path(encoded)
        except OcspDecodeError:
            der = b""  # answered like any garbage: an OCSP malformedRequest response, HTTP 200
        if len(der) > MAX_REQUEST_BYTES:
            raise PayloadTooLarge("OCSP request larger than 64 KiB")
        answer = self.ocsp.answer(der, _peer(request))
        if self.fast_ocsp is not None and request.method == b"GET":
            self.fast_ocsp.remember(request.uri, answer)
        if "ETag" in answer.headers:   # a cacheable answer: a cache revalidating it may get 304
            return _conditional(request, self._respond(answer), answer.headers["ETag"])
        return self._respond(answer)

    @staticmethod
    def _respond(answer: OcspAnswer) -> Response:
        return Response(answer.der, "application/ocsp-response", headers=dict(answer.headers))


def _peer(request: Any) -> str | None:
    """The TCP peer's address: what the OCSP signing limit counts by."""
    return getattr(request.getClientAddress(), "host", None)


def _http_date(when: Any) -> str:
    return email.utils.format_datetime(when, usegmt=True)


def _not_modified(request: Any, headers: dict[str, str]) -> bool:
    """RFC 9110 §13.1: If-None-Match names this ETag (or *); without one, If-Modified-Since is not before
    Last-Modified. A date that does not parse is ignored, as the RFC says."""
    inm = request.getHeader(b"if-none-match")
    if inm is not None:
        tags = [t.strip() for t in inm.decode("latin-1").split(",")]
        return "*" in tags or headers.get("ETag") in tags or "W/" + headers.get("ETag", "") in tags
    ims, modified = request.getHeader(b"if-modified-since"), headers.get("Last-Modified")
    if ims is None or modified is None:
        return False
    try:
        since = email.utils.parsedate_to_datetime(ims.decode("latin-1"))
    except (TypeError, ValueError, IndexError):
        return False
    if since.tzinfo is None:
        return False
    return email.utils.parsedate_to_datetime(modified) <= since


def _conditional(request: Any, response: Response, etag: str | None = None) -> Response:
    etag = etag or '"' + hashlib.sha256(response.body).hexdigest()[:32] + '"'
    response.headers["ETag"] = etag
    response.headers.setdefault("Cache-Control", "no-cache")
    if _not_modified(request, response.headers):
        return Response(b"", response.content_type, 304, response.headers)
    return response


class _Remembered:
    """One path's answer, and the last complete response built from it (reused within its second: only
    `Date` and `max-age` change from one second to the next)."""

    __slots__ = ("answer", "version", "fixed", "built")

    def __init__(self, answer: OcspAnswer, version: int, fixed: bytes) -> None:
        self.answer, self.version, self.fixed = answer, version, fixed
        self.built: tuple[int, bytes, bool, bytes] = (-1, b"", False, b"")   # (second, HTTP version, close, bytes)


class OcspFastPath:
    """OCSP answers that `GuardedChannel` writes itself, without twisted.web's request machinery.

    Profiles showed the request machinery (header parsing, `Request`, routing, rendering) costing more
    reactor time than the OCSP work: most of a cached answer's ~0.25 ms, and ~45 % of a signed nonce
    answer (twisted's Content-Type parse through the `email` package alone was 9 %). Two cases:

    - GET, repeated: nginx's `ssl_ocsp` asks the same URL at every handshake of the same certificate. An
      entry is the responder's answer for one exact request path; it is used until the answer's
      half-life (as the responder's own cache) and dropped as soon as the responder forgets anything (a
      revocation or a rotation bumps `OcspResponder.version`). Bounded: cleared when full.
    - POST with its whole body in one read (what openssl and other clients send): handed straight to
      the responder, which signs a nonce answer per request.
    """

    MAX_ENTRIES = 10_000
    MAX_PATH = 1024   # nginx's paths are ~150 bytes; any prefix is accepted, so a long one is not kept
    GET_ROUTE = "/api/v1/pki/ocsp/{encoded}"
    POST_ROUTE = "/api/v1/pki/ocsp"

    def __init__(self, ocsp: OcspResponder, clock: Any, requests: Any = None) -> None:
        self.ocsp = ocsp
        self.clock = clock
        self.requests = CounterChildren(requests)   # uptrakit_http_requests, counted as the router would
        self._entries: dict[bytes, _Remembered] = {}
        self._date: tuple[int, bytes] = (-1, b"")
        self.hits = 0    # repeated GETs answered here
        self.posts = 0   # POSTs answered here

    def remember(self, path: bytes, answer: OcspAnswer) -> None:
        """Keep a reusable answer for this exact request path."""
        if answer.reuse_until is None or answer.next_update is None or len(path) > self.MAX_PATH:
            return
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()
        fixed = _header_lines({k: v for k, v in answer.headers.items() if k != "Cache-Control"})
        self._entries[path] = _Remembered(answer, self.ocsp.version, fixed)

    def repeated_get(self, path: bytes, version: bytes, close: bool) -> bytes | None:
        """The complete response for a GET of `path`, or None to answer it the ordinary way."""
        entry = self._entries.get(path)
        if entry is None or self.ocsp.stale():   # stale: the responder answers tryLater, the ordinary way
            return None
        answer, now = entry.answer, self.clock.seconds()
        if entry.version != self.ocsp.version or now >= (answer.reuse_until or 0):
            del self._entries[path]
            return None
        self.ocsp.count(answer.status)
        self.hits += 1
        self._count(self.GET_ROUTE, "GET")
        second = int(now)
        built = entry.built
        if built[0] == second and built[1] == version and built[2] == close:
            return built[3]
        max_age = max(0, int((answer.next_update or now) - second))
        response = self._http(version, close, b"Cache-Control: max-age=%d, public, no-transform, must-revalidate\r\n"
                              % max_age + entry.fixed, answer.der)
        entry.built = (second, version, close, response)
        return response

    def post(self, body: bytes, version: bytes, close: bool, client: str | None = None) -> bytes:
        """The complete response to a POST of `body` (at most MAX_REQUEST_BYTES) from address `client`."""
        answer = self.ocsp.answer(body, client)
        self.posts += 1
        self._count(self.POST_ROUTE, "POST")
        return self._http(version, close, _header_lines(answer.headers), answer.der)

    def _count(self, route: str, method: str) -> None:
        self.requests.inc(route, method, "200")

    def _http(self, version: bytes, close: bool, headers: bytes, der: bytes) -> bytes:
        second = int(self.clock.seconds())
        if self._date[0] != second:
            self._date = (second, email.utils.formatdate(second, usegmt=True).encode())
        return b"".join((version, b" 200 OK\r\nServer: uptrakitd\r\nDate: ", self._date[1],
                         b"\r\nContent-Type: application/ocsp-response\r\n", headers,
                         b"Content-Length: ", str(len(der)).encode(), b"\r\n",
                         # HTTP/1.0 closes without saying so, as twisted.web answers it
                         b"Connection: close\r\n\r\n" if close and version == b"HTTP/1.1" else b"\r\n", der))


def _header_lines(headers: dict[str, str]) -> bytes:
    return "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
