"""Start-up, before the reactor runs: data dir, store, CA, server certificate, admin token, settings.

Every step is idempotent and crash-safe: files are written atomically, keys before the rows that
name them, so `kill -9` at any point leaves a state the next start completes.
"""
from __future__ import annotations

import datetime
import json
import os
import secrets
import socket
import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from twisted.logger import Logger

from . import store as store_mod
from .config import ConfigError, NetworkSettings, Settings
from .files import atomic_write, ensure_private_dir
from .pki import records
from .services import load_services
from .tokens import token_hash
from .pki.authority import Authority
from .pki.ca import (CaError, CaGeneration, create_ca, embedded_urls, key_pem, load_external_ca, pki_urls,
                     same_public_key)
from .pki.issue import issue_server_certificate, server_cert_due, server_names

log = Logger()


class StartupError(Exception):
    """The daemon cannot start; the message is the one line the operator sees."""


@dataclass
class ServiceCertSettings:
    """Runtime settings for service certificates (SPEC §4.2)."""

    lifetime_hours: int = 168
    renewal_window_hours: int | None = None


@dataclass
class Booted:
    """Everything start-up produced, handed to the running service."""

    settings: Settings
    network: NetworkSettings
    authority: Authority
    server_cert: x509.Certificate
    server_key: Any
    crl_numbers: dict[int, int]
    admin_token_path: Path
    service_certs: ServiceCertSettings = field(default_factory=ServiceCertSettings)
    hostname: str = ""
    admin_tokens: dict[str, list[str]] = field(default_factory=dict)
    services: list[Any] = field(default_factory=list)


def get_setting(conn: sqlite3.Connection, key: str) -> Any:
    """A stored runtime setting (JSON), or None."""
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return json.loads(row[0]) if row else None


def put_setting(conn: sqlite3.Connection, key: str, value: Any) -> None:
    """Store a runtime setting (JSON)."""
    conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                 "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, json.dumps(value)))


