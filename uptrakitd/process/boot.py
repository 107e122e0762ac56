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
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from twisted.logger import Logger

from uptrakitd import store as store_mod
from uptrakitd.config import ConfigError, NetworkSettings, Settings
from uptrakitd.process.datadir_lock import DataDirInUse, DataDirLock
from uptrakitd.registry.directory import ServiceRecord, load_services
from uptrakitd.files import atomic_write, ensure_private_dir
from uptrakitd.pki.ca import CaError, CaGeneration, create_ca, embedded_urls, load_external_ca, same_pki_addr, same_public_key
from uptrakitd.pki.files import PkiFiles
from uptrakitd.pki.keys import FileKeys, KeyStoreError, SealedKeys, load_keks
from uptrakitd.pki.issue import issue_server_certificate, server_cert_due, server_names
from uptrakitd.audit import log_entry, with_entry
from uptrakitd.process.restored import finish_restore
from uptrakitd.pki.serials import format_serial
from uptrakitd.pki.signer import SignerUnavailable
from uptrakitd.pki.state import EXPIRED_RECORD_GRACE, CaState, insert_generation, insert_issued, load_records
from uptrakitd.registry.runtime_settings import ServiceCertSettings
from uptrakitd.store import audit as stored_audit, ca_generations, changes, settings as stored_settings, tokens as stored_tokens
from uptrakitd.registry.tokens import token_hash

log = Logger()


class StartupError(Exception):
    """The daemon cannot start; the message is the one line the operator sees."""


class FaultInjected(Exception):
    """Raised by a test's fault hook to stop start-up at a named step, like a crash would."""


@dataclass
class Booted:
    """Everything start-up produced, handed to the running daemon."""

    settings: Settings
    lock: DataDirLock
    network: NetworkSettings
    state: CaState
    server_cert: x509.Certificate
    server_key: Any
    crl_numbers: dict[int, int]
    admin_token_path: Path
    service_certs: ServiceCertSettings = field(default_factory=ServiceCertSettings)
    hostname: str = ""
    admin_tokens: dict[str, list[str]] = field(default_factory=dict)
    admin_token_names: dict[str, tuple[str, str]] = field(default_factory=dict)   # hash -> (id, name)
    services: list[ServiceRecord] = field(default_factory=list)
    keys: Any = None               # where new CA keys go (pki.keys.FileKeys or SealedKeys)
    controller_id: str = ""        # this process among the controllers of one database (the change log's origin)
    change_seq: int = 0            # PostgreSQL: the change log's last row when the records were read


STEPS = ("data_dir", "database", "network", "ca_key_written", "ca", "server_cert_recorded", "server_cert",
         "admin_token_written", "admin_token", "crl_numbers", "bundle")


def boot(settings: Settings, now: datetime.datetime | None = None,
         fault: Any = None) -> Booted:
    """Prepare the data dir and all state; raises StartupError with one clear line.

    `fault(step)` is called after each step in STEPS (tests raise there to simulate a crash at a
    precise point; nothing else passes it).
    """
    reached = fault or (lambda step: None)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    data_dir = settings.data_dir
    token = _open_token(settings)   # a wrong module, token or PIN creates nothing
    try:
        ensure_private_dir(data_dir)
        ensure_private_dir(data_dir / "pki")
    except OSError as e:
        raise StartupError(f"cannot use data dir {data_dir}: {e.strerror}") from None
    lock = DataDirLock(data_dir)
    try:
        lock.acquire()
    except (DataDirInUse, OSError) as e:
        raise StartupError(str(e)) from None
    try:
        return _boot(settings, now, reached, lock, token)
    except store_mod.StoreError as e:
        lock.release()
        raise StartupError(str(e)) from None
    except BaseException:
        lock.release()
        raise


