"""`uptrakitctl backup` and `uptrakitctl restore`: a consistent copy of a controller's state taken while the daemon
runs, and a new data dir (or an empty PostgreSQL database) made from one (docs/deployment/backup.md).

The archive (archive.py: authenticated by a key file the operator keeps, checked before any byte of it is used)
holds the database (SQLite's online backup API, or `pg_dump --format=custom`) and, for SQLite, the PKI files a
start needs: the CA bundle, the server certificate and its key. Sealed CA keys are rows of the database and stay
sealed; keys in a PKCS#11 token stay there; clear CA key files are refused unless --include-clear-keys. Left out
on purpose: the CRLs (a restored controller signs new ones, with numbers past any it may have served:
uptrakitd/process/restored.py), `admin.token` (a secret: keep the admin tokens you use), the lock, and the copies
migrations keep.

A restore trusts nothing the archive says before its MAC verifies, and nothing the database says before it is
vetted (vetting.py): the schema is exactly the migrations', the audit chain verifies up to the head the backup
recorded, and the summary is read from the restored database. A restore that fails leaves nothing behind. The
copy of the database carries the restore marker; the live database never does.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import click

from .. import __version__
from uptrakitd.process.restored import RESTORE_MARKER, marker_sql
from ..store.database import SQLITE
from . import vetting
from .archive import Reader, read_all, write_archive
from .client import REFUSED, UNREACHABLE, USAGE, CtlError

DATABASE = "uptrakit.sqlite3"
POSTGRESQL_DUMP = "database.dump"
PKI_FILES = ["pki/ca.crt", "pki/server.crt", "pki/server.key"]
KEY_FILE_HELP = ("the key that authenticates the archive: the key-encryption key file "
                 "(--ca-key-encryption-key-file) or a backup key made the same way (head -c 32 /dev/urandom | "
                 "base64 > FILE, mode 0600); keep it apart from the backups")


def snapshot(data_dir: Path, target: Path) -> None:
    """SQLite's online backup of DATA_DIR's database into `target` (a new file), while the daemon may write."""
    source_path = data_dir / DATABASE
    if not source_path.is_file():
        raise CtlError(f"{data_dir} holds no {DATABASE}: is it the daemon's --data-dir? (With PostgreSQL, back "
                       "up with --database: docs/deployment/backup.md)", USAGE)
    _owned_regular(source_path, _owner(data_dir))
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
    """What the manifest says of a database copy (vetting.facts)."""
    conn = sqlite3.connect(str(database))
    conn.row_factory = sqlite3.Row
    try:
        return vetting.facts(conn, SQLITE.schema_version(conn))
    finally:
        conn.close()


def _owner(data_dir: Path) -> int:
    try:
        return data_dir.stat().st_uid
    except OSError as e:
        raise CtlError(f"cannot read {data_dir}: {e.strerror}", USAGE) from None


def _owned_regular(path: Path, uid: int) -> None:
    """CtlError unless `path` is a regular file (not a link) owned by the data dir's owner."""
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != uid:
        raise CtlError(f"{path} is not a regular file owned by the data dir's owner (uid {uid}): a link or another "
                       "user's file is never copied into a backup", REFUSED)


