"""What an agent keeps on disk: its service id and enrollment secret, key+certificate (and the previous ones), CA
bundle.

Key and certificate live in one file written atomically, so a crash never pairs a new key with an
old certificate.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..files import atomic_write, ensure_private_dir


def new_key_and_csr(service_id: str, trust_domain: str | None) -> tuple[bytes, bytes]:
    """(key_pem, csr_pem) for a fresh P-256 key, CN = service id (+ SPIFFE URI when known)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service_id)]))
    if trust_domain:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}/service/{service_id}")]), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


@dataclass
class AgentState:
    """Files under the state dir (0700): service.json and identity.pem 0600, ca.pem 0644."""

    directory: Path

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        ensure_private_dir(self.directory)

    @property
    def service_file(self) -> Path:
        return self.directory / "service.json"

    @property
    def identity_file(self) -> Path:
        return self.directory / "identity.pem"

    @property
    def bundle_file(self) -> Path:
        return self.directory / "ca.pem"

    def service(self) -> dict[str, Any]:
        try:
            return json.loads(self.service_file.read_text())
        except (OSError, ValueError):
            return {}

    def save_service(self, **fields: Any) -> None:
        data = self.service()
        data.update(fields)
        atomic_write(self.service_file, json.dumps(data, indent=2).encode(), mode=0o600)

    def identity_pem(self) -> bytes | None:
        try:
            return self.identity_file.read_bytes()
        except OSError:
            return None

    def certificate(self) -> x509.Certificate | None:
        pem = self.identity_pem()
        if not pem:
            return None
        try:
            return x509.load_pem_x509_certificate(pem[pem.index(b"-----BEGIN CERTIFICATE-----"):])
        except ValueError:
            return None

    @property
    def previous_file(self) -> Path:
        return self.directory / "identity.previous.pem"

    def save_identity(self, key_pem: bytes, cert_pem: bytes) -> None:
        """The new key and certificate; the ones they replace are kept as the previous identity (a controller
        restored from a backup taken before this renewal knows only those)."""
        current = self.identity_pem()
        if current:
            atomic_write(self.previous_file, current, mode=0o600)
        atomic_write(self.identity_file, key_pem + cert_pem, mode=0o600)

    def previous_certificate(self) -> x509.Certificate | None:
        try:
            pem = self.previous_file.read_bytes()
            return x509.load_pem_x509_certificate(pem[pem.index(b"-----BEGIN CERTIFICATE-----"):])
        except (OSError, ValueError):
            return None

    def swap_identities(self) -> None:
        """The previous identity becomes current, and the current one previous (a fall-back, or its undoing)."""
        current, previous = self.identity_file.read_bytes(), self.previous_file.read_bytes()
        atomic_write(self.previous_file, current, mode=0o600)
        atomic_write(self.identity_file, previous, mode=0o600)

    def bundle(self) -> bytes | None:
        try:
            return self.bundle_file.read_bytes()
        except OSError:
            return None

    def bundle_hash(self) -> str | None:
        data = self.bundle()
        return hashlib.sha256(data).hexdigest() if data else None

    def save_bundle(self, pem: bytes) -> None:
        atomic_write(self.bundle_file, pem, mode=0o644)