def _boot(settings: Settings, now: datetime.datetime, reached: Any, lock: DataDirLock, token: Any) -> Booted:
    data_dir = settings.data_dir
    reached("data_dir")
    files = PkiFiles(data_dir)
    db_path = store_mod.sqlite_path(data_dir)
    controller_id = f"{socket.gethostname()}-{secrets.token_hex(4)}"
    try:
        conn = store_mod.open_database(data_dir, settings.database, controller_id)
        change_seq = 0
        if settings.database:
            # controllers starting together on a new database: one creates the CA, the others load it
            conn.engine.startup_lock(conn)
            change_seq = store_mod.transaction(conn, changes.newest)   # before any record is read
    except store_mod.StoreError as e:
        raise StartupError(str(e)) from None
    for path in (db_path, db_path.with_name(db_path.name + "-wal"), db_path.with_name(db_path.name + "-shm")):
        if path.exists() and not settings.database:
            os.chmod(path, 0o600)  # token hashes and certificate records: nobody else's business
    reached("database")
    try:
        # (the listeners were tried before the data dir was touched: tap.makeService, listen_problem)
        network = store_mod.transaction(conn, _network_settings, settings, controller_id)
        reached("network")
        keys = _ca_keys(settings, files, token)
        state = _load_ca_state(conn, settings, files, keys, network, now, reached, controller_id)
        reached("ca")
        service_certs = ServiceCertSettings.from_json(store_mod.transaction(conn, stored_settings.get,
                                                                            "service_certificates"))
        hostname = socket.gethostname()
        server_cert, server_key = _server_certificate(conn, settings, files, state, network, hostname, now, reached,
                                                      controller_id)
        reached("server_cert")
        token_path = _admin_token(conn, data_dir, reached, controller_id)
        reached("admin_token")
        finish_restore(conn, controller_id)   # a database from a backup: CRL numbers move on first
        numbers = store_mod.transaction(conn, ca_generations.next_crl_numbers,
                                        [ca.generation for ca in state.served(now)])
        reached("crl_numbers")
        files.write_bundle(state.bundle_pem(now))
        reached("bundle")
        admin_rows = store_mod.transaction(conn, stored_tokens.active_admin_tokens)
        admin_tokens = {row["token_hash"]: json.loads(row["permissions"]) for row in admin_rows}
        admin_token_names = {row["token_hash"]: (row["id"], row["name"]) for row in admin_rows}
        services = store_mod.transaction(conn, load_services)
    finally:
        conn.close()
    return Booted(settings=settings, lock=lock, network=network, state=state, server_cert=server_cert,
                  server_key=server_key, crl_numbers=numbers, admin_token_path=token_path,
                  service_certs=service_certs, hostname=hostname, admin_tokens=admin_tokens,
                  admin_token_names=admin_token_names, services=services,
                  keys=keys, controller_id=controller_id, change_seq=change_seq)


def _network_settings(conn: store_mod.Connection, settings: Settings, controller_id: str) -> NetworkSettings:
    stored = stored_settings.get(conn, "network")
    if stored is None or settings.force_settings_override:
        if stored is not None:
            log.warn("network settings from flags/config replace the stored ones (--force-settings-override)")
        merged = settings.network if stored is None else _stored_or_default(stored).updated(
            {k: settings.network.to_json()[k] for k in settings.network_given})
        after = merged.to_json()
        stored_settings.put(conn, "network", after)
        before = stored if isinstance(stored, dict) else {}
        changed = {k: {"old": before.get(k), "new": after[k]} for k in after if before.get(k) != after[k]}
        if changed:   # whatever path changes who may assert identities, it is on the trail (the API's entry)
            via = "start-up (--force-settings-override)" if stored is not None else "start-up (first start)"
            log_entry(stored_audit.append(conn, int(time.time()), controller_id, {"kind": "system", "via": via},
                                          "settings.network.changed", {"kind": "settings", "id": "network"},
                                          {"changes": changed}))
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


def _open_token(settings: Settings) -> Any:
    """The PKCS#11 token of --ca-key-uri, logged in (None without one); StartupError with one line."""
    if settings.ca_key_uri is None:
        return None
    from uptrakitd.pki.pkcs11 import Pkcs11Uri, Token, TokenError, read_pin
    uri = Pkcs11Uri.parse(settings.ca_key_uri)
    try:
        token = Token.shared(str(settings.pkcs11_module), uri.token, read_pin(settings.pkcs11_pin_file), uri.serial)
        token.open()
    except TokenError as e:
        raise StartupError(f"{e} (nothing was created or changed)") from None
    log.info("CA keys: PKCS#11 token {label!r} through {module}", label=uri.token, module=str(settings.pkcs11_module))
    return token


def _ca_keys(settings: Settings, files: PkiFiles, token: Any = None) -> Any:
    """Where this controller keeps managed CA keys: in the PKCS#11 token of --ca-key-uri (older generations
    still opened where they were), sealed in the database under the key-encryption key when one is given
    (required with PostgreSQL without a token), else clear files in the data dir."""
    older: Any = FileKeys(files)
    if settings.ca_key_encryption_key_file is not None:
        try:
            older = SealedKeys(load_keks(settings.ca_key_encryption_key_file), None if settings.database else files)
        except KeyStoreError as e:
            import pwd
            try:
                user = pwd.getpwuid(os.getuid()).pw_name
            except KeyError:
                user = str(os.getuid())
            # (under systemd the user is the unit's User=, not the one who made the file)
            raise StartupError(f"{e} (uptrakitd runs as user {user}: the file must be readable by it, e.g. "
                               f"chown {user} {settings.ca_key_encryption_key_file})") from None
    if token is None:
        return older
    from uptrakitd.pki.pkcs11 import Pkcs11Keys, Pkcs11Uri
    assert settings.ca_key_uri is not None
    return Pkcs11Keys(token, Pkcs11Uri.parse(settings.ca_key_uri), older)