def _copy_member(source: Path, target: Path, uid: int) -> None:
    """Copy a data-dir file opened with O_NOFOLLOW, checked on the open descriptor (a link swapped in is refused)."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise CtlError(f"{source} cannot be read safely ({e.strerror}): a link is never followed", REFUSED) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != uid:
            raise CtlError(f"{source} is not a regular file owned by the data dir's owner (uid {uid}): a link or "
                           "another user's file is never copied into a backup", REFUSED)
        with open(target, "wb") as out:
            shutil.copyfileobj(f, out)


def make_backup(data_dir: Path, out: Path, key_file: Path, include_clear_keys: bool = False) -> dict[str, Any]:
    """Write the archive `out` (atomically, mode 0600), authenticated with `key_file`; returns its manifest."""
    if out.exists() or out.is_symlink():
        raise CtlError(f"{out} exists: name a new file", USAGE)
    uid = _owner(data_dir)
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
        sources = {DATABASE: copy}
        for name in PKI_FILES + [f"pki/{g['key_file']}" for g in clear]:
            path = data_dir / name
            if os.path.lexists(path):
                target = Path(work) / name.replace("/", "_")
                _copy_member(path, target, uid)
                sources[name] = target
        return write_archive(out, _manifest(backup_id, taken_at, facts, data_dir=str(data_dir.resolve()),
                                            clear_keys_included=bool(clear)), sources, key_file)


def _manifest(backup_id: str, taken_at: int, facts: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"version": __version__, "backup_id": backup_id, "taken_at": taken_at, **more, **facts}


def _refuse_password_in_url(url: str) -> None:
    from ..config import url_has_password
    if url_has_password(url):
        raise CtlError("the database URL carries a password: on a command line every user of the host reads it "
                       "(ps, /proc). Put it in a passfile (~/.pgpass, PGPASSFILE or ?passfile=) or PGPASSWORD",
                       USAGE)


def make_postgresql_backup(database: str, out: Path, key_file: Path) -> dict[str, Any]:
    """pg_dump (its custom format, which no client interprets as commands) of the controllers' database in the
    snapshot the manifest's facts were read in; sealed keys stay sealed (a PostgreSQL deployment has no clear CA
    key). The restore marker is set by the restore, in the restored database."""
    _refuse_password_in_url(database)
    if out.exists() or out.is_symlink():
        raise CtlError(f"{out} exists: name a new file", USAGE)
    pg_dump = _program("pg_dump")
    conn = _pg_connect(database)
    with tempfile.TemporaryDirectory(prefix="uptrakit-backup-") as work:
        dump = Path(work) / POSTGRESQL_DUMP
        try:   # one transaction: its snapshot is the one pg_dump reads
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            snapshot_id = conn.execute("SELECT pg_export_snapshot() AS s").fetchone()["s"]
            version = conn.execute("SELECT max(version) AS v FROM schema_version").fetchone()["v"]
            facts = vetting.facts(conn, int(version or 0))
            done = subprocess.run([pg_dump, "--format=custom", "--no-owner", "--no-privileges",
                                   f"--snapshot={snapshot_id}", "--file", str(dump), "--dbname", database],
                                  capture_output=True)
            if done.returncode != 0:
                raise CtlError(f"pg_dump failed: {done.stderr.decode(errors='replace').strip()}", REFUSED)
        finally:
            conn.close()
        return write_archive(out, _manifest(str(uuid.uuid4()), int(time.time()), facts, engine="postgresql",
                                            clear_keys_included=False), {POSTGRESQL_DUMP: dump}, key_file)


def _program(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise CtlError(f"{name} is not installed (apt-get install postgresql-client)", USAGE)
    return found


def _pg_connect(database: str) -> Any:
    from ..store import postgresql
    from ..store.common import StoreError
    try:
        return postgresql.connect(database)   # speaks the store's `?` style; its errors hide the password
    except StoreError as e:
        raise CtlError(str(e), UNREACHABLE) from None


def _vet(conn: Any, manifest: dict[str, Any], schema: int) -> dict[str, Any]:
    """The checks every restore makes of the restored database; returns its facts (what the summary prints)."""
    from ..store.common import migrations
    newest = migrations()[-1][0]
    if schema > newest:
        raise CtlError(f"the backup's database is schema {schema}, newer than this uptrakitd's ({newest}): "
                       f"restore it with uptrakitd {manifest.get('version')} or later", REFUSED)
    facts = vetting.facts(conn, schema)
    if conn.execute("SELECT 1 FROM settings WHERE key = ?", (RESTORE_MARKER,)).fetchone() is None \
            and manifest.get("engine") != "postgresql":
        raise CtlError("the backup's database lacks the restore marker: not made by uptrakitctl backup", REFUSED)
    audit = vetting.audit_chain(conn, manifest.get("audit_head") or {"seq": 0}, schema)
    facts["audit"] = audit
    differ = [key for key in ("schema", "certificates", "revoked", "highest_serial", "crl_numbers", "audit_head")
              if facts[key] != manifest.get(key)]
    if differ:
        raise CtlError(f"the backup's database does not hold what its manifest recorded ({', '.join(differ)})",
                       REFUSED)
    return facts


def restore_postgresql(archive: Path, database: str, key_file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a --database backup into an empty database with pg_restore (one transaction), then vet it and set the
    restore marker; a database that fails is emptied again. Returns (manifest, the restored database's facts)."""
    _refuse_password_in_url(database)
    pg_restore = _program("pg_restore")
    with tempfile.TemporaryDirectory(prefix="uptrakit-restore-") as work, _opened(archive, key_file) as reader:
        manifest = reader.manifest
        if POSTGRESQL_DUMP not in manifest["members"]:
            raise CtlError(f"{archive} is a backup of an embedded SQLite data dir: restore it with --data-dir", USAGE)
        dump = Path(work) / POSTGRESQL_DUMP
        for name, copy in reader.members():
            with open(dump if name == POSTGRESQL_DUMP else os.devnull, "wb") as f:
                copy(f)
        listing = subprocess.run([pg_restore, "--list", str(dump)], capture_output=True)
        if listing.returncode != 0:
            raise CtlError(f"pg_restore cannot read the dump: {listing.stderr.decode(errors='replace').strip()}",
                           REFUSED)
        vetting.pg_entries(listing.stdout.decode("utf-8", "replace"), _tables())
        conn = _pg_connect(database)
        try:
            tables = conn.execute("SELECT count(*) AS n FROM information_schema.tables WHERE table_schema = 'public'"
                                  ).fetchone()["n"]
            if tables:
                raise CtlError("the target database is not empty: restore into a new one (createdb), then point the "
                               "controllers' --database at it", USAGE)
            loaded = subprocess.run([pg_restore, "--no-owner", "--no-privileges", "--single-transaction",
                                     "--exit-on-error", "--dbname", database, str(dump)], capture_output=True)
            if loaded.returncode != 0:
                raise CtlError(f"pg_restore failed (nothing was loaded): "
                               f"{loaded.stderr.decode(errors='replace').strip()}", REFUSED)
            try:
                version = conn.execute("SELECT max(version) AS v FROM schema_version").fetchone()["v"]
                vetting.postgresql_schema(conn, int(version or 0))
                facts = _vet(conn, manifest, int(version or 0))
                conn.execute(*marker_sql(manifest["backup_id"], int(manifest["taken_at"])))
            except BaseException:
                _empty_public_schema(conn)
                raise
        finally:
            conn.close()
    return manifest, facts


