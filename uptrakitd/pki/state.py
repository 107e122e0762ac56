"""In-memory PKI state kept in step with the store: CA generations and every certificate we issued."""
from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization

from .ca import CaGeneration
from ..store import ca_generations, certificates
from .issue import Issued
from .serials import format_serial

EXPIRED_RECORD_GRACE = 86400   # seconds a client certificate's record stays in memory after it expired


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
class CaState:
    """In memory, in step with the store: CA generations (highest = active) and every certificate
    record, with the lookups the hot paths need (OCSP, TLS verify, identity checks)."""

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

    def is_revoked(self, serial: int) -> bool:
        """True for a serial we issued and revoked (checked at every TLS handshake)."""
        record = self.records.get(serial)
        return record is not None and record.revoked_at is not None

    def prune_expired(self, now_ts: float, grace: float = EXPIRED_RECORD_GRACE) -> int:
        """Forget (in memory only: the store keeps them) records expired more than `grace` ago.

        CRLs stop listing a revoked certificate 24 h after it expires (SPEC §4.5), and nothing else
        needs an expired record; without this every certificate ever issued stays in memory (~300 B).
        """
        cutoff = now_ts - grace
        gone = [serial for serial, r in self.records.items() if r.not_after < cutoff and r.purpose == "client"]
        services = set()
        for serial in gone:
            services.add(self.records.pop(serial).service_id or "")
        for service_id in services:   # each service's list filtered once, not once per record (O(n))
            kept = [r for r in self.by_service.get(service_id, []) if r.serial in self.records]
            if kept:
                self.by_service[service_id] = kept
            else:
                self.by_service.pop(service_id, None)
        return len(gone)

    def valid_client_certificates(self, service_id: str, now_ts: float) -> int:
        """How many unrevoked, unexpired client certificates a service holds."""
        return sum(1 for r in self.by_service.get(service_id, ())
                   if r.purpose == "client" and r.revoked_at is None and r.not_after > now_ts)

    def current_for(self, service_id: str, now_ts: float) -> CertRecord | None:
        """The last issued unrevoked, unexpired certificate of a service (by_service is in issue order).

        Not the greatest not_before: two certificates issued in the same second (a renewal right after
        a rotation) tie on it, and the older would win half the time.
        """
        for r in reversed(self.by_service.get(service_id, ())):
            if r.revoked_at is None and r.not_after > now_ts:
                return r
        return None

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


def load_records(conn: Any, expired_before: int | None = None) -> list[CertRecord]:
    """Store operation: the certificate records in issue order; with `expired_before`, none of the client
    certificates that expired before then (CaState.prune_expired would drop them at once)."""
    rows = certificates.load_all(conn) if expired_before is None else certificates.load_current(conn, expired_before)
    # stored serials are our own canonical hex: int(..., 16) is a fifth of parse_serial's cost at start
    return [CertRecord(int(row["serial"], 16), row["service_id"], row["purpose"], row["ca_generation"],
                       row["not_before"], row["not_after"], row["revoked_at"], row["revocation_reason"])
            for row in rows]


class CapReached(Exception):
    """A service already holds as many valid certificates as it may (checked in the recording transaction)."""


def insert_issued(conn: Any, issued: Issued, service_id: str | None, purpose: str, issued_at: int,
                  cap: int | None = None) -> CertRecord:
    """Store operation: record an issued certificate; returns the in-memory record for it. With `cap`, CapReached
    when the service already holds that many valid ones (counted in the same transaction: the cap holds on every
    controller of a cluster, whatever runs at once)."""
    if cap is not None and service_id is not None and \
            certificates.valid_for_service(conn, service_id, issued_at) >= cap:
        raise CapReached(service_id)
    cert = issued.cert
    record = CertRecord(serial=issued.serial, service_id=service_id, purpose=purpose,
                        ca_generation=issued.ca_generation,
                        not_before=int(cert.not_valid_before_utc.timestamp()),
                        not_after=int(cert.not_valid_after_utc.timestamp()))
    certificates.insert(conn, format_serial(issued.serial), service_id, purpose, issued.ca_generation,
                        record.not_before, record.not_after, issued.pem.decode("ascii"), issued_at)
    return record


def insert_generation(conn: Any, ca: CaGeneration, key_file: str, created_at: int,
                      key_sealed: str | None = None) -> None:
    """Store operation: record a CA generation whose key file is already on disk (or sealed in the row)."""
    ca_generations.insert(conn, ca.generation, ca.pem.decode("ascii"), key_file,
                          int(ca.not_after.timestamp()), ca.external, created_at, key_sealed)
