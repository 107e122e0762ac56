"""`uptrakitctl backup` and `uptrakitctl restore`: a consistent copy of an embedded-SQLite data dir taken while
the daemon runs, and a new data dir made from one (docs/deployment/backup.md).

The archive (tar, gzip) holds `manifest.json` first, then `uptrakit.sqlite3` (SQLite's online backup API: a
consistent snapshot even while the daemon writes) and the PKI files a start needs: the CA bundle, the server
certificate and its key. Sealed CA keys are rows of the database and stay sealed (the key-encryption key file is
not in the backup: keep it elsewhere); keys in a PKCS#11 token stay there; clear CA key files are refused unless
--include-clear-keys. Left out on purpose: the CRLs (a restored controller signs new ones, with numbers past any
it may have served: uptrakitd/restored.py), `admin.token` (a secret: keep the admin tokens you use), the lock, and
the copies migrations keep.

The copy of the database carries the restore marker; the live database never does.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import click

from .. import __version__
from ..restored import RESTORE_MARKER, marker_sql
from ..store.database import SQLITE
from .client import REFUSED, UNREACHABLE, USAGE, CtlError

FORMAT = "uptrakitd-backup/1"
DATABASE = "uptrakit.sqlite3"
POSTGRESQL_DUMP = "database.sql"
PKI_FILES = ["pki/ca.crt", "pki/server.crt", "pki/server.key"]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _custody(row: sqlite3.Row) -> str:
    if row["external"]:
        return "external"
    if (row["key_file"] or "").startswith("pkcs11:"):
        return "pkcs11"
    return "file" if row["key_file"] else "sealed"


def snapshot(data_dir: Path, target: Path) -> None:
    """SQLite's online backup of DATA_DIR's database into `target` (a new file), while the daemon may write."""
    source_path = data_dir / DATABASE
    if not source_path.is_file():
        raise CtlError(f"{data_dir} holds no {DATABASE}: is it the daemon's --data-dir? (With PostgreSQL, back "
                       "up with pg_dump: docs/deployment/backup.md)", USAGE)
    try:
        source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as e:
        raise CtlError(f"cannot open {source_path}: {e}", USAGE) from None
    copy = sqlite3.connect(str(target))
    try:
        source.backup(copy, pages=256, sleep=0.005)   # in steps: the daemon's writers are not held up
    except sqlite3.Error as e:
        raise CtlError(f"the online backup of {source_path} failed: {e}", REFUSED) from None
    finally:
        copy.close()
        source.close()


def describe(database: Path) -> dict[str, Any]:
    """What the manifest says of a database copy: schema, CA generations, serials, CRL numbers."""
    conn = sqlite3.connect(str(database))
    conn.row_factory = sqlite3.Row
    try:
        return _facts(conn, SQLITE.schema_version(conn))
    finally:
        conn.close()


def _facts(conn: Any, schema: int) -> dict[str, Any]:
    generations = [{"generation": r["generation"], "custody": _custody(r), "crl_number": r["crl_number"],
                    "key_file": r["key_file"] if _custody(r) == "file" else None}
                   for r in conn.execute("SELECT * FROM ca_generations ORDER BY generation").fetchall()]
    serials = [r["serial"] for r in conn.execute("SELECT serial FROM certificates").fetchall()]
    revoked = conn.execute("SELECT count(*) AS n FROM certificates WHERE revoked_at IS NOT NULL").fetchone()["n"]
    return {"schema": schema, "ca_generations": generations, "certificates": len(serials), "revoked": revoked,
            "highest_serial": max(serials, key=lambda s: int(s, 16)) if serials else None,
            "crl_numbers": {str(g["generation"]): g["crl_number"] for g in generations}}


def make_backup(data_dir: Path, out: Path, include_clear_keys: bool = False) -> dict[str, Any]:
    """Write the archive `out` (atomically, mode 0600); returns its manifest."""
    if out.exists():
        raise CtlError(f"{out} exists: name a new file", USAGE)
    with tempfile.TemporaryDirectory(prefix="uptrakit-backup-") as work:
        copy = Path(work) / DATABASE
        snapshot(data_dir, copy)
        facts = describe(copy)
        clear = [g for g in facts["ca_generations"] if g["custody"] == "file"]
        if clear and not include_clear_keys:
            names = ", ".join(f"generation {g['generation']} (pki/{g['key_file']})" for g in clear)
            raise CtlError(f"the data dir holds clear CA keys: {names}. Seal them first (uptrakitd-keys seal, "
                           "docs/deployment/ca-keys.md), or pass --include-clear-keys to put them in the backup "
                           "in the clear", REFUSED)
        backup_id, taken_at = str(uuid.uuid4()), int(time.time())
        conn = sqlite3.connect(str(copy))
        try:
            conn.execute(*marker_sql(backup_id, taken_at))   # only in the copy: a start from it is a restore
            conn.commit()
            conn.execute("PRAGMA journal_mode=DELETE")   # one self-contained file
        finally:
            conn.close()
        members: dict[str, bytes] = {DATABASE: copy.read_bytes()}
        for name in PKI_FILES + [f"pki/{g['key_file']}" for g in clear]:
            path = data_dir / name
            if path.is_file():
                members[name] = path.read_bytes()
        manifest = _manifest(backup_id, taken_at, facts, members, data_dir=str(data_dir.resolve()),
                             clear_keys_included=bool(clear))
        _write_archive(out, manifest, members)
    return manifest


def _manifest(backup_id: str, taken_at: int, facts: dict[str, Any], members: dict[str, bytes],
              **more: Any) -> dict[str, Any]:
    return {"format": FORMAT, "version": __version__, "backup_id": backup_id, "taken_at": taken_at, **more, **facts,
            "members": {name: _sha256(data) for name, data in members.items()}}


def _write_archive(out: Path, manifest: dict[str, Any], members: dict[str, bytes]) -> None:
    """manifest.json first, then the members; written to a .partial file (0600), synced, then renamed."""
    partial = out.with_name(out.name + ".partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for name, data in [("manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())] + \
                    sorted(members.items()):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o600, manifest["taken_at"]
                tar.addfile(info, io.BytesIO(data))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(partial, out)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise CtlError(f"cannot write {out}: {e.strerror or e}", USAGE) from None


def make_postgresql_backup(database: str, out: Path) -> dict[str, Any]:
    """pg_dump (plain SQL) of the controllers' database in the snapshot the manifest's facts were read in, with
    the restore marker appended; sealed keys stay sealed (a PostgreSQL deployment has no clear CA key)."""
    import shutil
    import subprocess
    if out.exists():
        raise CtlError(f"{out} exists: name a new file", USAGE)
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise CtlError("pg_dump is not installed (apt-get install postgresql-client)", USAGE)
    from ..store import postgresql
    from ..store.common import StoreError
    try:
        conn = postgresql.connect(database)   # speaks the store's `?` style; its errors hide the password
    except StoreError as e:
        raise CtlError(str(e), UNREACHABLE) from None
    url, environ = _without_password(database)
    try:   # one transaction: its snapshot is the one pg_dump reads
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snapshot_id = conn.execute("SELECT pg_export_snapshot() AS s").fetchone()["s"]
        version = conn.execute("SELECT max(version) AS v FROM schema_version").fetchone()["v"]
        facts = _facts(conn, int(version or 0))
        dump = subprocess.run([pg_dump, "--format=plain", "--no-owner", "--no-privileges",
                               f"--snapshot={snapshot_id}", "--dbname", url], capture_output=True, env=environ)
        if dump.returncode != 0:
            raise CtlError(f"pg_dump failed: {dump.stderr.decode(errors='replace').strip()}", REFUSED)
    finally:
        conn.close()
    backup_id, taken_at = str(uuid.uuid4()), int(time.time())
    statement, (key, value) = marker_sql(backup_id, taken_at)
    # (pg_dump empties the search_path: the table is named with its schema)
    marker = statement.replace("INTO settings", "INTO public.settings").replace("?", "{}").format(
        _literal(key), _literal(value))
    members = {POSTGRESQL_DUMP: dump.stdout + b"\n-- uptrakitctl: this is a backup (uptrakitd/restored.py)\n" +
               marker.encode() + b";\n"}
    manifest = _manifest(backup_id, taken_at, facts, members, engine="postgresql", clear_keys_included=False)
    _write_archive(out, manifest, members)
    return manifest


def _without_password(url: str) -> tuple[str, dict[str, str]]:
    """The URL without its password, and the environment that gives it to pg_dump/psql (PGPASSWORD): a password
    in argv is readable by every user of the host in `ps`."""
    import os
    from urllib.parse import unquote, urlsplit, urlunsplit
    parts = urlsplit(url)
    environ = dict(os.environ)
    if parts.password is None:
        return url, environ
    environ["PGPASSWORD"] = unquote(parts.password)
    host = parts.netloc.rsplit("@", 1)[1]
    user = parts.netloc.rsplit("@", 1)[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}")), environ


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def restore_postgresql(archive: Path, database: str) -> dict[str, Any]:
    """Load a --database backup into an empty database with psql (one transaction)."""
    import shutil
    import subprocess
    manifest, members = read_backup(archive)
    if POSTGRESQL_DUMP not in members:
        raise CtlError(f"{archive} is a backup of an embedded SQLite data dir: restore it with --data-dir", USAGE)
    psql = shutil.which("psql")
    if psql is None:
        raise CtlError("psql is not installed (apt-get install postgresql-client)", USAGE)
    url, environ = _without_password(database)
    check = subprocess.run([psql, "--no-psqlrc", "-At", "-v", "ON_ERROR_STOP=1", "--dbname", url, "-c",
                            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"],
                           capture_output=True, env=environ)
    if check.returncode != 0:
        raise CtlError(f"cannot use the database: {check.stderr.decode(errors='replace').strip()}", UNREACHABLE)
    if int(check.stdout.strip() or 0):
        raise CtlError("the target database is not empty: restore into a new one (createdb), then point the "
                       "controllers' --database at it", USAGE)
    loaded = subprocess.run([psql, "--no-psqlrc", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction",
                             "--dbname", url, "-f", "-"], input=members[POSTGRESQL_DUMP], capture_output=True,
                            env=environ)
    if loaded.returncode != 0:
        raise CtlError(f"psql failed (nothing was loaded): {loaded.stderr.decode(errors='replace').strip()}",
                       REFUSED)
    return manifest


def read_backup(archive: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and members of an archive, each member checked against the manifest's sha256."""
    try:
        tar = tarfile.open(archive, mode="r:gz")
    except (OSError, tarfile.TarError) as e:
        raise CtlError(f"cannot read {archive}: {getattr(e, 'strerror', None) or e}", USAGE) from None
    members: dict[str, bytes] = {}
    with tar:
        try:
            for info in tar:
                if not info.isfile() or info.name.startswith("/") or ".." in Path(info.name).parts:
                    raise CtlError(f"{archive}: unexpected member {info.name!r}: not an uptrakitd backup", REFUSED)
                extracted = tar.extractfile(info)
                assert extracted is not None
                members[info.name] = extracted.read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise CtlError(f"{archive} is damaged: {e}", REFUSED) from None
    try:
        manifest = json.loads(members.pop("manifest.json"))
    except (KeyError, ValueError):
        raise CtlError(f"{archive} has no readable manifest.json: not an uptrakitd backup", REFUSED) from None
    if manifest.get("format") != FORMAT:
        raise CtlError(f"{archive}: format {manifest.get('format')!r}, not {FORMAT}", REFUSED)
    listed = manifest.get("members") or {}
    if set(listed) != set(members):
        raise CtlError(f"{archive}: members {sorted(set(members) ^ set(listed))} differ from its manifest", REFUSED)
    for name, data in members.items():
        if _sha256(data) != listed[name]:
            raise CtlError(f"{archive}: {name} does not match the sha256 in its manifest (damaged or altered)",
                           REFUSED)
    return manifest, members


