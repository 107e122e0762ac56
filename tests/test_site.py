"""The OCSP fast path (GuardedChannel._answer_directly) against twisted.web alone, head for head.

The fast path answers some OCSP requests without twisted.web's request machinery. It may do so only when
twisted.web would take the same bytes the same way: every head here goes through a channel with the fast
path and through one without it, and both must give the same statuses, the same bodies, and leave the
connection open or closed alike.
"""
from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, example, given, settings, strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from uptrakitd.web.ocsp_fast import OcspFastPath
from uptrakitd.web.pki import PkiRoutes
from uptrakitd.web.router import Router
from uptrakitd.web.site import IdentifyingSite

from .test_ocsp import request_der, responder

R, CA, ISSUED = responder()
DER = request_der(ca=CA, issued=ISSUED)
GET_PATH = b"/api/v1/pki/ocsp/" + quote(base64.b64encode(DER).decode(), safe="").encode()
PEER = IPv4Address("TCP", "127.0.0.1", 40000)


def build_site(fast: bool) -> IdentifyingSite:
    clock = Clock()
    fast_ocsp = OcspFastPath(R, R.clock)
    site = IdentifyingSite(Router(PkiRoutes(None, None, R, fast_ocsp).routes()),  # type: ignore[arg-type]
                           fast_ocsp=fast_ocsp if fast else None, reactor=clock)
    if fast:   # the GET is known: the next one may be answered on the fast path
        serve(site, b"GET " + GET_PATH + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    return site


def serve(site: IdentifyingSite, *reads: bytes) -> tuple[list[tuple[bytes, bytes]], bool]:
    """([(status line, body)...], whether the server closed) for `reads` arriving one read each."""
    channel: Any = site.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    channel.makeConnection(transport)
    for data in reads:
        if not transport.disconnecting:
            channel.dataReceived(data)
    out, closed = transport.value(), bool(transport.disconnecting)
    channel.connectionLost(Failure(ConnectionDone()))
    return responses(out), closed


def responses(out: bytes) -> list[tuple[bytes, bytes]]:
    got = []
    while out:
        head, sep, rest = out.partition(b"\r\n\r\n")
        if not sep:
            got.append((head.split(b"\r\n")[0], b"<torn>"))
            break
        lines = head.split(b"\r\n")
        length = next((int(v) for k, _, v in (line.partition(b":") for line in lines[1:])
                       if k.strip().lower() == b"content-length"), 0)
        got.append((lines[0], rest[:length]))
        out = rest[length:]
    return got


SITES = {True: build_site(True), False: build_site(False)}

_POST_BODY = DER
_names = st.sampled_from([b"Host", b"Accept", b"Content-Type", b"Content-Length", b"Connection", b"X-A", b"User-Agent",
                          b"Transfer-Encoding", b"Expect", b"If-None-Match", b"content-length", b"X A", b"", b"X-A\x00",
                          b" Host", b"\tX-A", b"X\rA"])
_values = st.sampled_from([b"x", b"", b" close", b"keep-alive", b"close", b"1", b"38", str(len(DER)).encode(),
                           b"chunked", b"100-continue", b"a\x00b", b"a\rb", b"*", b"1\nContent-Length: 38",
                           b"\x7f", b"\xff", b" spaced ", b"1, 2"])
_header = st.one_of(st.tuples(_names, st.sampled_from([b": ", b":", b" : ", b""]), _values).map(b"".join),
                    st.sampled_from([b"no colon here", b" folded continuation", b"\tfolded", b"X-A: 1\nY: 2",
                                     b"Content-Length: 38", b"Content-Length: 5", b"Content-Length: -1"]))
_request_line = st.one_of(
    st.tuples(st.sampled_from([b"GET", b"POST", b"get", b"HEAD"]), st.just(b" "),
              st.sampled_from([GET_PATH, b"/api/v1/pki/ocsp", b"/nope/ocsp/AAAA", GET_PATH + b" x", GET_PATH + b"\x00",
                               b"http://h" + GET_PATH]),
              st.just(b" "), st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2", b"http/1.1"])
              ).map(b"".join),
    st.sampled_from([b"GET  " + GET_PATH + b" HTTP/1.1", b"POST /api/v1/pki/ocsp HTTP/1.1 x"]))
_tail = st.sampled_from([b"", _POST_BODY, b"GET /nope HTTP/1.1\r\n\r\n", b"GET " + GET_PATH + b" HTTP/1.1\r\n\r\n",
                         _POST_BODY + b"GET /nope HTTP/1.1\r\n\r\n", b"x"])


_EARLIER_READS = [b"X", b"G", b"GET /nope HTTP/1.1\r\n", b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
                  b"GET " + GET_PATH + b" HTTP/1.1\r\n\r\n", b"GET " + GET_PATH[:20],
                  b"POST /api/v1/pki/ocsp HTTP/1.1\r\nContent-Length: " + str(len(DER)).encode() + b"\r\n\r\n",
                  b"POST /api/v1/pki/ocsp HTTP/1.1\r\nContent-Length: " + str(len(DER)).encode() + b"\r\n\r\n"
                  + DER, b"\r\n"]


@st.composite
def heads(draw: Any) -> bytes:
    line = draw(_request_line)
    fields = draw(st.lists(_header, max_size=5))
    newline = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    body = draw(_tail)
    if body.startswith(_POST_BODY) and draw(st.booleans()):
        fields.append(b"Content-Length: " + str(len(_POST_BODY)).encode())
    return line + b"\r\n" + newline.join(fields) + (newline if fields else b"") + b"\r\n" + body


class DifferentialTests(TestCase):
    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(heads())
    # the forms an earlier review found answered by the fast path where twisted.web refuses them
    @example(b"GET " + GET_PATH + b" HTTP/1.1\r\nX-A: 1\nContent-Length: 38\r\n\r\nGET /nope HTTP/1.1\r\n\r\n")
    @example(b"GET " + GET_PATH + b" HTTP/1.1\r\nno colon\r\n\r\n")
    @example(b"GET " + GET_PATH + b" HTTP/1.1\r\nX-A: a\x00b\r\n\r\n")
    @example(b"GET " + GET_PATH + b" HTTP/1.1\r\nX-A: a\rb\r\n\r\n")
    @example(b"GET " + GET_PATH + b" HTTP/1.1\r\nX A: 1\r\n\r\n")
    @example(b"POST /api/v1/pki/ocsp HTTP/1.1\r\nContent-Length: " + str(len(DER)).encode() + b"\r\n\r\n" + DER)
    @example(b"GET " + GET_PATH + b" HTTP/1.0\r\nHost: x\r\n\r\n")
    def test_the_fast_path_answers_only_what_twisted_web_answers_the_same_way(self, data: bytes) -> None:
        fast = serve(SITES[True], data)
        slow = serve(SITES[False], data)
        self.assertEqual(fast, slow, data)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(_EARLIER_READS), heads())
    @example(b"X", b"GET " + GET_PATH + b" HTTP/1.0\r\n\r\n")   # a partial line before: one bad request line
    @example(b"GET /nope HTTP/1.1\r\n", b"GET " + GET_PATH + b" HTTP/1.0\r\n\r\n")   # inside a head
    def test_after_an_earlier_read_too(self, earlier: bytes, data: bytes) -> None:
        """What came before on the connection (a partial line, half a head, a request answered either way)
        decides whether the connection is idle; the fast path must see it as twisted.web does."""
        self.assertEqual(serve(SITES[True], earlier, data), serve(SITES[False], earlier, data), (earlier, data))

    def test_a_kept_alive_connection_is_idle_again_after_a_request(self) -> None:
        site = SITES[True]
        get = b"GET " + GET_PATH + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        before = site.fast_ocsp.hits
        answers, closed = serve(site, b"GET /api/v1/pki/ocsp/AAAA HTTP/1.1\r\nHost: x\r\n\r\n", get, get)
        self.assertEqual([a[0] for a in answers], [b"HTTP/1.1 200 OK"] * 3)   # the first: malformedRequest
        self.assertEqual(site.fast_ocsp.hits, before + 2, "after a request answered the ordinary way, the next "
                                                           "two took the fast path")

    def test_the_fast_path_is_taken_for_the_forms_nginx_and_openssl_send(self) -> None:
        site = SITES[True]
        fast_ocsp = site.fast_ocsp
        for data in (b"GET " + GET_PATH + b" HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n",
                     b"POST /api/v1/pki/ocsp HTTP/1.0\r\nContent-Type: application/ocsp-request\r\nAccept: */*\r\n"
                     b"Content-Length: " + str(len(DER)).encode() + b"\r\nHost: h\r\n\r\n" + DER):
            before = fast_ocsp.hits + fast_ocsp.posts
            answers, closed = serve(site, data)
            self.assertEqual((answers[0][0], closed), (b"HTTP/1.0 200 OK", True))
            self.assertEqual(fast_ocsp.hits + fast_ocsp.posts, before + 1, data[:40])
