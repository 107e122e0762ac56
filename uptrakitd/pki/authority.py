"""In-memory PKI state kept in step with the store: CA generations and every certificate we issued."""
from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization

from .ca import CaGeneration


@dataclass(slots=True)
class CertRecord:
    """What we know about one certificate we issued (mutable only by revocation)."""

    serial: int
    service_id: str | None
    purpose: str
    ca_generation: int
    not_before: int
    not_after: int
    revoked_at: int | None = None
    reason: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def _certid_hashes(ca: CaGeneration) -> list[tuple[str, bytes, bytes]]:
    name_der = ca.cert.subject.public_bytes()
    key_bits = ca.cert.public_key().public_bytes(serialization.Encoding.X962,
                                                 serialization.PublicFormat.UncompressedPoint) \
        if hasattr(ca.cert.public_key(), "curve") else _raw_key_bits(ca)
    out = []
    for alg in ("sha1", "sha256", "sha384", "sha512"):
        out.append((alg, hashlib.new(alg, name_der).digest(), hashlib.new(alg, key_bits).digest()))
    return out


def _raw_key_bits(ca: CaGeneration) -> bytes:
    # issuerKeyHash is over the subjectPublicKey BIT STRING contents; for RSA that is the PKCS#1 DER.
    return ca.cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)


@dataclass
class Authority:
    """CA generations (highest = active) and the certificate records, with lookups for hot paths."""

    generations: dict[int, CaGeneration] = field(default_factory=dict)
    records: dict[int, CertRecord] = field(default_factory=dict)
    by_service: dict[str, list[CertRecord]] = field(default_factory=dict)
    _certid_index: dict[tuple[str, bytes, bytes], int] = field(default_factory=dict)

    def add_generation(self, ca: CaGeneration) -> None:
        """Make a CA generation known (the highest one is active)."""
        self.generations[ca.generation] = ca
        for key in _certid_hashes(ca):
            self._certid_index[key] = ca.generation

    def add_record(self, record: CertRecord) -> None:
        """Remember a certificate we issued (indexed by serial and by service)."""
        self.records[record.serial] = record
        if record.service_id is not None:
            self.by_service.setdefault(record.service_id, []).append(record)

    def current_for(self, service_id: str, now_ts: float) -> CertRecord | None:
        """The newest unrevoked, unexpired certificate of a service."""
        live = [r for r in self.by_service.get(service_id, ()) if r.revoked_at is None and r.not_after > now_ts]
        return max(live, key=lambda r: r.not_before, default=None)

    def active(self) -> CaGeneration:
        """The CA that signs new certificates."""
        return self.generations[max(self.generations)]

    def previous(self, now: datetime.datetime) -> CaGeneration | None:
        """The generation just before the active one, while it has not expired."""
        active = self.active().generation
        below = [g for g in self.generations if g < active]
        if not below:
            return None
        prev = self.generations[max(below)]
        return None if prev.expired(now) else prev

    def trusted(self, now: datetime.datetime) -> list[CaGeneration]:
        """{active, previous}, active first."""
        prev = self.previous(now)
        return [self.active()] + ([prev] if prev else [])

    def served(self, now: datetime.datetime) -> list[CaGeneration]:
        """Every generation whose CRL is still served: not expired, active first, newest first."""
        return [self.generations[g] for g in sorted(self.generations, reverse=True)
                if not self.generations[g].expired(now)]

    def bundle_pem(self, now: datetime.datetime) -> bytes:
        """The CA bundle: PEM of the trusted CAs, active first; hashed and pushed as these exact bytes."""
        return b"".join(ca.pem for ca in self.trusted(now))

    def bundle_hash(self, now: datetime.datetime) -> str:
        """Lowercase hex SHA-256 of bundle_pem()."""
        return hashlib.sha256(self.bundle_pem(now)).hexdigest()

    def ca_for_certid(self, algorithm: str, name_hash: bytes, key_hash: bytes) -> CaGeneration | None:
        """The CA an OCSP CertID names (both hashes must match), or None when it is not ours."""
        gen = self._certid_index.get((algorithm, name_hash, key_hash))
        return self.generations.get(gen) if gen is not None else None

    def ca_for_issuer_cn(self, cn: str, now: datetime.datetime) -> CaGeneration | None:
        """The trusted CA (active or previous) whose CN is exactly `cn`."""
        for ca in self.trusted(now):
            if ca.common_name == cn:
                return ca
        return None
