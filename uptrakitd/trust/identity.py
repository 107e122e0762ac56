"""The §3 decision: who is this request? Direct mTLS first, then a trusted proxy's headers, else nobody."""
from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..config import NetworkSettings
from uptrakitd.observability.metrics import CounterChildren, Metrics
from ..pki.state import CaState
from .dn import common_name
from .doctor import IdentityDoctor
from .headers import ForwardedClientCert, MalformedHeader, parse_cert_header, parse_info_header
from .proxies import is_trusted, parse_address, resolve_client_ip
from .verified import Checked, VerifiedCertificates

if TYPE_CHECKING:
    from ..pki.ca import CaGeneration

log = Logger()


@dataclass(frozen=True)
class Identity:
    """A verified service identity."""

    service_id: str
    serial: int
    ca_generation: int


@dataclass(frozen=True)
class RequestContext:
    """What every resource learns about the request's origin (SPEC §3)."""

    peer_ip: str
    client_ip: str
    proxy_ip: str | None = None
    identity: Identity | None = None
    identity_source: str = "none"  # mtls | proxy-cert | proxy-info | none
    rejected: str | None = None
    # why there is no identity, for code (rejected is for people): None (no evidence), "ignored"
    # (identity headers from an untrusted peer), "revoked", "deactivated", "unknown" (a certificate or
    # service this controller has no record of: with several controllers, maybe not applied yet),
    # "invalid" (anything else)
    rejected_code: str | None = None
    unknown: tuple[int | None, str | None] | None = None   # with "unknown": (serial, service id) it named

    @property
    def via_trusted_proxy(self) -> bool:
        return self.proxy_ip is not None


def peer_ip_of(request: Any) -> str:
    """The TCP peer address of a twisted.web request (as the PROXY protocol reports it, if used)."""
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return (parse_address(host) if host else None) or "0.0.0.0"


# -- header removal (SPEC §3.3) -----------------------------------------------------------------

_IDENTITY_EXACT = {
    "x-forwarded-client-cert": "xfcc",
    "x-forwarded-client-cert-info": "client-cert-info",
    "x-forwarded-tls-client-cert": "traefik",
    "x-forwarded-tls-client-cert-info": "traefik",
    "client-cert": "rfc9440",
    "client-cert-chain": "rfc9440",
    "x-forwarded-proto": "forwarded-proto-host",
    "x-forwarded-host": "forwarded-proto-host",
    "origin": "origin",
}
_IDENTITY_PREFIXES = (("x-ssl-client-", "x-ssl-client"), ("x-client-cert", "x-client-cert"),
                      ("ssl-client-", "ssl-client"),            # also ingress-nginx's ssl-client-cert, -verify, -*-dn
                      ("x-amzn-mtls-", "aws-alb"),              # AWS ALB mTLS verify and passthrough modes
                      ("cf-client-cert", "cloudflare"))         # Cloudflare's forwarded client certificate
_REAL_IP = {"x-forwarded-for", "forwarded", "x-real-ip", "true-client-ip", "cf-connecting-ip"}


def normalize_header_name(name: str | bytes) -> str:
    """Lower case with `_` folded to `-`, so `X_SSL_Client_Cert` matches `x-ssl-client-cert`."""
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    return name.strip().lower().replace("_", "-")


def header_family(name: str, configured: Iterable[str | None], real_ip_header: str,
                  include_real_ip: bool) -> str | None:
    """The §3.3 family a header belongs to, or None when it may pass."""
    n = normalize_header_name(name)
    if n in {normalize_header_name(c) for c in configured if c}:
        return "configured"
    if n in _IDENTITY_EXACT:
        return _IDENTITY_EXACT[n]
    for prefix, family in _IDENTITY_PREFIXES:
        if n.startswith(prefix):
            return family
    if include_real_ip and (n in _REAL_IP or n == normalize_header_name(real_ip_header)):
        return "real-ip"
    return None