def _load_key(keys: Any, files: PkiFiles, row: Any) -> Any:
    from uptrakitd.pki.pkcs11 import TokenError
    try:
        return keys.load(row["generation"], row["key_file"], row["key_sealed"])
    except (KeyStoreError, TokenError, SignerUnavailable) as e:
        raise StartupError(str(e)) from None
    except FileNotFoundError:
        raise StartupError(f"cannot load CA key {files.dir / row['key_file']}: file not found") from None
    except (OSError, ValueError, TypeError) as e:
        raise StartupError(f"cannot load CA key {files.dir / row['key_file']}: {getattr(e, 'strerror', None) or e}") \
            from None


def _load_ca_state(conn: store_mod.Connection, settings: Settings, files: PkiFiles, keys: Any, network: NetworkSettings,
                   now: datetime.datetime, reached: Any, controller_id: str) -> CaState:
    state = CaState()
    stored = store_mod.transaction(conn, ca_generations.load_all)
    for row in stored:
        generation, external = row["generation"], bool(row["external"])
        cert = x509.load_pem_x509_certificate(row["cert_pem"].encode())
        if external:
            if settings.ca_cert is None:
                if generation == stored[-1]["generation"]:
                    raise StartupError("the active CA is external; start with --ca-cert and --ca-key")
                continue  # an old external generation whose key we do not hold: not loaded
            signer = None
        else:
            signer = _load_key(keys, files, row)
            if keys.needs_resealing(row["key_sealed"]):   # sealed with an older key-encryption key
                sealed = keys.seal(generation, signer)
                store_mod.transaction(conn, with_entry(ca_generations.reseal, controller_id, "ca_key.resealed",
                                                       {"kind": "ca_generation", "id": str(generation)},
                                                       {"kek": sealed.split(":")[1]}), generation, sealed)
                log.info("sealed CA generation {generation}'s key with the current key-encryption key",
                         generation=generation)
        state.generations[generation] = CaGeneration(generation, cert, signer, external)

    if settings.ca_cert is not None and settings.ca_key is not None:
        try:
            cert, signer = load_external_ca(settings.ca_cert.read_bytes(), settings.ca_key.read_bytes())
        except CaError as e:
            raise StartupError(str(e)) from None
        fp = cert.fingerprint(hashes.SHA256())
        match = [g for g, ca in state.generations.items()
                 if ca.external and ca.cert.fingerprint(hashes.SHA256()) == fp]
        if match:
            generation = match[0]
        else:
            generation = max(state.generations, default=0) + 1
            store_mod.transaction(conn, with_entry(insert_generation, controller_id, "ca.external_adopted",
                                                   {"kind": "ca_generation", "id": str(generation)},
                                                   {"fingerprint": fp.hex(), "subject": cert.subject.rfc4514_string()}),
                                  CaGeneration(generation, cert, signer, True), str(settings.ca_key), int(time.time()))
            log.info("using external CA {cn} as generation {generation}",
                     cn=cert.subject.rfc4514_string(), generation=generation)
        for g in list(state.generations):
            if state.generations[g].external and state.generations[g].signer is None:
                del state.generations[g]
        state.generations[generation] = CaGeneration(generation, cert, signer, True)
        if generation != max(state.generations):
            raise StartupError("the external CA is older than the active managed CA; refusing to downgrade")
    else:
        signer = _next_key(keys, state)
        if signer is not None:
            generation = max(state.generations, default=0) + 1
            cert = create_ca(generation, network.pki_addr, now, signer)
            key_file, key_sealed = keys.save(generation, signer)
            reached("ca_key_written")
            state.generations[generation] = CaGeneration(generation, cert, signer, False)
            made = state.generations[generation]
            store_mod.transaction(conn, with_entry(insert_generation, controller_id, "ca.created",
                                                   {"kind": "ca_generation", "id": str(generation)},
                                                   {"fingerprint": made.fingerprint, "custody": made.custody,
                                                    "not_after": made.not_after.isoformat(),
                                                    "trigger": "first start" if generation == 1 else "start"}),
                                  made, key_file, int(time.time()), key_sealed)
            log.info("created managed CA generation {generation}: {cn}, its key {custody}{previous}",
                     generation=generation, cn=state.generations[generation].common_name,
                     custody=_CUSTODY_WORDS.get(signer.custody, signer.custody),
                     previous=f" (G{generation - 1} stays trusted)" if generation > 1 else "")

    for ca in list(state.generations.values()):
        state.add_generation(ca)
    active = state.active()
    if active.expired(now):
        raise StartupError(f"the active CA (generation {active.generation}) expired on "
                           f"{active.not_after.isoformat()}")
    if not active.external and "pki_addr" in settings.network_given:
        have = embedded_urls(active.cert)
        if not same_pki_addr(active.cert, settings.network.pki_addr):
            raise StartupError(
                f"--pki-addr {settings.network.pki_addr or '(none)'} disagrees with the URLs embedded in the "
                f"active CA (generation {active.generation}: {have['ocsp'] if have else 'no URLs'}); "
                "rotate the CA: start with the previous address, PUT the new pki_addr to "
                "/api/v1/settings/network, POST /api/v1/settings/rotate-ca, then restart with the new flag "
                f"(a controller that has issued no service certificate yet can instead be reset: stop it and "
                f"delete {settings.data_dir})")
    # (records of client certificates expired over a day ago matter to nothing in memory: not read at all)
    records = store_mod.transaction(conn, load_records, int(now.timestamp()) - EXPIRED_RECORD_GRACE)
    for record in records:
        state.add_record(record)
    log.info("loaded {count} certificate records (client certificates expired over a day ago stay in the store)",
             count=len(records))
    return state


