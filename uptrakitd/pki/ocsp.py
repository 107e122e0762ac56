"""OCSP responder (RFC 6960, RFC 5019 profile): signed by the issuing CA, cached when there is no nonce."""
from __future__ import annotations

import base64
import binascii
import datetime
import email.utils
import hashlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from prometheus_client import Counter
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .state import CaState
from .crl import REASONS

log = Logger()

MAX_REQUEST_BYTES = 64 * 1024
OCSP_VALIDITY = datetime.timedelta(hours=1)  # nextUpdate - thisUpdate
_HASH_NAMES = {"sha1": "sha1", "sha256": "sha256", "sha384": "sha384", "sha512": "sha512"}


class OcspDecodeError(ValueError):
    """The GET path does not carry a base64 request."""


def decode_get_path(encoded: str) -> bytes:
    """`<encoded>` of GET .../ocsp/<encoded>: URL-escaped standard base64, base64url, padding optional."""
    text = unquote(encoded).strip()
    text = text.replace("-", "+").replace("_", "/").replace(" ", "+")
    text = text.rstrip("=")
    if not text or len(text) > MAX_REQUEST_BYTES * 2:
        raise OcspDecodeError("empty or oversized OCSP GET request")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise OcspDecodeError("OCSP GET request is not base64") from None


@dataclass(frozen=True)
class OcspAnswer:
    """A DER OCSP response plus the HTTP cache headers that go with it."""

    der: bytes
    headers: dict[str, str]
    status: str  # good | revoked | unknown | unauthorized | malformed
    serial: int | None = None
    reuse_until: float | None = None   # a cacheable answer: the same bytes may be served until then
    next_update: float | None = None   # its nextUpdate, for max-age


def _http_date(when: datetime.datetime) -> str:
    return email.utils.format_datetime(when.astimezone(datetime.timezone.utc), usegmt=True)