def boot(settings: Settings, now: datetime.datetime | None = None) -> Booted:
    """Prepare the data dir and all state; raises StartupError with one clear line."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    data_dir = settings.data_dir
    try:
        ensure_private_dir(data_dir)
        ensure_private_dir(data_dir / "pki")
    except OSError as e:
        raise StartupError(f"cannot use data dir {data_dir}: {e.strerror}") from None
    db_path = data_dir / "uptrakit.sqlite3"
    try:
        conn = store_mod.open_and_migrate(db_path)
    except store_mod.StoreError as e:
        raise StartupError(str(e)) from None
    for path in (db_path, db_path.with_name(db_path.name + "-wal"), db_path.with_name(db_path.name + "-shm")):
        if path.exists():
            os.chmod(path, 0o600)  # token hashes and certificate records: nobody else's business
    try:
        network = store_mod.transaction(conn, _network_settings, settings)
        authority = _load_authority(conn, settings, network, now)
        service_certs = _service_cert_settings(conn)
        hostname = socket.gethostname()
        server_cert, server_key = _server_certificate(conn, settings, authority, network, hostname, now)
        token_path = _admin_token(conn, data_dir)
        numbers = store_mod.transaction(conn, lambda c: {ca.generation: records.next_crl_number(c, ca.generation)
                                                         for ca in authority.served(now)})
        atomic_write(data_dir / "pki" / "ca.crt", authority.bundle_pem(now), mode=0o644)
        admin_tokens = {h: json.loads(p) for h, p in conn.execute(
            "SELECT token_hash, permissions FROM admin_tokens WHERE revoked_at IS NULL")}
        services = load_services(conn)
    finally:
        conn.close()
    return Booted(settings=settings, network=network, authority=authority, server_cert=server_cert,
                  server_key=server_key, crl_numbers=numbers, admin_token_path=token_path,
                  service_certs=service_certs, hostname=hostname, admin_tokens=admin_tokens, services=services)


def _network_settings(conn: sqlite3.Connection, settings: Settings) -> NetworkSettings:
    stored = get_setting(conn, "network")
    if stored is None or settings.force_settings_override:
        if stored is not None:
            log.warn("network settings from flags/config replace the stored ones (--force-settings-override)")
        merged = settings.network if stored is None else _stored_or_default(stored).updated(
            {k: settings.network.to_json()[k] for k in settings.network_given})
        put_setting(conn, "network", merged.to_json())
        return merged
    try:
        current = NetworkSettings().updated(stored)
    except ConfigError as e:
        raise StartupError(f"stored network settings are invalid ({e}); start once with "
                           "--force-settings-override and the right flags") from None
    given, have = settings.network.to_json(), current.to_json()
    for key in sorted(k for k in settings.network_given if given[k] != have[k]):
        log.warn("network.{key}: flag/config value {given!r} differs from the stored runtime setting "
                 "{stored!r}; the stored one is used (change it with PUT /api/v1/settings/network or "
                 "start with --force-settings-override)", key=key, given=given[key], stored=have[key])
    return current


def _stored_or_default(stored: Any) -> NetworkSettings:
    """The stored settings, or the defaults when they no longer validate (only with the override)."""
    try:
        return NetworkSettings().updated(stored)
    except ConfigError:
        return NetworkSettings()


def _service_cert_settings(conn: sqlite3.Connection) -> ServiceCertSettings:
    stored = get_setting(conn, "service_certificates") or {}
    return ServiceCertSettings(lifetime_hours=int(stored.get("lifetime_hours", 168)),
                               renewal_window_hours=stored.get("renewal_window_hours"))


def _load_key(path: Path) -> Any:
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise StartupError(f"cannot load CA key {path}: {getattr(e, 'strerror', None) or e}") from None


def _load_authority(conn: sqlite3.Connection, settings: Settings, network: NetworkSettings,
                    now: datetime.datetime) -> Authority:
    authority = Authority()
    pki_dir = settings.data_dir / "pki"
    stored = records.load_generations(conn)
    for generation, cert_pem, key_file, external, _number in stored:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        if external:
            if settings.ca_cert is None:
                if generation == stored[-1][0]:
                    raise StartupError("the active CA is external; start with --ca-cert and --ca-key")
                continue  # an old external generation whose key we do not hold: not loaded
            key = None
        else:
            key = _load_key(pki_dir / key_file)
        authority.generations[generation] = CaGeneration(generation, cert, key, external)

    if settings.ca_cert is not None:
        try:
            cert, key = load_external_ca(settings.ca_cert.read_bytes(), settings.ca_key.read_bytes())
        except CaError as e:
            raise StartupError(str(e)) from None
        fp = cert.fingerprint(hashes.SHA256())
        match = [g for g, ca in authority.generations.items()
                 if ca.external and ca.cert.fingerprint(hashes.SHA256()) == fp]
        if match:
            generation = match[0]
        else:
            generation = max(authority.generations, default=0) + 1
            pem = cert.public_bytes(serialization.Encoding.PEM).decode()
            store_mod.transaction(conn, records.insert_generation, generation, cert, pem,
                                  str(settings.ca_key), True)
            log.info("using external CA {cn} as generation {generation}",
                     cn=cert.subject.rfc4514_string(), generation=generation)
        for g in list(authority.generations):
            if authority.generations[g].external and authority.generations[g].key is None:
                del authority.generations[g]
        authority.generations[generation] = CaGeneration(generation, cert, key, True)
        if generation != max(authority.generations):
            raise StartupError("the external CA is older than the active managed CA; refusing to downgrade")
    elif not authority.generations:
        cert, key = create_ca(1, network.pki_addr, now)
        key_file = "ca-1.key"
        atomic_write(pki_dir / key_file, key_pem(key), mode=0o600)
        store_mod.transaction(conn, records.insert_generation, 1, cert,
                              cert.public_bytes(serialization.Encoding.PEM).decode(), key_file, False)
        authority.generations[1] = CaGeneration(1, cert, key, False)
        log.info("created managed CA generation 1: {cn}", cn=authority.generations[1].common_name)

    for ca in list(authority.generations.values()):
        authority.add_generation(ca)
    active = authority.active()
    if active.expired(now):
        raise StartupError(f"the active CA (generation {active.generation}) expired on "
                           f"{active.not_after.isoformat()}")
    if not active.external and "pki_addr" in settings.network_given:
        wanted = pki_urls(settings.network.pki_addr, active.generation)
        have = embedded_urls(active.cert)
        if wanted != have:
            raise StartupError(
                f"--pki-addr {settings.network.pki_addr or '(none)'} disagrees with the URLs embedded in the "
                f"active CA (generation {active.generation}: {have['ocsp'] if have else 'no URLs'}); "
                "rotate the CA: start with the previous address, PUT the new pki_addr to "
                "/api/v1/settings/network, POST /api/v1/settings/rotate-ca, then restart with the new flag")
    for record in records.load_records(conn):
        authority.add_record(record)
    return authority


def _server_certificate(conn: sqlite3.Connection, settings: Settings, authority: Authority,
                        network: NetworkSettings, hostname: str,
                        now: datetime.datetime) -> tuple[x509.Certificate, Any]:
    pki_dir = settings.data_dir / "pki"
    cert_path, key_path = pki_dir / "server.crt", pki_dir / "server.key"
    reason = _server_cert_problem(cert_path, key_path, authority, settings, hostname, now)
    if reason is None:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        return cert, serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    issued, key = issue_server_certificate(authority.active(), hostname, settings.san, network.pki_addr, now)
    # Record first: a certificate on disk that the records lack would get OCSP "unknown".
    record = store_mod.transaction(conn, records.insert_certificate, issued, None, "server")
    authority.add_record(record)
    atomic_write(key_path, key_pem(key), mode=0o600)
    atomic_write(cert_path, issued.pem, mode=0o644)
    log.info("issued server certificate {serial} ({reason})", serial=format(issued.serial, "X"), reason=reason)
    return issued.cert, key


def _server_cert_problem(cert_path: Path, key_path: Path, authority: Authority, settings: Settings,
                         hostname: str, now: datetime.datetime) -> str | None:
    if not cert_path.exists() or not key_path.exists():
        return "first start"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError):
        return "stored server certificate unreadable"
    if not same_public_key(cert.public_key(), key.public_key()):
        return "stored server key does not match"
    if not any(_signed_by(cert, ca.cert) for ca in authority.trusted(now)):
        return "stored server certificate not signed by a trusted CA"
    if server_cert_due(cert, now):
        return "30 days or less left"
    try:
        have = set(map(str, cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value))
    except x509.ExtensionNotFound:
        have = set()
    if not set(map(str, server_names(hostname, settings.san))) <= have:
        return "server names changed"
    return None


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def _admin_token(conn: sqlite3.Connection, data_dir: Path) -> Path:
    path = data_dir / "admin.token"
    count = conn.execute("SELECT COUNT(*) FROM admin_tokens WHERE revoked_at IS NULL").fetchone()[0]
    if count:
        if not path.exists():
            log.info("admin token file {path} is gone; the stored admin token(s) still work", path=str(path))
        return path
    token = "upt_admin_" + secrets.token_urlsafe(32)
    atomic_write(path, (token + "\n").encode(), mode=0o600)
    store_mod.transaction(conn, lambda c: c.execute(
        "INSERT INTO admin_tokens (id, name, token_hash, created_at) VALUES (?, ?, ?, strftime('%s','now'))",
        (str(uuid.uuid4()), "bootstrap", token_hash(token))))
    log.info("wrote the bootstrap admin token to {path} (mode 0600)", path=str(os.path.abspath(path)))
    return path
