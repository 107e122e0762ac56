"""OCSP responder (RFC 6960, RFC 5019 profile): signed by the issuing CA (or, with `--ocsp-signer
delegated`, by a short-lived responder certificate that CA issued), cached when there is no nonce."""
from __future__ import annotations

import base64
import binascii
import datetime
import email.utils
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import Counter
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from uptrakitd.observability.metrics import CounterChildren
from .state import CaState
from .crl import REASONS
from .ocsp_limit import SigningBudget, SigningRateLimit
from .ocsp_nonce import NonceTemplates
from .serials import format_serial

log = Logger()

MAX_REQUEST_BYTES = 64 * 1024
OCSP_VALIDITY = datetime.timedelta(hours=1)  # nextUpdate - thisUpdate
# "unknown" may stop being true a moment later (another controller issues the serial, a catch-up lands):
# a minute for caches that go by nextUpdate alone (nginx's ssl_ocsp_cache), and no HTTP caching at all
UNKNOWN_VALIDITY = datetime.timedelta(minutes=1)
RESPONDER_LIFETIME = datetime.timedelta(days=2)
_HASH_NAMES = {"sha1": "sha1", "sha256": "sha256", "sha384": "sha384", "sha512": "sha512"}


_TRY_LATER = ocsp.OCSPResponseBuilder.build_unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER).public_bytes(Encoding.DER)


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
    status: str  # good | revoked | unknown | unauthorized | malformed | try_later
    serial: int | None = None
    reuse_until: float | None = None   # a cacheable answer: the same bytes may be served until then
    next_update: float | None = None   # its nextUpdate, for max-age