class OcspResponder:
    """Answers OCSP requests from the in-memory records; keeps signed nonce-less responses."""

    def __init__(self, state: CaState, clock: IReactorTime, counter: Counter | None = None,
                 validity: datetime.timedelta = OCSP_VALIDITY) -> None:
        self.state = state
        self.clock = clock
        self.validity = validity
        self._counter = counter  # labelled by status
        self._cache: dict[tuple[int, int, str | None], tuple[bytes, datetime.datetime, datetime.datetime]] = {}
        self.version = 0   # changes whenever cached answers may have become wrong (revocation, rotation)

    def on_revoked(self, event: Any) -> None:
        """CertificateRevoked: the cached answer for that serial is wrong now."""
        self.invalidate(event.serial)

    def on_ca_rotated(self, event: Any) -> None:
        """CaRotated: forget every cached answer."""
        self.invalidate()

    def invalidate(self, serial: int | None = None) -> None:
        """Forget cached responses: for one serial (revocation) or all (CA change)."""
        self.version += 1
        if serial is None:
            self._cache.clear()
            return
        for key in [k for k in self._cache if k[1] == serial]:
            del self._cache[key]

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(int(self.clock.seconds()), datetime.timezone.utc)

    def answer(self, der: bytes) -> OcspAnswer:
        """Answer one DER request; never raises for any input."""
        try:
            result = self._answer(der)
        except Exception:  # the responder must answer garbage with malformedRequest, never a 500
            log.failure("OCSP request could not be answered")
            result = self._unsuccessful(ocsp.OCSPResponseStatus.INTERNAL_ERROR, "malformed")
        # one line per answer was a third of a cached answer's cost: counted in uptrakit_ocsp_responses,
        # logged at debug
        log.debug("OCSP: {status} for serial {serial}", status=result.status,
                 serial=format(result.serial, "X") if result.serial is not None else "-")
        self.count(result.status)
        return result

    def count(self, status: str) -> None:
        """One answer given (also by the HTTP fast path for repeated GETs)."""
        if self._counter is not None:
            self._counter.labels(status).inc()

    def _unsuccessful(self, status: ocsp.OCSPResponseStatus, label: str) -> OcspAnswer:
        der = ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(Encoding.DER)
        return OcspAnswer(der, {"Cache-Control": "no-store"}, label)

    def _answer(self, der: bytes) -> OcspAnswer:
        try:
            request = ocsp.load_der_ocsp_request(der)
            name_hash, key_hash = request.issuer_name_hash, request.issuer_key_hash
            algorithm = request.hash_algorithm
            serial = request.serial_number
        except (ValueError, NotImplementedError, TypeError):
            return self._unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformed")
        except Exception:  # unsupported hash algorithms and the like
            return self._unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformed")
        if serial < 0:  # RFC 5280 serials are positive; such a CertID names nothing we could have issued
            return self._unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformed")
        nonce = None
        try:
            for ext in request.extensions:
                if isinstance(ext.value, x509.OCSPNonce):
                    nonce = ext.value.nonce
        except (ValueError, TypeError):
            return self._unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformed")
        alg_name = _HASH_NAMES.get(algorithm.name)
        ca = self.state.ca_for_certid(alg_name, name_hash, key_hash) if alg_name else None
        if ca is None:
            log.info("OCSP request for serial {serial:X} of an issuer that is not ours: unauthorized",
                     serial=serial)
            return self._unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED, "unauthorized")
        now = self._now()
        cache_key = (ca.generation, serial, alg_name)
        cached = self._cache.get(cache_key) if nonce is None else None
        if cached is not None:
            resp_der, this_update, next_update = cached
            if now < this_update + (next_update - this_update) / 2:
                return self._with_headers(resp_der, this_update, next_update, nonce, serial,
                                          self._status_of(serial, ca))
        record = self.state.records.get(serial)
        kwargs: dict[str, Any] = {}
        if record is None or record.ca_generation != ca.generation:
            status, label = ocsp.OCSPCertStatus.UNKNOWN, "unknown"
        elif record.revoked_at is not None:
            status, label = ocsp.OCSPCertStatus.REVOKED, "revoked"
            kwargs["revocation_time"] = datetime.datetime.fromtimestamp(record.revoked_at, datetime.timezone.utc)
            kwargs["revocation_reason"] = REASONS.get(record.reason or "unspecified", x509.ReasonFlags.unspecified)
        else:
            status, label = ocsp.OCSPCertStatus.GOOD, "good"
        next_update = now + self.validity
        builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
            issuer_name_hash=name_hash, issuer_key_hash=key_hash, serial_number=serial, algorithm=algorithm,
            cert_status=status, this_update=now, next_update=next_update,
            revocation_time=kwargs.get("revocation_time"), revocation_reason=kwargs.get("revocation_reason"),
        ).responder_id(ocsp.OCSPResponderEncoding.HASH, ca.cert)
        if nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        resp_der = builder.sign(ca.key, ca.signing_hash()).public_bytes(Encoding.DER)
        if nonce is None and label != "unknown":
            self._cache[cache_key] = (resp_der, now, next_update)
        return self._with_headers(resp_der, now, next_update, nonce, serial, label)

    def _status_of(self, serial: int, ca: Any) -> str:
        record = self.state.records.get(serial)
        if record is None or record.ca_generation != ca.generation:
            return "unknown"
        return "revoked" if record.revoked_at is not None else "good"

    def _with_headers(self, der: bytes, this_update: datetime.datetime, next_update: datetime.datetime,
                      nonce: bytes | None, serial: int, label: str) -> OcspAnswer:
        if nonce is not None:
            return OcspAnswer(der, {"Cache-Control": "no-store"}, label, serial)
        max_age = max(0, int((next_update - self._now()).total_seconds()))
        return OcspAnswer(der, {
            "Cache-Control": f"max-age={max_age}, public, no-transform, must-revalidate",
            "Last-Modified": _http_date(this_update),
            "Expires": _http_date(next_update),
            "ETag": '"' + hashlib.sha256(der).hexdigest()[:32] + '"',
        }, label, serial,
            # "unknown" is not kept: the certificate may be issued by another controller a moment later
            (this_update + (next_update - this_update) / 2).timestamp() if label != "unknown" else None,
            next_update.timestamp())
