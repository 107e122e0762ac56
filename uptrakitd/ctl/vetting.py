"""What a restore checks in a restored database before it reports success, for both engines: its schema is
exactly what the migrations create (no trigger, view, function, table or column of anyone else's), its figures
are read from it (never from the manifest), and its audit chain verifies, up to the head the backup recorded,
against the CA-signed checkpoints it holds (docs/security.md, "What a backup proves")."""
from __future__ import annotations

import sqlite3
from typing import Any

from cryptography import x509

from uptrakitd.audit.verify import Broken, verify
from ..store import audit as stored_audit
from ..store.common import migrations
from .client import REFUSED, CtlError

AUDIT_SCHEMA = 5   # the migration that made the audit trail (005-audit.sql)
# what a pg_dump of the schema holds (`pg_restore --list`); anything else (a trigger, a function, a view, an
# extension, a policy …) is refused before a statement of the dump runs
PG_ENTRY_KINDS = ("SEQUENCE OWNED BY", "SEQUENCE SET", "FK CONSTRAINT", "TABLE DATA", "CONSTRAINT", "SEQUENCE",
                  "DEFAULT", "INDEX", "TABLE")


def _custody(row: Any) -> str:
    if row["external"]:
        return "external"
    if (row["key_file"] or "").startswith("pkcs11:"):
        return "pkcs11"
    return "file" if row["key_file"] else "sealed"


def facts(conn: Any, schema: int) -> dict[str, Any]:
    """What the manifest and the restore's summary say of a database: schema, CA generations, serials, CRL numbers,
    the audit chain's head."""
    generations = [{"generation": r["generation"], "custody": _custody(r), "crl_number": r["crl_number"],
                    "key_file": r["key_file"] if _custody(r) == "file" else None}
                   for r in conn.execute("SELECT * FROM ca_generations ORDER BY generation").fetchall()]
    serials = [r["serial"] for r in conn.execute("SELECT serial FROM certificates").fetchall()]
    revoked = conn.execute("SELECT count(*) AS n FROM certificates WHERE revoked_at IS NOT NULL").fetchone()["n"]
    seq, digest = stored_audit.head(conn) if schema >= AUDIT_SCHEMA else (0, stored_audit.GENESIS)
    return {"schema": schema, "ca_generations": generations, "certificates": len(serials), "revoked": int(revoked),
            "highest_serial": max(serials, key=lambda s: int(s, 16)) if serials else None,
            "crl_numbers": {str(g["generation"]): g["crl_number"] for g in generations},
            "audit_head": {"seq": seq, "hash": digest}}


def _sqlite_objects(conn: Any) -> set[tuple[str, str, str, str]]:
    return {(r[0], r[1], r[2], " ".join((r[3] or "").split()))
            for r in conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()}


def sqlite_schema(conn: Any, version: int) -> None:
    """CtlError naming what differs when `conn`'s schema is not what migrations 1..version make."""
    from ..store.database import connect
    reference = connect(":memory:")   # type: ignore[arg-type]
    try:
        from ..store.common import migrate
        migrate(reference, [m for m in migrations() if m[0] <= version])
        expected = _sqlite_objects(reference)
    finally:
        reference.close()
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        found = _sqlite_objects(conn)
    except sqlite3.DatabaseError as e:
        raise CtlError(f"the backup's database is not a readable SQLite database: {e}", REFUSED) from None
    if integrity != "ok":
        raise CtlError(f"the backup's database fails SQLite's integrity check: {integrity}", REFUSED)
    _differences({(t, n): sql for t, n, _, sql in expected}, {(t, n): sql for t, n, _, sql in found})


def _differences(expected: dict[Any, Any], found: dict[Any, Any]) -> None:
    problems = [f"unknown {kind} {name!r}" for kind, name in sorted(set(found) - set(expected))] + \
        [f"missing {kind} {name!r}" for kind, name in sorted(set(expected) - set(found))] + \
        [f"{kind} {name!r} differs from what the migrations create" for kind, name in sorted(set(found) & set(expected))
         if found[kind, name] != expected[kind, name]]
    if problems:
        raise CtlError("the backup's database is not what uptrakitd's migrations create, so it was changed by "
                       "someone else: " + "; ".join(problems[:10]) + ("; …" if len(problems) > 10 else ""), REFUSED)