def _produced_at() -> datetime.datetime:
    """producedAt of a templated answer: cryptography's builder takes it from the wall clock (whole seconds), so
    the templates do too, and both paths give the same answers (tests/test_ocsp.py NonceTemplateTests)."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def _http_date(when: datetime.datetime) -> str:
    return email.utils.format_datetime(when.astimezone(datetime.timezone.utc), usegmt=True)


_SHA256_ECDSA = ec.ECDSA(hashes.SHA256())


def _delegated_sign(key: ec.EllipticCurvePrivateKey) -> Callable[[ocsp.OCSPResponseBuilder], ocsp.OCSPResponse]:
    return lambda builder: builder.sign(key, hashes.SHA256())


def _delegated_sign_data(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    return lambda data: key.sign(data, _SHA256_ECDSA)


class DelegatedSigners:
    """One OCSP-signing certificate per CA generation (RFC 6960 §4.2.2.2), issued by that CA at first use.

    Its key is P-256 and lives only in this process's memory: a signature costs ~0.02 ms against ~0.2 ms
    with the CA's P-384 key, which is what a nonce (signed per request) costs. The certificate carries
    id-kp-OCSPSigning and id-pkix-ocsp-nocheck and is embedded in every answer, so clients (nginx
    `ssl_ocsp`, `openssl ocsp`) verify it against the CA they already trust. It lives two days and is
    replaced while it still outlives every answer it signed by more than `validity`.
    """

    def __init__(self, validity: datetime.timedelta = OCSP_VALIDITY,
                 lifetime: datetime.timedelta = RESPONDER_LIFETIME,
                 run_blocking: Callable[..., Deferred] | None = None) -> None:
        self.validity = validity
        self.lifetime = max(lifetime, 3 * validity)
        self._signers: dict[int, tuple[x509.Certificate, ec.EllipticCurvePrivateKey]] = {}
        self.run_blocking = run_blocking   # where a CA key in a token signs the responder certificate
        self._pending: set[int] = set()
        self._failure: str | None = None

    def for_ca(self, ca: Any, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
        """The (certificate, key) that signs answers about `ca`'s certificates at `now`; None: none yet (a CA key
        in a token signs a new one off the reactor, and the one held meanwhile answers while it outlives the
        answer it signs, also while the token is gone)."""
        signer = self._signers.get(ca.generation)
        if signer is None or (signer[0].not_valid_after_utc - now < self.validity + datetime.timedelta(hours=1)
                              and signer[0].not_valid_after_utc < ca.cert.not_valid_after_utc):
            # (one already lasting as long as its CA is kept: a new one could not last longer)
            if ca.signer.in_memory or self.run_blocking is None:
                signer = self._signers[ca.generation] = self._issue(ca, now)
            else:
                self._issue_off_the_reactor(ca, now)
                if signer is None or signer[0].not_valid_after_utc - now < self.validity:
                    return None
        return signer

    def _issue_off_the_reactor(self, ca: Any, now: datetime.datetime) -> None:
        if ca.generation in self._pending or self.run_blocking is None:
            return
        self._pending.add(ca.generation)

        def issued(signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
            self._signers[ca.generation] = signer
            self._failure = None

        def failed(failure: Any) -> None:
            message = str(failure.value)
            if message != self._failure:   # once per cause, not once per OCSP request
                log.error("the OCSP responder certificate of CA generation {generation} could not be issued "
                          "({error}); answers come from the current one until it expires, then tryLater",
                          generation=ca.generation, error=message)
            self._failure = message
        d = self.run_blocking(self._issue, ca, now)
        d.addCallbacks(issued, failed)
        d.addBoth(lambda _: self._pending.discard(ca.generation))

    def forget(self) -> None:
        """Drop every signer (a rotation): the next answer about each generation gets a new one."""
        self._signers.clear()

    def _issue(self, ca: Any, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        ca_key_id = x509.SubjectKeyIdentifier.from_public_key(ca.cert.public_key())
        builder = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                            f"Uptrakit OCSP Responder G{ca.generation}")]))
                .issuer_name(ca.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(min(now + self.lifetime, ca.cert.not_valid_after_utc))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
                .add_extension(x509.OCSPNoCheck(), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id),
                               critical=False))
        cert = ca.signer.certificate(builder)
        log.info("OCSP responder certificate {serial} issued by CA generation {generation}, valid until {until}",
                 serial=format_serial(cert.serial_number), generation=ca.generation, until=cert.not_valid_after_utc.isoformat())
        return cert, key


class OcspResponder:
    """Answers OCSP requests from the in-memory records; keeps signed nonce-less responses."""

    def __init__(self, state: CaState, clock: IReactorTime, counter: Counter | None = None,
                 validity: datetime.timedelta = OCSP_VALIDITY, signer: str = "ca", log_answers: bool = True,
                 nonce_rate: int = 0, signing_share: float = 0.0,
                 stale: Callable[[], bool] = lambda: False,
                 run_blocking: Callable[..., Deferred] | None = None) -> None:
        self.state = state
        # several controllers: True while this one cannot confirm it has applied the others' changes (a
        # certificate revoked elsewhere would still look good): every answer is tryLater meanwhile
        self.stale = stale
        # answers signed per request (nonce; serial never issued), per client address and all together
        self.limit = SigningRateLimit(nonce_rate, clock.seconds)
        self.budget = SigningBudget(signing_share, clock.seconds, time.thread_time)
        # a line per answer only when it would be written (--log-level debug): Twisted builds and routes an
        # event even for a level the daemon's observer drops, ~5 % of a signed answer's CPU
        self.log_answers = log_answers
        self.clock = clock
        self.validity = validity
        # "ca": signed by the issuing CA (SPEC §4.4); "delegated": by a responder certificate it issued
        self.delegated = DelegatedSigners(validity, run_blocking=run_blocking) if signer == "delegated" else None
        self._counter = CounterChildren(counter)  # labelled by status
        self._cache: dict[tuple[int, int, str | None], tuple[bytes, datetime.datetime, datetime.datetime]] = {}
        self.version = 0   # changes whenever cached answers may have become wrong (revocation, rotation)
        self.nonces = NonceTemplates(_produced_at)   # nonce answers: cryptography's first one, re-dated and re-signed

    def on_revoked(self, event: Any) -> None:
        """CertificateRevoked: the cached answer for that serial is wrong now."""
        self.invalidate(event.serial)

    def on_ca_rotated(self, event: Any) -> None:
        """CaRotated: forget every cached answer (and delegated signer, and nonce template)."""
        self.invalidate()
        self.nonces = NonceTemplates(_produced_at)
        if self.delegated is not None:
            self.delegated.forget()
            self.prepare()

    def prepare(self) -> None:
        """Delegated: have a responder certificate for every served CA before the first request asks (a CA
        key in a token signs them off the reactor)."""
        if self.delegated is not None:
            for ca in self.state.served(self._now()):
                if ca.signer is not None:
                    self.delegated.for_ca(ca, self._now())

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

    def answer(self, der: bytes, client: str | None = None) -> OcspAnswer:
        """Answer one DER request from `client` (an address; None: not limited); never raises for any input."""
        try:
            result = self._try_later(None) if self.stale() else self._answer(der, client)
        except Exception:  # the responder must answer garbage with malformedRequest, never a 500
            log.failure("OCSP request could not be answered")
            result = self._unsuccessful(ocsp.OCSPResponseStatus.INTERNAL_ERROR, "malformed")
        # one line per answer was a third of a cached answer's cost: counted in uptrakit_ocsp_responses,
        # logged at debug
        if self.log_answers:
            log.debug("OCSP: {status} for serial {serial}", status=result.status,
                      serial=format_serial(result.serial) if result.serial is not None else "-")
        self.count(result.status)
        return result

    def count(self, status: str) -> None:
        """One answer given (also by the HTTP fast path for repeated GETs)."""
        self._counter.inc(status)

    def _unsuccessful(self, status: ocsp.OCSPResponseStatus, label: str) -> OcspAnswer:
        der = ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(Encoding.DER)
        return OcspAnswer(der, {"Cache-Control": "no-store"}, label)

    def _answer(self, der: bytes, client: str | None) -> OcspAnswer:
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
            log.info("OCSP request for serial {serial} of an issuer that is not ours: unauthorized",
                     serial=format_serial(serial))
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
        if (nonce is not None or label == "unknown") and not (self.limit.allow(client) and self.budget.allow()):
            return self._try_later(serial)
        started = self.budget.cpu()
        validity = UNKNOWN_VALIDITY if label == "unknown" else self.validity
        next_update = now + validity
        sign: Callable[[ocsp.OCSPResponseBuilder], ocsp.OCSPResponse]
        sign_data: Callable[[bytes], bytes] | None
        if ca.signer is None:   # (an old external CA whose key was not given is not served at all)
            return self._try_later(serial)
        if self.delegated is None:
            signer, sign, sign_data, embedded = ca.cert, ca.signer.ocsp, ca.signer.sign, []
            if not ca.signer.signs_data():
                sign_data = None
        else:
            delegated = self.delegated.for_ca(ca, now)
            if delegated is None:
                return self._try_later(serial)
            signer, key = delegated
            sign, sign_data, embedded = _delegated_sign(key), _delegated_sign_data(key), [signer]

        def build(nonce: bytes | None, this_update: datetime.datetime, next_update: datetime.datetime) -> bytes:
            builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
                issuer_name_hash=name_hash, issuer_key_hash=key_hash, serial_number=serial, algorithm=algorithm,
                cert_status=status, this_update=this_update, next_update=next_update,
                revocation_time=kwargs.get("revocation_time"), revocation_reason=kwargs.get("revocation_reason"),
            ).responder_id(ocsp.OCSPResponderEncoding.HASH, signer)
            if embedded:
                builder = builder.certificates(embedded)
            if nonce is not None:
                builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
            return sign(builder).public_bytes(Encoding.DER)
        if nonce is None:
            resp_der = build(None, now, next_update)
        else:
            # everything in the answer but its times and nonce names the template
            template = (ca.generation, signer.serial_number, serial, alg_name, name_hash, key_hash, label,
                        kwargs.get("revocation_time"), kwargs.get("revocation_reason"), validity)
            resp_der = self.nonces.answer(template, build, sign_data, nonce, now, next_update)
        self.budget.spent(self.budget.cpu() - started)
        if nonce is None and label != "unknown":
            self._cache[cache_key] = (resp_der, now, next_update)
        return self._with_headers(resp_der, now, next_update, nonce, serial, label)

    @staticmethod
    def _try_later(serial: int | None) -> OcspAnswer:
        """OCSP tryLater: unsigned, never kept, `Retry-After: 1`."""
        return OcspAnswer(_TRY_LATER, {"Cache-Control": "no-store", "Retry-After": "1"}, "try_later", serial)

    def _status_of(self, serial: int, ca: Any) -> str:
        record = self.state.records.get(serial)
        if record is None or record.ca_generation != ca.generation:
            return "unknown"
        return "revoked" if record.revoked_at is not None else "good"

    def _with_headers(self, der: bytes, this_update: datetime.datetime, next_update: datetime.datetime,
                      nonce: bytes | None, serial: int, label: str) -> OcspAnswer:
        if nonce is not None or label == "unknown":
            # a nonce answer is for its asker alone; "unknown" is not kept (UNKNOWN_VALIDITY)
            return OcspAnswer(der, {"Cache-Control": "no-store"}, label, serial)
        max_age = max(0, int((next_update - self._now()).total_seconds()))
        return OcspAnswer(der, {
            "Cache-Control": f"max-age={max_age}, public, no-transform, must-revalidate",
            "Last-Modified": _http_date(this_update),
            "Expires": _http_date(next_update),
            "ETag": '"' + hashlib.sha256(der).hexdigest()[:32] + '"',
        }, label, serial, (this_update + (next_update - this_update) / 2).timestamp(), next_update.timestamp())
