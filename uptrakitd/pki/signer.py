"""Every signature made with a CA key is made here, through a Signer: certificates (service, server, CA,
delegated OCSP responder), CRLs, CA-signed OCSP answers and their nonce templates. Nothing else holds
a CA private key object.

Two kinds: `KeySigner`, the key in this process's memory (a clear file or a sealed row, opened at
start), and `TokenSigner`, a key that never leaves its device (uptrakitd.pki.pkcs11). For the second,
cryptography (which takes only its own key objects) builds and signs each structure with a throwaway
placeholder key, and the token's signature over the very same signed data replaces the placeholder's
(uptrakitd.pki.der.resign). OCSP answers about such a CA are signed by its delegated responder, whose
certificate the token signs.

`spec()` is what the PKI worker process needs to make the same signer on its side (`signer_from_spec`):
the key's PEM for a KeySigner, the module, token, key id and PIN for a token. It only ever crosses the
pipe to that worker.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.x509 import ocsp as x509_ocsp

from ..errors import Unavailable
from .der import resign


class SignerUnavailable(Unavailable):
    """The CA key cannot sign now (its token is gone or refuses): nothing was issued or changed."""

    code = "signer_unavailable"


class Signer:
    """Signs with one CA key. `custody` says where the key is: file, sealed, external, pkcs11."""

    custody = "file"
    in_memory = True     # the key is in this process (CA-signed OCSP answers are cheap)

    def public_key(self) -> Any:
        raise NotImplementedError

    def hash_algorithm(self) -> hashes.HashAlgorithm | None:
        """The hash signatures by this key use: SHA-384 for P-384 and larger, SHA-256 for P-256 and RSA."""
        key = self.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            return hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()
        if isinstance(key, rsa.RSAPublicKey):
            return hashes.SHA256()
        return None   # Ed25519/Ed448 take no separate hash

    def sign(self, data: bytes) -> bytes:
        """The signature over `data` as X.509 carries it (ECDSA: DER SEQUENCE { r, s })."""
        raise NotImplementedError

    def signs_data(self) -> bool:
        """True when `sign` works (ECDSA keys; RSA and EdDSA CAs sign through the builders only)."""
        return True

    def certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        raise NotImplementedError

    def crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList:
        raise NotImplementedError

    def ocsp(self, builder: x509_ocsp.OCSPResponseBuilder) -> x509_ocsp.OCSPResponse:
        raise NotImplementedError

    def spec(self) -> tuple[Any, ...]:
        """What signer_from_spec needs to make this signer in the PKI worker process: (a module-level function
        that makes it, its arguments). Pickling names the function by module, so the worker imports what it
        needs and this module imports no custody of its own (no cycle with pkcs11.py)."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise SignerUnavailable when this key cannot sign now (a token's key: one signature is tried)."""

    def spki_sha256(self) -> str:
        der = self.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(der).hexdigest()


class KeySigner(Signer):
    """A CA key in this process's memory."""

    def __init__(self, key: Any, custody: str = "file") -> None:
        self._key = key
        self.custody = custody
        self._hash = super().hash_algorithm()
        self._ecdsa = ec.ECDSA(self._hash) if isinstance(key, ec.EllipticCurvePrivateKey) and self._hash else None

    @classmethod
    def generate(cls, custody: str = "file") -> KeySigner:
        """A new P-384 CA key (SPEC §4.1)."""
        return cls(ec.generate_private_key(ec.SECP384R1()), custody)

    @classmethod
    def from_pem(cls, pem: bytes, custody: str = "file") -> KeySigner:
        return cls(serialization.load_pem_private_key(pem, password=None), custody)

    def public_key(self) -> Any:
        return self._key.public_key()

    def hash_algorithm(self) -> hashes.HashAlgorithm | None:
        return self._hash

    def pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM: only for the key stores, which write it 0600 or seal it."""
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def signs_data(self) -> bool:
        return self._ecdsa is not None

    def sign(self, data: bytes) -> bytes:
        if self._ecdsa is not None:
            return bytes(self._key.sign(data, self._ecdsa))
        raise TypeError("only ECDSA CA keys sign raw data here")   # RSA/EdDSA CAs: builders only

    def certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self._key, self._hash)   # type: ignore[arg-type]

    def crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList:
        return builder.sign(self._key, self._hash)   # type: ignore[arg-type]

    def ocsp(self, builder: x509_ocsp.OCSPResponseBuilder) -> x509_ocsp.OCSPResponse:
        return builder.sign(self._key, self._hash)

    def spec(self) -> tuple[Any, ...]:
        return (key_signer_from_spec, self.pem(), self.custody)


@functools.lru_cache(maxsize=None)
def _placeholder() -> ec.EllipticCurvePrivateKey:
    # signs only what is re-signed at once; P-256 is the cheapest key that makes ecdsa-with-SHA* signatures
    return ec.generate_private_key(ec.SECP256R1())


class TokenSigner(Signer):
    """An EC CA key outside this process: subclasses give `sign_digest` (the raw r || s over a digest)."""

    in_memory = False

    def __init__(self, public_key: ec.EllipticCurvePublicKey, custody: str) -> None:
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise TypeError("only EC keys (P-256, P-384) are supported in a token")
        self._public = public_key
        self.custody = custody
        self._hash = super().hash_algorithm()
        assert self._hash is not None

    def public_key(self) -> Any:
        return self._public

    def hash_algorithm(self) -> hashes.HashAlgorithm | None:
        return self._hash

    def sign_digest(self, digest: bytes) -> bytes:
        raise NotImplementedError

    def check(self) -> None:
        self.sign(b"uptrakitd: can this key sign?")

    def sign(self, data: bytes) -> bytes:
        assert self._hash is not None
        digest = hashes.Hash(self._hash)
        digest.update(data)
        raw = self.sign_digest(digest.finalize())
        half = len(raw) // 2
        return bytes(utils.encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")))

    def certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        signed = builder.sign(_placeholder(), self._hash)   # type: ignore[arg-type]
        return x509.load_der_x509_certificate(resign(signed.public_bytes(serialization.Encoding.DER), self.sign))

    def crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList:
        signed = builder.sign(_placeholder(), self._hash)   # type: ignore[arg-type]
        return x509.load_der_x509_crl(resign(signed.public_bytes(serialization.Encoding.DER), self.sign))

    def ocsp(self, builder: x509_ocsp.OCSPResponseBuilder) -> x509_ocsp.OCSPResponse:
        # cryptography checks the responder certificate's key against the signing key, so no placeholder
        # can stand in; a CA key in a token signs OCSP answers only through the delegated responder
        raise SignerUnavailable("a CA key in a token does not sign OCSP answers: they are signed by the delegated "
                                "responder (--ocsp-signer delegated)")


_WORKER_SIGNERS: dict[bytes, Signer] = {}


def key_signer_from_spec(pem: bytes, custody: str) -> Signer:
    """KeySigner.spec() made into a signer in this process."""
    return KeySigner.from_pem(pem, custody)


def signer_from_spec(spec: tuple[Any, ...]) -> Signer:
    """The signer `spec` describes, made once per process (the PKI worker's side of Signer.spec)."""
    digest = hashlib.sha256(repr(spec).encode()).digest()
    signer = _WORKER_SIGNERS.get(digest)
    if signer is None:
        if len(_WORKER_SIGNERS) >= 8:
            _WORKER_SIGNERS.clear()
        make, *arguments = spec
        if not callable(make):
            raise ValueError(f"not a signer spec: {make!r}")
        signer = make(*arguments)
        _WORKER_SIGNERS[digest] = signer
    return signer
