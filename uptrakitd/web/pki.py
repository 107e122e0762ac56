"""Public PKI routes: CA bundle, CRLs, OCSP (served on HTTPS and on the plain-HTTP PKI listener)."""
from __future__ import annotations

import email.utils
import hashlib
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from ..errors import NotFound, PayloadTooLarge
from ..pki.authority import CertificateAuthority
from ..pki.crl import CrlPublisher
from ..pki.ocsp import MAX_REQUEST_BYTES, OcspAnswer, OcspDecodeError, OcspResponder, decode_get_path
from .ocsp_fast import OcspFastPath
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
