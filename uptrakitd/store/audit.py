"""The audit trail's rows (uptrakitd/audit/__init__.py says what they mean). `append` runs inside the transaction of the
change it records; the chain's head is read under the engine's lock, so controllers sharing a database write
one chain."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from .common import Connection

GENESIS = "0" * 64
FIELDS = ("seq", "at", "controller", "actor", "action", "object", "details", "client", "request_id", "prev_hash")


def canonical(entry: dict[str, Any]) -> bytes:
    """The bytes a row's hash covers: its fields but `hash`, as sorted, compact JSON (UTF-8)."""
    return json.dumps({k: entry[k] for k in FIELDS}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256(previous hash ‖ canonical JSON of the entry), hex."""
    return hashlib.sha256(bytes.fromhex(entry["prev_hash"]) + canonical(entry)).hexdigest()


def _row(row: Any) -> dict[str, Any]:
    entry = {k: row[k] for k in FIELDS + ("hash",)}
    for key in ("actor", "object", "details"):
        entry[key] = json.loads(entry[key])
    entry["seq"], entry["at"] = int(entry["seq"]), int(entry["at"])
    return entry


def head(conn: Connection) -> tuple[int, str]:
    """(last sequence number, its hash), (0, GENESIS) for an empty trail."""
    row = conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    return (int(row["seq"]), row["hash"]) if row is not None else (0, GENESIS)


def append(conn: Connection, at: int, controller_id: str, actor: dict[str, Any], action: str, obj: dict[str, Any],
           details: dict[str, Any], client: str | None = None, request_id: str | None = None) -> dict[str, Any]:
    """Chain one entry to the trail in the caller's transaction; returns it (with seq and hash)."""
    conn.engine.serialize(conn, "audit")
    seq, prev = head(conn)
    entry = {"seq": seq + 1, "at": int(at), "controller": controller_id, "actor": actor, "action": action,
             "object": obj, "details": details, "client": client, "request_id": request_id, "prev_hash": prev}
    entry["hash"] = entry_hash(entry)
    conn.execute("INSERT INTO audit_log (seq, at, controller, actor, action, object, details, client, request_id, "
                 "prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (entry["seq"], entry["at"], controller_id, json.dumps(actor, sort_keys=True), action,
                  json.dumps(obj, sort_keys=True), json.dumps(details, sort_keys=True), client, request_id, prev,
                  entry["hash"]))
    return entry


def page(conn: Connection, before: int | None, limit: int, action: str | None = None, actor: str | None = None,
         obj: str | None = None, since: int | None = None, until: int | None = None) -> list[dict[str, Any]]:
    """Newest first, below sequence `before`; `actor`/`obj` match an id or name anywhere in that field."""
    where: list[str] = []
    params: list[Any] = []
    if before is not None:
        where.append("seq < ?")
        params.append(before)
    if action:
        where.append("action = ?")
        params.append(action)
    if since is not None:
        where.append("at >= ?")
        params.append(since)
    if until is not None:
        where.append("at <= ?")
        params.append(until)
    for column, needle in (("actor", actor), ("object", obj)):
        if needle:
            where.append(f"{column} LIKE ?")
            params.append("%" + json.dumps(needle)[1:-1].replace("%", "").replace("_", "") + "%")
    sql = "SELECT * FROM audit_log" + (" WHERE " + " AND ".join(where) if where else "")
    return [_row(r) for r in conn.execute(sql + " ORDER BY seq DESC LIMIT ?", (*params, limit)).fetchall()]


def after(conn: Connection, seq: int, limit: int) -> list[dict[str, Any]]:
    """Oldest first, above sequence `seq` (the export)."""
    rows = conn.execute("SELECT * FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)).fetchall()
    return [_row(r) for r in rows]


def export_line(entry: dict[str, Any]) -> str:
    """An entry as the export writes it (and as the verifier requires it): sorted keys, no spaces, ASCII."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"))


def continues_from(conn: Connection, seq: int, digest: str, batch: int = 1000) -> tuple[str | None, int, str, bool]:
    """One step of checking that the stored chain continues from entry `seq` with hash `digest` (Certificate
    Transparency's consistency: the trail a controller signed last is a prefix of today's): (what is wrong or
    None, the last entry checked and its hash, whether the head was reached). A step reads at most `batch`
    entries, so other store operations run between steps."""
    row = conn.execute("SELECT hash FROM audit_log WHERE seq = ?", (seq,)).fetchone()
    if row is None:
        return f"entry {seq}, which a checkpoint this controller signed covers, is gone", seq, digest, True
    if row["hash"] != digest:
        return f"entry {seq} no longer has the hash a checkpoint this controller signed covers", seq, digest, True
    previous_seq, previous = seq, digest
    found = after(conn, seq, batch)
    for entry in found:
        if entry["seq"] != previous_seq + 1 or entry["prev_hash"] != previous or entry_hash(entry) != entry["hash"]:
            return f"the chain breaks at entry {previous_seq + 1}", previous_seq, previous, True
        previous_seq, previous = entry["seq"], entry["hash"]
    return None, previous_seq, previous, len(found) < batch


def entries(conn: Connection, batch: int = 1000) -> Any:
    """Every entry, oldest first, read a batch at a time (the restore's check)."""
    seq = 0
    while True:
        found = after(conn, seq, batch)
        if not found:
            return
        yield from found
        seq = found[-1]["seq"]


def prune(conn: Connection, cutoff: int) -> tuple[int, int] | None:
    """Delete whole checkpointed segments older than `cutoff` (unix seconds): every entry before the newest
    checkpointed entry written before `cutoff`, which is kept (the checkpoint vouches for its hash, so an export
    that starts with it still verifies). (first sequence kept, entries deleted), or None when nothing is due."""
    checkpoints = conn.execute("SELECT details FROM audit_log WHERE action = 'audit.checkpoint' ORDER BY seq DESC"
                               ).fetchall()
    for row in checkpoints:
        covered = int(json.loads(row["details"])["sequence"])
        written = conn.execute("SELECT at FROM audit_log WHERE seq = ?", (covered,)).fetchone()
        if written is None:
            return None   # pruned there already
        if int(written["at"]) < cutoff:
            gone = conn.execute("SELECT count(*) AS n FROM audit_log WHERE seq < ?", (covered,)).fetchone()["n"]
            if not gone:
                return None
            conn.execute("DELETE FROM audit_log WHERE seq < ?", (covered,))
            return covered, int(gone)
    return None


def since_checkpoint(conn: Connection) -> tuple[int, int | None, int]:
    """(entries after the last checkpoint, the time of the oldest of them, the last checkpoint's seq or 0)."""
    row = conn.execute("SELECT max(seq) AS seq FROM audit_log WHERE action = 'audit.checkpoint'").fetchone()
    last = int(row["seq"] or 0)
    row = conn.execute("SELECT count(*) AS n, min(at) AS oldest FROM audit_log WHERE seq > ?", (last,)).fetchone()
    return int(row["n"]), (int(row["oldest"]) if row["oldest"] is not None else None), last
