"""CA generations: creation (P-384, distinct CN per generation), loading, and their URLs."""
from __future__ import annotations

import datetime
import functools
import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from .signer import KeySigner, Signer

CA_LIFETIME = datetime.timedelta(days=5 * 365)
AUTO_ROTATE_WHEN_LEFT = datetime.timedelta(days=183)


class CaError(Exception):
    """A CA certificate or key is unusable."""


def spki_sha256(public_key: Any) -> str:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def pki_urls(pki_addr: str | None, generation: int) -> dict[str, str] | None:
    """The AIA/CDP URLs embedded in certificates of this generation, or None without pki_addr."""
    if not pki_addr:
        return None
    return {
        "ocsp": f"{pki_addr}/api/v1/pki/ocsp",
        # RFC 5280 4.2.2.1: the issuer as one DER certificate (application/pkix-cert). CAs made before
        # this embed /api/v1/pki/ca.crt (the PEM bundle), which is still served.
        "ca_issuers": f"{pki_addr}/api/v1/pki/ca/{generation}.crt",
        "crl": f"{pki_addr}/api/v1/pki/crl/{generation}.crl",
    }


def same_pki_addr(cert: x509.Certificate, pki_addr: str | None) -> bool:
    """True when `cert` embeds URLs under `pki_addr` (compared by its OCSP URL; none without pki_addr)."""
    have = embedded_urls(cert)
    wanted = pki_urls(pki_addr, 0)
    if have is None or wanted is None:
        return have is None and wanted is None
    return have.get("ocsp") == wanted["ocsp"]


def url_extensions(urls: dict[str, str] | None) -> list[x509.ExtensionType]:
    """AIA (OCSP + caIssuers) and CDP extensions for the given URLs."""
    if not urls:
        return []
    return [
        x509.AuthorityInformationAccess([
            x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                                   x509.UniformResourceIdentifier(urls["ocsp"])),
            x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS,
                                   x509.UniformResourceIdentifier(urls["ca_issuers"])),
        ]),
        x509.CRLDistributionPoints([
            x509.DistributionPoint(full_name=[x509.UniformResourceIdentifier(urls["crl"])],
                                   relative_name=None, reasons=None, crl_issuer=None),
        ]),
    ]


def embedded_urls(cert: x509.Certificate) -> dict[str, str] | None:
    """The AIA/CDP URLs a certificate carries (None when it carries none)."""
    found: dict[str, str] = {}
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        for desc in aia:
            if desc.access_method == AuthorityInformationAccessOID.OCSP:
                found["ocsp"] = desc.access_location.value
            elif desc.access_method == AuthorityInformationAccessOID.CA_ISSUERS:
                found["ca_issuers"] = desc.access_location.value
    except x509.ExtensionNotFound:
        pass
    try:
        cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        for point in cdp:
            for name in point.full_name or []:
                found["crl"] = name.value
    except x509.ExtensionNotFound:
        pass
    return found or None


@dataclass(frozen=True)
class CaGeneration:
    """One CA: its certificate and the signer of its key (None: an old external CA whose key is not given)."""

    generation: int
    cert: x509.Certificate
    signer: Signer | None
    external: bool = False

    @property
    def custody(self) -> str:
        """Where its private key is kept: "file" (clear, 0600), "sealed", "pkcs11" or "external"."""
        return "external" if self.external else self.signer.custody if self.signer else "none"

    @property
    def common_name(self) -> str:
        attrs = self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else self.cert.subject.rfc4514_string()

    @property
    def not_after(self) -> datetime.datetime:
        return self.cert.not_valid_after_utc

    @property
    def fingerprint(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex()

    @functools.cached_property
    def pem(self) -> bytes:
        # read for the bundle at every connect and renewal (its hash goes into service_settings)
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def signing_hash(self) -> hashes.HashAlgorithm | None:
        """Hash used for OCSP/CRL signatures by this CA's key type."""
        return self.signer.hash_algorithm() if self.signer else None

    def expired(self, now: datetime.datetime) -> bool:
        return now > self.not_after


def create_ca(generation: int, pki_addr: str | None, now: datetime.datetime, signer: Signer) -> x509.Certificate:
    """The self-signed CA certificate of this generation for a new key (P-384, SPEC §4.1)."""
    public_key = signer.public_key()
    cn = f"Uptrakit Internal CA G{generation} {spki_sha256(public_key)[:8]}"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Uptrakit")])
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    for ext in url_extensions(pki_urls(pki_addr, generation)):
        builder = builder.add_extension(ext, critical=False)
    return signer.certificate(builder)


def same_public_key(a: Any, b: Any) -> bool:
    """True when two public keys (of a certificate, CSR or private key) are the same key."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(serialization.Encoding.DER, spki) == b.public_bytes(serialization.Encoding.DER, spki)


def key_pem(key: Any) -> bytes:
    """Unencrypted PKCS#8 PEM (the file is 0600 in a 0700 directory)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_external_ca(cert_pem: bytes, key_pem_bytes: bytes) -> tuple[x509.Certificate, KeySigner]:
    """Load and check an operator-supplied CA: a CA certificate whose key matches."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise CaError("--ca-cert is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem_bytes, password=None)
    except (ValueError, TypeError):
        raise CaError("--ca-key is not an unencrypted PEM private key") from None
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CaError("--ca-cert has no basicConstraints CA:true") from None
    if not bc.ca:
        raise CaError("--ca-cert is not a CA certificate (basicConstraints CA:false)")
    if not same_public_key(cert.public_key(), key.public_key()):
        raise CaError("--ca-key does not match --ca-cert")
    return cert, KeySigner(key, "external")