def _tables() -> set[str]:
    conn = sqlite3.connect(":memory:")
    try:
        from ..store.common import migrations
        for _, _, sql in migrations():
            conn.executescript(sql)
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} | {"schema_version"}
    finally:
        conn.close()


def _empty_public_schema(conn: Any) -> None:
    """Drop what a failed restore loaded (the target was empty before it): tables, sequences, views, routines."""
    for r in conn.execute("SELECT c.relname AS name, c.relkind AS kind FROM pg_class c JOIN pg_namespace n ON "
                          "n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', "
                          "'S', 'f')").fetchall():
        kind = {"r": "TABLE", "p": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW", "S": "SEQUENCE",
                "f": "FOREIGN TABLE"}[r["kind"]]
        conn.execute(f'DROP {kind} IF EXISTS public."{r["name"]}" CASCADE')
    for r in conn.execute("SELECT p.oid::regprocedure::text AS name FROM pg_proc p JOIN pg_namespace n ON "
                          "n.oid = p.pronamespace WHERE n.nspname = 'public'").fetchall():
        conn.execute(f"DROP ROUTINE IF EXISTS {r['name']} CASCADE")


class _opened:
    """An authenticated archive, closed after use."""

    def __init__(self, archive: Path, key_file: Path) -> None:
        self.reader = Reader(archive, key_file)

    def __enter__(self) -> Reader:
        return self.reader

    def __exit__(self, *exc: Any) -> None:
        self.reader.close()


def read_backup(archive: Path, key_file: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and members of an archive, authenticated and each member checked (in memory)."""
    return read_all(archive, key_file)


def restore_backup(archive: Path, data_dir: Path, key_file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write a new data dir from an archive: into a private directory beside it, vetted, then renamed into place,
    so a restore that fails leaves nothing. Returns (manifest, the restored database's facts)."""
    if data_dir.is_symlink() or (data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir()))):
        raise CtlError(f"{data_dir} is not empty: restore into a new directory (the daemon's --data-dir then "
                       "points there)", USAGE)
    parent = data_dir.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.restoring-", dir=parent))
    except OSError as e:
        raise CtlError(f"cannot write in {parent}: {e.strerror or e}", USAGE) from None
    try:
        with _opened(archive, key_file) as reader:
            manifest = reader.manifest
            if DATABASE not in manifest["members"]:
                raise CtlError(f"{archive} holds no SQLite database" + (
                    ": it is a PostgreSQL backup, restore it with --database"
                    if POSTGRESQL_DUMP in manifest["members"] else ""),
                    USAGE if POSTGRESQL_DUMP in manifest["members"] else REFUSED)
            keys = {f"pki/{g.get('key_file')}" for g in manifest.get("ca_generations", []) if g.get("key_file")}
            if set(manifest["members"]) - {DATABASE, *PKI_FILES} - keys:
                raise CtlError(f"{archive}: its manifest names members a backup never holds", REFUSED)
            (work / "pki").mkdir(mode=0o700)
            for name, copy in reader.members():
                target = work / name
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o644 if name.endswith(".crt") else 0o600)
                with os.fdopen(fd, "wb") as f:
                    copy(f)
                    f.flush()
                    os.fsync(f.fileno())
        conn = sqlite3.connect(str(work / DATABASE))
        conn.row_factory = sqlite3.Row
        try:
            schema = SQLITE.schema_version(conn)
            vetting.sqlite_schema(conn, schema)
            facts = _vet(conn, manifest, schema)
        except sqlite3.DatabaseError as e:
            raise CtlError(f"the backup's database cannot be read: {e}", REFUSED) from None
        finally:
            conn.close()
        if data_dir.exists():
            data_dir.rmdir()   # (empty, checked above)
        os.replace(work, data_dir)
        os.chmod(data_dir, 0o700)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest, facts


