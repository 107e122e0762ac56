"""Issuing certificates: the server certificate and service certificates from CSRs (SPEC §2, §4.2)."""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import BadRequest
from .ca import CaGeneration, pki_urls, url_extensions
from .signer import SignerUnavailable, signer_from_spec

SERVER_LIFETIME = datetime.timedelta(days=90)
SERVER_RENEW_WHEN_LEFT = datetime.timedelta(days=30)
MAX_CLIENT_LIFETIME = datetime.timedelta(days=730)
BACKDATE = datetime.timedelta(minutes=5)
ORGANIZATION = {"agent": "Uptrakit Agent", "mqtt": "Uptrakit MQTT"}


class CsrRejected(BadRequest, ValueError):
    """A CSR that cannot be signed; the message tells the service why."""

    code = "invalid_csr"


@dataclass(frozen=True)
class Issued:
    """A freshly signed certificate and what the records need to know about it."""

    cert: x509.Certificate
    serial: int
    ca_generation: int

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(digital_signature: bool = True) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False)


def _base_builder(ca: CaGeneration, subject: x509.Name, public_key: Any, not_before: datetime.datetime,
                  not_after: datetime.datetime, pki_addr: str | None) -> x509.CertificateBuilder:
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value \
        if _has(ca.cert, x509.SubjectKeyIdentifier) else x509.SubjectKeyIdentifier.from_public_key(ca.cert.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca.not_after))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    for ext in url_extensions(pki_urls(pki_addr, ca.generation)):
        builder = builder.add_extension(ext, critical=False)
    return builder


def _has(cert: x509.Certificate, ext: type) -> bool:
    try:
        cert.extensions.get_extension_for_class(ext)
        return True
    except x509.ExtensionNotFound:
        return False


def _sign(builder: x509.CertificateBuilder, ca: CaGeneration) -> x509.Certificate:
    if ca.signer is None:
        raise SignerUnavailable(f"CA generation {ca.generation}'s key is not available here")
    return ca.signer.certificate(builder)


def server_names(hostname: str, extra: Iterable[str]) -> list[x509.GeneralName]:
    """SANs of the server certificate: host name, localhost, 127.0.0.1, ::1, then --san entries."""
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for value in [hostname, "localhost", "127.0.0.1", "::1", *extra]:
        if not value or value.lower() in seen:
            continue
        seen.add(value.lower())
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(value)))
        except ValueError:
            names.append(x509.DNSName(value.lower()))
    return names


def issue_server_certificate(ca: CaGeneration, hostname: str, extra_sans: Iterable[str],
                             pki_addr: str | None, now: datetime.datetime) -> tuple[Issued, Any]:
    """A new P-256 server certificate and key, `CN=Uptrakit Controller`, 90 days."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Uptrakit Controller")])
    builder = (
        _base_builder(ca, subject, key.public_key(), now - BACKDATE, now + SERVER_LIFETIME, pki_addr)
        .add_extension(x509.SubjectAlternativeName(server_names(hostname, extra_sans)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_key_usage(), critical=True)
    )
    cert = _sign(builder, ca)
    return Issued(cert, cert.serial_number, ca.generation), key


def server_cert_due(cert: x509.Certificate, now: datetime.datetime) -> bool:
    """True when the server certificate has 30 days or less left."""
    return cert.not_valid_after_utc - now <= SERVER_RENEW_WHEN_LEFT


def spiffe_id(trust_domain: str, service_id: str) -> str:
    """The SPIFFE URI of a service."""
    return f"spiffe://{trust_domain}/service/{service_id}"


def load_csr(csr_pem: str | bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check its self-signature and key type (SPEC §4.2)."""
    if isinstance(csr_pem, str):
        csr_pem = csr_pem.encode("utf-8", "replace")
    if len(csr_pem) > 16384:
        raise CsrRejected("CSR is too large")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, TypeError):
        raise CsrRejected("not a PEM certificate signing request") from None
    try:
        if not csr.is_signature_valid:
            raise CsrRejected("CSR signature does not verify")
        key = csr.public_key()
    except (ValueError, TypeError, x509.UnsupportedGeneralNameType):
        raise CsrRejected("CSR cannot be read") from None
    except Exception as e:  # unsupported algorithms raise UnsupportedAlgorithm
        raise CsrRejected(f"CSR key or signature algorithm not supported ({type(e).__name__})") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, (ec.SECP256R1, ec.SECP384R1)):
            raise CsrRejected(f"EC key on curve {key.curve.name} not allowed (P-256 or P-384)")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise CsrRejected(f"RSA key of {key.key_size} bits is too small (at least 2048)")
    else:
        raise CsrRejected("key type not allowed (EC P-256/P-384 or RSA >= 2048)")
    return csr