def _pg_objects(conn: Any, schema: str) -> dict[tuple[str, str], Any]:
    found: dict[tuple[str, str], Any] = {}
    kinds = {"r": "table", "p": "table", "v": "view", "m": "materialized view", "S": "sequence", "i": "index",
             "f": "foreign table", "c": "type"}
    for r in conn.execute("SELECT c.relname AS name, c.relkind AS kind, c.relrowsecurity AS rls FROM pg_class c "
                          "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = ?", (schema,)).fetchall():
        found[kinds.get(r["kind"], f"relation ({r['kind']})"), r["name"]] = bool(r["rls"])
    for r in conn.execute("SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
                          "WHERE table_schema = ?", (schema,)).fetchall():
        found["column", f"{r['table_name']}.{r['column_name']}"] = (r["data_type"], r["is_nullable"])
    for sql, kind in (("SELECT t.tgname AS name FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN "
                       "pg_namespace n ON n.oid = c.relnamespace WHERE NOT t.tgisinternal AND n.nspname = ?", "trigger"),
                      ("SELECT p.proname AS name FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                       "WHERE n.nspname = ?", "function"),
                      ("SELECT rulename AS name FROM pg_rules WHERE schemaname = ?", "rule"),
                      ("SELECT policyname AS name FROM pg_policies WHERE schemaname = ?", "policy"),
                      ("SELECT t.typname AS name FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
                       "WHERE n.nspname = ? AND t.typtype IN ('e', 'd', 'r', 'm')", "type")):
        for r in conn.execute(sql, (schema,)).fetchall():
            found[kind, r["name"]] = True
    return found


def postgresql_schema(conn: Any, version: int) -> None:
    """The same check for PostgreSQL's `public` schema: the reference is made by the migrations in a scratch schema
    inside a transaction that is rolled back, so nothing of it remains."""
    from ..store.postgresql import POSTGRES
    scratch = "uptrakit_vet_reference"
    conn.execute("BEGIN")
    try:
        conn.execute(f"CREATE SCHEMA {scratch}")
        conn.execute(f"SET LOCAL search_path TO {scratch}")
        POSTGRES.schema_version(conn)
        for _, _, sql in [m for m in migrations(POSTGRES.schema_folder) if m[0] <= version]:
            for statement in POSTGRES.statements(sql):
                conn.execute(statement)
        expected = _pg_objects(conn, scratch)
        found = _pg_objects(conn, "public")
        events = [r["evtname"] for r in conn.execute("SELECT evtname FROM pg_event_trigger").fetchall()]
    finally:
        conn.execute("ROLLBACK")
    if events:
        raise CtlError(f"the database has event triggers {events}: uptrakitd makes none; refusing it", REFUSED)
    _differences(expected, found)


def pg_entries(listing: str, tables: set[str]) -> None:
    """CtlError unless every entry of `pg_restore --list` is a kind a dump of uptrakitd's schema holds, on one of
    its tables: checked before the dump is loaded, so nothing of anyone else's runs at all."""
    for line in listing.splitlines():
        if not line.strip() or line.startswith(";"):
            continue
        words = line.split()
        rest = " ".join(words[3:]) if len(words) > 3 else ""   # "<id>; <tableoid> <oid> KIND schema name owner"
        kind = next((k for k in PG_ENTRY_KINDS if rest.startswith(k + " ")), None)
        if kind is None:
            raise CtlError(f"the backup's dump holds an entry uptrakitd's schema has not ({rest[:80]!r}): refused "
                           "before anything was loaded", REFUSED)
        schema, name = (rest[len(kind) + 1:].split() + ["", ""])[:2]
        if schema != "public" or (kind in ("TABLE", "TABLE DATA") and name not in tables):
            raise CtlError(f"the backup's dump holds {kind} {schema}.{name}, which uptrakitd's schema has not: "
                           "refused before anything was loaded", REFUSED)


def audit_chain(conn: Any, head: dict[str, Any], schema: int) -> dict[str, Any]:
    """Verify the restored trail (uptrakit-audit verify's rules) up to the head the backup recorded, with the CA
    certificates of the database; CtlError naming the first bad entry. (A database older than the trail has none.)"""
    if schema < AUDIT_SCHEMA:
        return {"entries": 0, "checkpoints": 0, "covered_by_checkpoint": 0, "last_hash": stored_audit.GENESIS}
    cas = [x509.load_pem_x509_certificate(r["cert_pem"].encode())
           for r in conn.execute("SELECT cert_pem FROM ca_generations").fetchall()]
    try:
        return verify(stored_audit.entries(conn), cas, (int(head["seq"]), str(head["hash"])) if head["seq"] else None,
                      require_checkpoint=False)
    except Broken as e:
        raise CtlError(f"the backup's audit trail does not verify ({e}): refusing it", REFUSED) from None