def restore_backup(archive: Path, data_dir: Path) -> dict[str, Any]:
    """Write a new data dir from an archive; returns its manifest."""
    from ..store.common import migrations
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise CtlError(f"{data_dir} is not empty: restore into a new directory (the daemon's --data-dir then "
                       "points there)", USAGE)
    manifest, members = read_backup(archive)
    newest = migrations()[-1][0]
    if int(manifest.get("schema", 0)) > newest:
        raise CtlError(f"the backup's database is schema {manifest['schema']}, newer than this uptrakitd's "
                       f"({newest}): restore it with uptrakitd {manifest.get('version')} or later", REFUSED)
    if DATABASE not in members:
        raise CtlError(f"{archive} holds no SQLite database" + (": it is a PostgreSQL backup, restore it with "
                                                               "--database" if POSTGRESQL_DUMP in members else ""),
                       USAGE if POSTGRESQL_DUMP in members else REFUSED)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    (data_dir / "pki").mkdir(mode=0o700, exist_ok=True)
    for name, data in members.items():
        target = data_dir / name
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644 if name.endswith(".crt") else 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    conn = sqlite3.connect(str(data_dir / DATABASE))
    try:
        if conn.execute("SELECT 1 FROM settings WHERE key = ?", (RESTORE_MARKER,)).fetchone() is None:
            raise CtlError(f"{archive}: its database lacks the restore marker: not made by uptrakitctl backup",
                           REFUSED)
    finally:
        conn.close()
    return manifest