def check_csr_identity(csr: x509.CertificateSigningRequest, service_id: str, trust_domain: str) -> None:
    """CSR CN must equal the service id; a SPIFFE URI, if present, must be this service's."""
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or str(cns[0].value).lower() != service_id.lower():
        raise CsrRejected("CSR common name must be the service id")
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    except ValueError:
        raise CsrRejected("CSR extensions cannot be read") from None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://") and uri != spiffe_id(trust_domain, service_id):
            raise CsrRejected("CSR SPIFFE URI does not match the service")


def issue_client_certificate(ca: CaGeneration, csr: x509.CertificateSigningRequest, service_id: str,
                             kind: str, trust_domain: str, lifetime: datetime.timedelta,
                             pki_addr: str | None, now: datetime.datetime) -> Issued:
    """Sign a checked CSR for a service: CN=<uuid>, SPIFFE URI SAN, clientAuth, capped lifetime."""
    uuid.UUID(service_id)
    check_csr_identity(csr, service_id, trust_domain)
    lifetime = min(lifetime, MAX_CLIENT_LIFETIME)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service_id),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION[kind])])
    builder = (
        _base_builder(ca, subject, csr.public_key(), now - BACKDATE, now + lifetime, pki_addr)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(spiffe_id(trust_domain, service_id))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(_key_usage(), critical=True)
    )
    cert = _sign(builder, ca)
    return Issued(cert, cert.serial_number, ca.generation)


def renewal_window(lifetime: datetime.timedelta, override_hours: int | None = None) -> datetime.timedelta:
    """min(14 days, lifetime/5) unless the setting overrides it (SPEC §4.2)."""
    if override_hours:
        return datetime.timedelta(hours=override_hours)
    return min(datetime.timedelta(days=14), lifetime / 5)


_WORKER_CAS: dict[bytes, CaGeneration] = {}


def issue_in_worker(ca_cert_der: bytes, signer_spec: tuple[Any, ...], generation: int, external: bool,
                    csr_pem: str | bytes,
                    service_id: str, kind: str, trust_domain: str, lifetime_seconds: float, pki_addr: str | None,
                    now_ts: float) -> bytes:
    """load_csr + issue_client_certificate in the PKI worker process (off the reactor); the certificate's DER.

    The CA is parsed once per worker and generation. A CsrRejected raised here reaches the caller as is.
    """
    digest = hashlib.sha256(ca_cert_der).digest()
    ca = _WORKER_CAS.get(digest)
    if ca is None:
        if len(_WORKER_CAS) >= 4:
            _WORKER_CAS.clear()
        ca = CaGeneration(generation, x509.load_der_x509_certificate(ca_cert_der), signer_from_spec(signer_spec),
                          external)
        _WORKER_CAS[digest] = ca
    issued = issue_client_certificate(ca, load_csr(csr_pem), service_id, kind, trust_domain,
                                      datetime.timedelta(seconds=lifetime_seconds), pki_addr,
                                      datetime.datetime.fromtimestamp(now_ts, datetime.timezone.utc))
    return issued.cert.public_bytes(serialization.Encoding.DER)