def summary(m: dict[str, Any], facts: dict[str, Any] | None = None) -> str:
    """One line on a backup: its id and time from the (authenticated) manifest, its figures from `facts` (the
    restored database) when given."""
    f = facts or m
    gens = ", ".join(f"G{g['generation']} ({g['custody']}, CRL #{g['crl_number']})" for g in f["ca_generations"])
    audit = f.get("audit")
    trail = f"; audit trail verified: {audit['entries']} entries, {audit['checkpoints']} signed checkpoint(s)" \
        if audit else ""
    return (f"backup {m['backup_id']} taken {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(m['taken_at']))} by "
            f"uptrakitd {m['version']} (schema {f['schema']}): CA {gens}; {f['certificates']} certificates "
            f"({f['revoked']} revoked), highest serial {f['highest_serial']}{trail}")


def _key_option(f: Any) -> Any:
    return click.option("--key-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
                        help=KEY_FILE_HELP)(f)


@click.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="the daemon's --data-dir (embedded SQLite); the daemon may keep running")
@click.option("--database", metavar="URL", help="instead: the controllers' PostgreSQL (postgresql://…, no password "
                                                "in it; pg_dump)")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="archive to write")
@_key_option
@click.option("--include-clear-keys", is_flag=True,
              help="put clear CA key files in the backup (refused otherwise: seal them with uptrakitd-keys seal)")
def backup(data_dir: Path | None, database: str | None, out: Path, key_file: Path, include_clear_keys: bool) -> None:
    """Take a consistent, authenticated backup while the daemon runs (local: it needs the data dir or the
    database, not the API)."""
    if (data_dir is None) == (database is None):
        raise CtlError("give --data-dir (embedded SQLite) or --database (PostgreSQL)", USAGE)
    manifest = make_backup(data_dir, out, key_file, include_clear_keys) if data_dir is not None \
        else make_postgresql_backup(database or "", out, key_file)
    click.echo(f"wrote {out}: " + summary(manifest))
    click.echo(f"it is authenticated with the key in {key_file} (key id {manifest['key_id']}): a restore needs "
               "that file; keep it apart from the backups")
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
@click.option("--database", metavar="URL", help="instead: an empty PostgreSQL database (pg_restore; no password in "
                                                "the URL)")
@_key_option
def restore(archive: Path, data_dir: Path | None, database: str | None, key_file: Path) -> None:
    """Make a new data dir (or fill an empty database) from a backup (local). Nothing of it is used before its MAC
    verifies; the restored database must be exactly what the migrations make and its audit trail must verify, or
    nothing is left behind. The first start from it moves every CRL number past any that may have been served
    since, and says so."""
    if (data_dir is None) == (database is None):
        raise CtlError("give --data-dir (embedded SQLite) or --database (PostgreSQL)", USAGE)
    if data_dir is not None:
        manifest, facts = restore_backup(archive, data_dir, key_file)
        click.echo(f"restored into {data_dir}: " + summary(manifest, facts))
        click.echo(f"start it: twistd -n uptrakit --data-dir {data_dir} (with the same flags or config as before)")
    else:
        manifest, facts = restore_postgresql(archive, database or "", key_file)
        click.echo("restored into the database: " + summary(manifest, facts))
        click.echo("start the controllers with --database pointing at it, and the same "
                   "--ca-key-encryption-key-file")
