"""The PKI's files under `<data-dir>/pki/`, each written atomically (temp file, fsync, rename)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..files import atomic_write
from .ca import key_pem
from .signer import KeySigner


class PkiFiles:
    """Names and writes CA keys, the CA bundle, the CRL bundle and the server certificate."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "pki"
        self.crl_path = self.dir / "ca.crl"
        self.bundle_path = self.dir / "ca.crt"
        self.server_cert_path = self.dir / "server.crt"
        self.server_key_path = self.dir / "server.key"

    @staticmethod
    def ca_key_name(generation: int) -> str:
        """File name (under the pki dir) of a managed CA generation's key."""
        return f"ca-{generation}.key"

    def write_ca_key(self, generation: int, signer: KeySigner) -> str:
        """Write a CA key (0600) before any row names it; returns its file name."""
        name = self.ca_key_name(generation)
        atomic_write(self.dir / name, signer.pem(), mode=0o600)
        return name

    def load_ca_key(self, name: str) -> KeySigner:
        """Load a managed CA key by file name (OSError/ValueError when unreadable)."""
        return KeySigner.from_pem((self.dir / name).read_bytes(), "file")

    def write_bundle(self, pem: bytes) -> None:
        """The trusted CA bundle for co-located proxies and operators."""
        atomic_write(self.bundle_path, pem, mode=0o644)

    def write_crls(self, pem: bytes) -> None:
        """The PEM CRL bundle for co-located proxies."""
        atomic_write(self.crl_path, pem, mode=0o644)

    def write_server(self, cert: x509.Certificate, key: Any) -> None:
        """The HTTPS server key (0600), then its certificate."""
        atomic_write(self.server_key_path, key_pem(key), mode=0o600)
        atomic_write(self.server_cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
