"""The OCSP fast path: answers that `GuardedChannel` (web/site.py) writes itself, without twisted.web's
request machinery.

Why: profiles showed the request machinery (header parsing, `Request`, routing, rendering) costing more
reactor time than the OCSP work: most of a cached answer's ~0.25 ms, and ~45 % of a signed nonce answer
(twisted's Content-Type parse through the `email` package alone was 9 %).

Contract: `OcspFastPath.respond(data)` is given the bytes of one read on an idle connection. It returns
the complete HTTP response twisted.web would send for them, byte for byte but for `Date` (the same
status line, headers and body, and the same decision to close), or None; with None the bytes go to
twisted.web unchanged. It answers only:

- a repeated GET of an OCSP path (nginx's `ssl_ocsp` asks the same URL at every handshake of the same
  certificate), from an entry kept per exact request path until the answer's half-life (as the
  responder's own cache) and dropped as soon as the responder forgets anything (a revocation or a
  rotation bumps `OcspResponder.version`); bounded, cleared when full;
- a POST to `/api/v1/pki/ocsp` whose whole body is in this read (what openssl and other clients send),
  handed straight to the responder.

A head is taken only in the plainest form twisted.web takes the same way; anything else (other routes,
WebSocket upgrades, conditional requests, chunked bodies, odd spacing or bytes) is None. Proof:
tests/test_site.py `DifferentialTests` sends generated heads to a site with and without the fast path and
requires the same answers; tests/test_ocsp.py checks the reuse of entries.
"""
from __future__ import annotations

import email.utils
import re
from typing import Any, Callable

from uptrakitd.observability.metrics import CounterChildren
from ..pki.ocsp import MAX_REQUEST_BYTES, OcspAnswer, OcspResponder

# A head is taken only when twisted.web would take it the same way (tests/test_site.py checks it head for
# head): a target of visible ASCII, and field lines that are a token, a colon and visible ASCII,
# each ended by CRLF. No bare CR or LF, no folding, no NUL, no space in a name: those go to twisted.web.
_TARGET = re.compile(rb"[!-~]+")
_FIELD_LINES = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t -~]*\r\n)*")
# the fast path leaves a request with one of these to twisted.web; and it reads these to answer it
# conditional requests go the ordinary way (web.pki answers them 304)
_FIELDS_REFUSED = (b"transfer-encoding", b"expect", b"upgrade", b"if-none-match", b"if-modified-since")
_FIELDS_READ = _FIELDS_REFUSED + (b"content-length", b"connection")


def parse(data: bytes) -> tuple[bytes, bytes, bytes, int | None, bool, bytes] | None:
    """(method, path, version, content length, close, body) of a head the fast path may take, or None."""
    if not data.startswith((b"GET ", b"POST ")):
        return None
    end = data.find(b"\r\n\r\n")
    if end < 0 or end > 8192:
        return None
    line, _, fields = data[:end].partition(b"\r\n")
    body = data[end + 4:]
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.0", b"HTTP/1.1") or not _TARGET.fullmatch(parts[1]):
        return None
    if fields and not _FIELD_LINES.fullmatch(fields + b"\r\n"):
        return None   # anything but plain `token: visible text` lines is twisted.web's to judge
    method, path, version = parts
    if not (method == b"GET" and b"/ocsp/" in path or method == b"POST" and path == b"/api/v1/pki/ocsp"):
        return None   # every other request (WebSocket upgrades included) before its headers are read
    close = version == b"HTTP/1.0"
    length = None
    lowered = fields.lower()
    # nginx asks with a Host line only: the field loop is needed only when a field that matters is there
    for header in lowered.split(b"\r\n") if any(name in lowered for name in _FIELDS_READ) else ():
        name, _, value = header.partition(b":")
        name = name.strip()
        if name in _FIELDS_REFUSED:
            return None
        if name == b"content-length":
            if length is not None or not value.strip().isdigit():
                return None
            length = int(value)
        elif name == b"connection" and b"close" in value:
            close = True
    return method, path, version, length, close, body


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

    def respond(self, data: bytes, peer: Callable[[], str | None]) -> tuple[bytes, bool] | None:
        """(the complete response, whether to close after it) for one read's `data`, or None (see the module)."""
        head = parse(data)
        if head is None:
            return None
        method, path, version, length, close, body = head
        if method == b"GET":
            response = self.repeated_get(path, version, close) if length is None and not body else None
        elif length is not None and length == len(body) <= MAX_REQUEST_BYTES:
            response = self.post(body, version, close, peer())
        else:
            response = None
        return None if response is None else (response, close)

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