def remove_headers(headers: Any, configured: Iterable[str | None], real_ip_header: str,
                   include_real_ip: bool) -> list[str]:
    """Remove every §3.3 header from a twisted Headers object; returns the families removed (one each)."""
    configured = list(configured)
    removed = []
    for raw_name, values in list(headers.getAllRawHeaders()):
        family = header_family(raw_name.decode("latin-1"), configured, real_ip_header, include_real_ip)
        if family is not None:
            headers.removeHeader(raw_name)
            removed.extend([family] * max(1, len(values)))
    return removed


# -- verification (SPEC §3.4) ---------------------------------------------------------------------

class ServiceLookup(Protocol):
    """The services directory as identity checks see it: a record (with `status`) by id, or None."""

    def get(self, service_id: str) -> Any: ...


CLUSTER_STALE = ("this controller cannot confirm the other controllers' latest changes (the database may be "
                 "unreachable): try another controller")


class Rejected(Exception):
    """Evidence that does not establish an identity; the message is the short reason whoami shows."""

    def __init__(self, reason: str, code: str = "invalid", serial: int | None = None,
                 service_id: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.unknown = (serial, service_id) if code == "unknown" else None


def _uuid(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return str(uuid.UUID(text)) if len(text) == 36 else None
    except ValueError:
        return None


def _service_id_of(cert: x509.Certificate, trust_domain: str) -> str | None:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        prefix = f"spiffe://{trust_domain}/service/"
        for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(prefix):
                return _uuid(uri[len(prefix):])
    except (x509.ExtensionNotFound, ValueError):
        pass
    try:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    return _uuid(str(cns[0].value)) if len(cns) == 1 else None


def signed_by_trusted(cert: x509.Certificate, ca_state: CaState, now: datetime.datetime,
                      check_chain: bool = True) -> CaGeneration | None:
    """The trusted CA generation that signed `cert` (the signature checked unless told not to), or None."""
    for candidate in ca_state.trusted(now):
        if candidate.cert.subject == cert.issuer:
            if check_chain:
                try:
                    cert.verify_directly_issued_by(candidate.cert)
                except (ValueError, TypeError, InvalidSignature):
                    continue
            return candidate
    return None


def verify_certificate(cert: x509.Certificate, ca_state: CaState, services: ServiceLookup,
                       trust_domain: str, now: datetime.datetime, check_chain: bool = True,
                       issuer: CaGeneration | None = None) -> Identity:
    """Identity from a certificate: issued by a trusted CA, valid now, clientAuth, in our records, not revoked.

    `issuer`: the generation whose signature was already checked (the verified-certificate cache).
    """
    ca = issuer or signed_by_trusted(cert, ca_state, now, check_chain)
    if ca is None:
        raise Rejected("certificate not issued by a trusted CA")
    return check_facts(CertFacts.of(cert, trust_domain), ca, ca_state, services, now)


@dataclass(frozen=True)
class CertFacts:
    """What identity needs from a certificate, read once (extensions are slow to parse per request)."""

    serial: int
    not_before: float
    not_after: float
    client_auth: bool
    service_id: str | None

    @classmethod
    def of(cls, cert: x509.Certificate, trust_domain: str) -> CertFacts:
        try:
            client_auth = ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(
                x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            client_auth = False
        return cls(cert.serial_number, cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp(),
                   client_auth, _service_id_of(cert, trust_domain))


def check_facts(facts: CertFacts, ca: CaGeneration, ca_state: CaState, services: ServiceLookup,
                now: datetime.datetime) -> Identity:
    """The live checks: valid now, clientAuth, issued by us to that service, not revoked, service active."""
    if not facts.not_before <= now.timestamp() <= facts.not_after:
        raise Rejected("certificate expired or not yet valid")
    if not facts.client_auth:
        raise Rejected("certificate lacks the clientAuth usage")
    record = ca_state.records.get(facts.serial)
    if record is None:
        raise Rejected("certificate not recognized", "unknown", facts.serial, facts.service_id)
    if record.purpose != "client" or record.ca_generation != ca.generation:
        raise Rejected("certificate not recognized")
    if record.revoked_at is not None:
        raise Rejected("certificate revoked", "revoked")
    service_id = facts.service_id
    if service_id is None or service_id != record.service_id:
        raise Rejected("certificate does not match our records")
    if services.get(service_id) is None:
        raise Rejected("certificate does not match our records", "unknown", facts.serial, service_id)
    _require_active(services, service_id)
    return Identity(service_id, record.serial, ca.generation)


def _require_active(services: ServiceLookup, service_id: str) -> None:
    # defence in depth: deactivation revokes every certificate, but identity never rests on that alone
    status = getattr(services.get(service_id), "status", None)
    if status == "deactivated":
        raise Rejected("service deactivated", "deactivated")
    if status != "approved":
        raise Rejected(f"service is {status}, not approved")


def verify_info(info: ForwardedClientCert, ca_state: CaState, services: ServiceLookup,
                now: datetime.datetime) -> Identity:
    """Identity from Subject/Issuer/SerialNumber alone, checked against the trusted CAs and our records."""
    missing = [name for name, value in (("Subject", info.subject), ("Issuer", info.issuer),
                                        ("SerialNumber", info.serial)) if value is None]
    if missing or info.subject is None or info.issuer is None or info.serial is None:
        raise Rejected(f"info header lacks {', '.join(missing)}")
    issuer_cn = common_name(info.issuer)
    ca = ca_state.ca_for_issuer_cn(issuer_cn, now) if issuer_cn else None
    if ca is None:
        raise Rejected("issuer CN does not match a trusted CA")
    service_id = _uuid(common_name(info.subject))
    if service_id is None:
        raise Rejected("subject CN is not a known service")
    if services.get(service_id) is None:
        raise Rejected("subject CN is not a known service", "unknown", info.serial, service_id)
    record = ca_state.records.get(info.serial)
    if record is None:
        raise Rejected("serial not issued to this service by this CA", "unknown", info.serial, service_id)
    if record.purpose != "client" or record.service_id != service_id \
            or record.ca_generation != ca.generation:
        raise Rejected("serial not issued to this service by this CA")
    if record.revoked_at is not None:
        raise Rejected("certificate revoked", "revoked")
    if not record.not_before <= now.timestamp() <= record.not_after:
        raise Rejected("certificate expired or not yet valid")
    _require_active(services, service_id)
    return Identity(service_id, record.serial, ca.generation)


# -- the decision (SPEC §3.1) ---------------------------------------------------------------------

class IdentityResolver:
    """Runs before any resource: strips what cannot be trusted, then decides who the request is."""

    def __init__(self, current_network: Callable[[], NetworkSettings], ca_state: CaState,
                 services: ServiceLookup, trust_domain: str, clock: IReactorTime, metrics: Metrics | None = None,
                 forwarded_headers: bool = True, stale: Callable[[], bool] = lambda: False) -> None:
        self.current_network = current_network   # the network settings in force now (they change at runtime)
        # several controllers: while this one cannot confirm the others' changes, no new identity is decided
        self.stale = stale
        self.ca_state = ca_state
        self.services = services
        self.trust_domain = trust_domain
        self.clock = clock
        self.metrics = metrics
        self._decisions = CounterChildren(metrics.identity_decisions if metrics is not None else None)
        # False on a PROXY-protocol listener: the peer address comes from a header, so no peer is a
        # trusted proxy and only mTLS establishes an identity
        self.forwarded_headers = forwarded_headers
        self.verified = VerifiedCertificates()
        self.doctor = IdentityDoctor(clock.seconds)

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc)

    def __call__(self, request: Any, identity: bool = True) -> RequestContext:
        """The request's context; `identity` False: the route never reads the identity, so a trusted proxy's
        certificate evidence is not checked (except in the doctor's sampled request, one a second per proxy).
        Stripping and the client IP are the same either way."""
        net = self.current_network()
        peer = peer_ip_of(request)
        trusted = self.forwarded_headers and is_trusted(peer, net.trusted_proxies)
        headers = request.requestHeaders
        configured = [net.forwarded_client_cert_info_header, net.forwarded_client_cert_pem_header,
                      net.forwarded_client_verify_header]
        peer_cert = _peer_certificate(request)
        client_ip, proxy_ip = peer, None
        if trusted:
            proxy_ip = peer
            client_ip = resolve_client_ip(peer, net.real_ip_header,
                                          [v.decode("latin-1") for v in
                                           headers.getRawHeaders(net.real_ip_header.encode(), [])],
                                          net.trusted_proxies)
        if peer_cert is not None:
            self._count_removed(remove_headers(headers, configured, net.real_ip_header, include_real_ip=not trusted))
            return self._decide(peer, client_ip, proxy_ip, "mtls", lambda: verify_certificate(
                peer_cert, self.ca_state, self.services, self.trust_domain, self.now(), check_chain=False))
        if not trusted:
            removed = remove_headers(headers, configured, net.real_ip_header, include_real_ip=True)
            self._count_removed(removed)
            identity_headers = [f for f in removed if f not in ("real-ip", "origin", "forwarded-proto-host")]
            reason = f"client certificate headers ignored: {peer} is not a trusted proxy" if identity_headers else None
            self._count("none", "ignored" if reason else "absent", "ignored" if reason else "")
            if reason:
                self.doctor.record(peer, False, "ignored", removed if self.doctor.wants_sample(peer) else None)
            return RequestContext(peer, peer, rejected=reason, rejected_code="ignored" if reason else None)
        sample = self.doctor.wants_sample(peer)
        if not identity and not sample:
            self._count("none", "unchecked")
            self.doctor.record(peer, True, "unchecked", None)
            return RequestContext(peer, client_ip, peer)
        families = None
        if sample:   # header names only, at most once a second per proxy
            families = [f for name, _ in headers.getAllRawHeaders()
                        if (f := header_family(name.decode("latin-1"), configured, net.real_ip_header, False))]
        ctx = self._from_proxy(request, net, peer, client_ip)
        self.doctor.record(peer, True, "accepted" if ctx.identity else ("rejected" if ctx.rejected else "none"),
                           families, forwarded_for=headers.hasHeader(net.real_ip_header.encode())
                           if families is not None else None, reason=ctx.rejected,
                           source=ctx.identity_source if ctx.identity else None)
        return ctx

    def _from_proxy(self, request: Any, net: NetworkSettings, peer: str, client_ip: str) -> RequestContext:
        headers = request.requestHeaders
        if net.forwarded_client_verify_header:
            verdict = headers.getRawHeaders(net.forwarded_client_verify_header.encode(), [])
            value = verdict[-1].strip() if verdict else b""
            if value != b"SUCCESS":
                # nginx says NONE when no certificate was presented: no identity, but nothing was rejected
                no_cert = value in (b"", b"NONE")
                self._count("none", "absent" if no_cert else "rejected", "" if no_cert else "invalid")
                if no_cert:
                    return RequestContext(peer, client_ip, peer)
                return RequestContext(peer, client_ip, peer, rejected="proxy reports client certificate "
                                      "verification did not succeed", rejected_code="invalid")
        reasons: list[str] = []
        codes: set[str] = set()
        unknown: tuple[int | None, str | None] | None = None
        attempts = [("info header", "proxy-info", net.forwarded_client_cert_info_header, self._info_evidence),
                    ("certificate header", "proxy-cert", net.forwarded_client_cert_pem_header, self._cert_evidence)]
        for label, label_source, name, evidence in attempts:
            if not name:
                continue
            try:
                value = _single(headers, name)
                if value is None:
                    continue
                source, check = evidence(value, net)
                context = self._decide(peer, client_ip, peer, source, check)
                if context.identity is not None:
                    return context
                reasons.append(context.rejected or "rejected")
                codes.add(context.rejected_code or "invalid")
                unknown = unknown or context.unknown
            except (MalformedHeader, Rejected) as e:
                codes.add(getattr(e, "code", "invalid"))
                log.info("{label} from {peer} unusable: {reason}", label=label, peer=peer, reason=str(e))
                reasons.append(f"{label} unusable: {e}")
                self._count(label_source, "rejected", getattr(e, "code", "invalid"))
        if not reasons:
            self._count("none", "absent")
        code = next((c for c in ("cluster_stale", "revoked", "deactivated", "unknown") if c in codes),
                    "invalid") if reasons else None
        return RequestContext(peer, client_ip, peer, rejected="; ".join(r for r in reasons if r) or None,
                              rejected_code=code, unknown=unknown if code == "unknown" else None)

    def _info_evidence(self, value: str, net: NetworkSettings) -> tuple[str, Callable[[], Identity]]:
        info = parse_info_header(value, net.forwarded_client_cert_info_format)
        if info.cert_der is not None:  # XFCC Cert= wins over Subject=
            return self._cert_evidence_der(info.cert_der)
        return "proxy-info", lambda: verify_info(info, self.ca_state, self.services, self.now())

    def _cert_evidence(self, value: str, net: NetworkSettings) -> tuple[str, Callable[[], Identity]]:
        return self._checked_evidence(value, lambda: _load_der(parse_cert_header(value)))

    def _cert_evidence_der(self, der: bytes) -> tuple[str, Callable[[], Identity]]:
        return self._checked_evidence(der, lambda: _load_der(der))

    def _checked_evidence(self, key: str | bytes, load: Callable[[], x509.Certificate]) -> tuple[
            str, Callable[[], Identity]]:
        now = self.now()

        def check() -> Checked:
            try:
                cert = load()
            except MalformedHeader as e:
                return Checked(None, None, e)
            ca = signed_by_trusted(cert, self.ca_state, now)
            return Checked(CertFacts.of(cert, self.trust_domain), ca.generation if ca else None)
        checked = self.verified.get(key, check)
        if checked.error is not None:
            raise checked.error
        facts = checked.cert
        assert facts is not None
        # the cached signature counts only while its CA is still trusted
        issuer = next((c for c in self.ca_state.trusted(now) if c.generation == checked.issuer_generation), None)
        if issuer is None:
            return "proxy-cert", _reject("certificate not issued by a trusted CA")
        return "proxy-cert", lambda: check_facts(facts, issuer, self.ca_state, self.services, now)

    def _decide(self, peer: str, client_ip: str, proxy_ip: str | None, source: str,
                check: Callable[[], Identity]) -> RequestContext:
        if self.stale():   # said once by ClusterFreshness.watch, not per request
            self._count(source, "rejected", "cluster_stale")
            return RequestContext(peer, client_ip, proxy_ip, rejected=CLUSTER_STALE, rejected_code="cluster_stale")
        try:
            identity = check()
        except Rejected as e:
            log.info("identity from {source} rejected for {client}: {reason}", source=source, client=client_ip,
                     reason=str(e))
            self._count(source, "rejected", e.code)
            return RequestContext(peer, client_ip, proxy_ip, rejected=str(e), rejected_code=e.code,
                                  unknown=e.unknown)
        self._count(source, "accepted")
        return RequestContext(peer, client_ip, proxy_ip, identity, source, None)

    def _count(self, source: str, outcome: str, code: str = "") -> None:
        self._decisions.inc(source, outcome, code)

    def _count_removed(self, families: list[str]) -> None:
        if self.metrics is not None:
            for family in families:
                self.metrics.headers_removed.labels(family).inc()


def _reject(reason: str) -> Callable[[], Identity]:
    def check() -> Identity:
        raise Rejected(reason)
    return check


def _single(headers: Any, name: str) -> str | None:
    """The one value of a header; several copies are ambiguous and rejected."""
    values = headers.getRawHeaders(name.encode(), [])
    if not values:
        return None
    if len(values) > 1:
        raise MalformedHeader("header sent more than once")
    value = values[0].decode("latin-1")
    # proxies send an empty value when the client presented no certificate: that is "no evidence"
    return value if value.strip() else None


def _load_der(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise MalformedHeader("not a DER certificate") from None


def _peer_certificate(request: Any) -> x509.Certificate | None:
    transport = getattr(getattr(request, "channel", None), "transport", None)
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        cert = get()
    except Exception:
        return None
    return cert.to_cryptography() if cert is not None else None
