"""Break-glass: what `uptrakitctl` does with the data dir (or the database) itself and no API, for when no admin
token is left (after a restore, say: a backup leaves `admin.token` out). Each change is audited in its
transaction, by a `local` actor: the command, the real user and uid."""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from ..audit import local_actor, with_entry
from ..registry.tokens import new_token, token_hash
from ..store import common, database, postgresql, tokens as stored_tokens
from .client import REFUSED, UNREACHABLE, USAGE, CtlError


def _open(data_dir: Path | None, url: str | None, controller_id: str) -> Any:
    conn: Any
    if url:
        from ..config import url_has_password
        if url_has_password(url):
            raise CtlError("the database URL carries a password: use a passfile (?passfile=, PGPASSFILE) or "
                           "PGPASSWORD", USAGE)
        try:
            conn = postgresql.connect(url, controller_id)   # (its writes reach the other controllers)
        except common.StoreError as e:
            raise CtlError(str(e), UNREACHABLE) from None
    else:
        assert data_dir is not None
        path = database_path = data_dir / "uptrakit.sqlite3"
        if not path.is_file():
            raise CtlError(f"{data_dir} holds no uptrakit.sqlite3: is it the daemon's --data-dir?", USAGE)
        if not os.access(path, os.W_OK) or not os.access(data_dir, os.W_OK):
            raise CtlError(f"no write access to {database_path}: run this as the daemon's user or root", REFUSED)
        conn = database.connect(path)
    newest = common.migrations(conn.engine.schema_folder)[-1][0]
    have = common.schema_version(conn)
    if have != newest:
        common.close_quietly(conn)
        raise CtlError(f"the database is at schema {have}, this uptrakitctl writes schema {newest}: use the "
                       "uptrakitctl of the daemon's release (or start that daemon once)", REFUSED)
    return conn


def create_admin_token(data_dir: Path | None, url: str | None, name: str, role: str) -> dict[str, Any]:
    """A new admin (or read) token written straight into the database; returns it once ({token, id, name})."""
    controller = f"{socket.gethostname()}-uptrakitctl"
    conn = _open(data_dir, url, controller)
    token, token_id = new_token("upt_admin_"), str(uuid.uuid4())
    try:
        common.transaction(conn, with_entry(stored_tokens.insert_admin_token, controller, "admin_token.created",
                                            {"kind": "admin_token", "id": token_id},
                                            {"name": name, "permissions": [role], "break_glass": True},
                                            local_actor("uptrakitctl tokens admin create")),
                           token_id, name, token_hash(token), json.dumps([role]), int(time.time()))
    finally:
        common.close_quietly(conn)
    return {"token": token, "id": token_id, "name": name, "permissions": [role]}