_CUSTODY_WORDS = {"file": "in a clear file", "sealed": "sealed in the database", "pkcs11": "in the PKCS#11 token"}


def _next_key(keys: Any, state: CaState) -> Any:
    """The signer of a generation to make at start, or None: on first start, and with --ca-key-uri when the
    active CA's key is not in the token (a move into it) or is not the operator-made key the URI names."""
    from uptrakitd.pki.pkcs11 import Pkcs11Keys, TokenError
    active = state.generations[max(state.generations)] if state.generations else None
    if not isinstance(keys, Pkcs11Keys):
        return keys.new(1) if active is None else None
    try:
        wanted = keys.operator_key()
        if active is not None and active.custody == "pkcs11" and (
                wanted is None or same_public_key(wanted.public_key(), active.cert.public_key())):
            return None
        if active is not None:
            log.info("the active CA (generation {generation}) has its key {custody}: making a new generation "
                     "in the token", generation=active.generation, custody=_CUSTODY_WORDS.get(active.custody,
                                                                                                active.custody))
        return wanted or keys.new(max(state.generations, default=0) + 1)
    except (TokenError, SignerUnavailable) as e:
        raise StartupError(str(e)) from None


def _server_certificate(conn: store_mod.Connection, settings: Settings, files: PkiFiles, state: CaState,
                        network: NetworkSettings, hostname: str, now: datetime.datetime,
                        reached: Any, controller_id: str) -> tuple[x509.Certificate, Any]:
    cert_path, key_path = files.server_cert_path, files.server_key_path
    reason = _server_cert_problem(cert_path, key_path, state, settings, hostname, now)
    if reason is None:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        return cert, serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    issued, key = issue_server_certificate(state.active(), hostname, settings.san, network.pki_addr, now)
    # Record first: a certificate on disk that the records lack would get OCSP "unknown".
    record = store_mod.transaction(conn, with_entry(insert_issued, controller_id, "certificate.issued",
                                                    {"kind": "certificate", "id": format_serial(issued.serial)},
                                                    {"purpose": "server", "service_id": None,
                                                     "ca_generation": issued.ca_generation, "reason": reason,
                                                     "not_after": issued.cert.not_valid_after_utc.isoformat()}),
                                   issued, None, "server", int(time.time()))
    state.add_record(record)
    reached("server_cert_recorded")
    files.write_server(issued.cert, key)
    log.info("issued server certificate {serial} ({reason})", serial=format_serial(issued.serial), reason=reason)
    return issued.cert, key


def _server_cert_problem(cert_path: Path, key_path: Path, state: CaState, settings: Settings,
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
    if not any(_signed_by(cert, ca.cert) for ca in state.trusted(now)):
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


def _admin_token(conn: store_mod.Connection, data_dir: Path, reached: Any, controller_id: str) -> Path:
    path = data_dir / "admin.token"
    if store_mod.transaction(conn, stored_tokens.active_admin_tokens):
        if not path.exists():
            log.info("admin token file {path} is gone; the stored admin token(s) still work. With none at hand: "
                     "uptrakitctl tokens admin create --name break-glass --data-dir {data_dir} (or --database), "
                     "then SIGHUP", path=str(path), data_dir=str(data_dir))
        return path
    token = "upt_admin_" + secrets.token_urlsafe(32)
    atomic_write(path, (token + "\n").encode(), mode=0o600)
    reached("admin_token_written")
    token_id = str(uuid.uuid4())
    store_mod.transaction(conn, with_entry(stored_tokens.insert_admin_token, controller_id, "admin_token.created",
                                           {"kind": "admin_token", "id": token_id},
                                           {"name": "bootstrap", "permissions": ["admin"]}),
                          token_id, "bootstrap", token_hash(token), json.dumps(["admin"]), int(time.time()))
    log.info("wrote the bootstrap admin token to {path} (mode 0600)", path=str(os.path.abspath(path)))
    return path