def summary(m: dict[str, Any]) -> str:
    gens = ", ".join(f"G{g['generation']} ({g['custody']}, CRL #{g['crl_number']})" for g in m["ca_generations"])
    return (f"backup {m['backup_id']} taken {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(m['taken_at']))} by "
            f"uptrakitd {m['version']} (schema {m['schema']}): CA {gens}; {m['certificates']} certificates "
            f"({m['revoked']} revoked), highest serial {m['highest_serial']}")


@click.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="the daemon's --data-dir (embedded SQLite); the daemon may keep running")
@click.option("--database", metavar="URL", help="instead: the controllers' PostgreSQL (postgresql://…; pg_dump)")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="archive to write")
@click.option("--include-clear-keys", is_flag=True,
              help="put clear CA key files in the backup (refused otherwise: seal them with uptrakitd-keys seal)")
def backup(data_dir: Path | None, database: str | None, out: Path, include_clear_keys: bool) -> None:
    """Take a consistent backup while the daemon runs (local: it needs the data dir or the database, not the
    API)."""
    if (data_dir is None) == (database is None):
        raise CtlError("give --data-dir (embedded SQLite) or --database (PostgreSQL)", USAGE)
    manifest = make_backup(data_dir, out, include_clear_keys) if data_dir is not None \
        else make_postgresql_backup(database or "", out)
    click.echo(f"wrote {out}: " + summary(manifest))
    sealed = [g["generation"] for g in manifest["ca_generations"] if g["custody"] == "sealed"]
    if sealed:
        click.echo("its CA keys are sealed: the restored controller needs the same --ca-key-encryption-key-file "
                   "(not in the backup; keep it apart from it)")
    if manifest["clear_keys_included"]:
        click.echo("WARNING: this backup holds CA private keys in the clear: guard it like the keys themselves")


@click.command()
@click.option("--in", "archive", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="archive made by uptrakitctl backup")
@click.option("--data-dir", type=click.Path(path_type=Path), help="a new or empty directory")
@click.option("--database", metavar="URL", help="instead: an empty PostgreSQL database (psql)")
def restore(archive: Path, data_dir: Path | None, database: str | None) -> None:
    """Make a new data dir (or fill an empty database) from a backup, its manifest checked (local). The first start
    from it moves every CRL number past any that may have been served since, and says so."""
    if (data_dir is None) == (database is None):
        raise CtlError("give --data-dir (embedded SQLite) or --database (PostgreSQL)", USAGE)
    if data_dir is not None:
        manifest = restore_backup(archive, data_dir)
        click.echo(f"restored into {data_dir}: " + summary(manifest))
        click.echo(f"start it: twistd -n uptrakit --data-dir {data_dir} (with the same flags or config as before)")
    else:
        manifest = restore_postgresql(archive, database or "")
        click.echo("restored into the database: " + summary(manifest))
        click.echo("start the controllers with --database pointing at it, and the same "
                   "--ca-key-encryption-key-file")
