"""`uptrakitd-keys seal`: move an embedded-SQLite data dir's CA keys from clear files into sealed rows.

Run with the daemon stopped (the data-dir lock says so otherwise). Crash-safe at every step: each key is
first sealed into its row, the clear file still in place (committed); then, key by key, the sealed copy is
opened and compared with the file, the file is removed (and the directory synced), and only then does the
row stop naming it. A crash anywhere leaves every generation with a clear file, a sealed copy, or both, and
the daemon starts with the key-encryption key (sealed copies first) or, until the first file is gone,
without it. Start the daemon with `--ca-key-encryption-key-file` afterwards.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable

from ..audit import local_actor, with_entry
from uptrakitd.process.datadir_lock import DataDirInUse, DataDirLock
from ..store import open_database, sqlite_path, transaction
from ..store import ca_generations
from .files import PkiFiles
from .keys import KeyStoreError, SealedKeys, load_keks
from .signer import KeySigner


class SealError(Exception):
    """The data dir cannot be sealed; the message says why in one line."""


def seal_data_dir(data_dir: Path, kek_file: Path, fault: Callable[[str], None] = lambda step: None) -> list[int]:
    """Seal every managed CA generation whose key is a clear file; returns the generations sealed.
    `fault(step)` is called after each step (tests raise there to stop at a precise point)."""
    if not sqlite_path(data_dir).exists():
        raise SealError(f"{data_dir} holds no uptrakitd database (uptrakit.sqlite3): is it the --data-dir?")
    try:
        keys = SealedKeys(load_keks(kek_file))
    except KeyStoreError as e:
        raise SealError(str(e)) from None
    _readable_by_the_daemon(kek_file, data_dir)
    lock = DataDirLock(data_dir)
    try:
        lock.acquire()
    except DataDirInUse as e:
        raise SealError(str(e)) from None
    files = PkiFiles(data_dir)
    conn = open_database(data_dir)
    # on the audit trail, in the transaction of each change: who ran the command where (the daemon is stopped)
    controller = f"{socket.gethostname()}-uptrakitd-keys"
    actor = local_actor("uptrakitd-keys seal")
    try:
        clear = [row for row in transaction(conn, ca_generations.load_all)
                 if not row["external"] and row["key_file"]]
        for row in clear:   # 1: a sealed copy beside each clear file
            if row["key_sealed"] and not keys.needs_resealing(row["key_sealed"]):
                continue
            key = _clear_key(files, row)
            sealed = keys.seal(row["generation"], key)
            transaction(conn, with_entry(ca_generations.reseal, controller, "ca_key.sealed", _object(row["generation"]),
                                         {"kek": sealed.split(":")[1], "key_file": row["key_file"]}, actor),
                        row["generation"], sealed)
            fault("sealed")
        for row in transaction(conn, ca_generations.load_all):   # 2: the clear files go, one by one
            if row["external"] or not row["key_file"]:
                continue
            generation, path = row["generation"], files.dir / row["key_file"]
            sealed = keys.load(generation, "", row["key_sealed"])
            if path.exists() and not _same_key(sealed, files.load_ca_key(row["key_file"])):
                raise SealError(f"the sealed copy of CA generation {generation} does not match {path}: nothing removed")
            path.unlink(missing_ok=True)
            _sync_dir(files.dir)
            fault("removed")
            transaction(conn, with_entry(ca_generations.forget_key_file, controller, "ca_key.file_removed",
                                         _object(generation), {"key_file": row["key_file"]}, actor), generation)
            fault("forgotten")
        return [row["generation"] for row in clear]
    finally:
        conn.close()
        lock.release()


def _schema(data_dir: Path) -> int | None:
    """The schema version of a data dir's database (None when there is none to read)."""
    import sqlite3

    from ..store.database import SQLITE
    path = sqlite_path(data_dir)
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return SQLITE.schema_version(conn)
        finally:
            conn.close()
    except sqlite3.Error:
        return None


def _object(generation: int) -> dict[str, str]:
    return {"kind": "ca_generation", "id": str(generation)}


def _readable_by_the_daemon(kek_file: Path, data_dir: Path) -> None:
    """SealError unless the daemon (the data dir's owner) can read the KEK: once the clear files are gone, a
    daemon that cannot read it cannot start (under systemd: a restart loop). Checked before anything changes."""
    import pwd
    owner = data_dir.stat().st_uid
    kek_owner = os.stat(kek_file).st_uid
    if owner in (0, kek_owner):
        return   # (load_keks already refused a file readable by others: only its owner, or root, reads it)
    try:
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        name = str(owner)
    raise SealError(f"{kek_file} is owned by uid {kek_owner}, mode 0600: the daemon, which runs as {name} (the "
                    f"owner of {data_dir}), could not read it and would not start once the clear keys are gone. "
                    f"Nothing was changed. Fix: chown {name} {kek_file}")


def _clear_key(files: PkiFiles, row: Any) -> Any:
    try:
        return files.load_ca_key(row["key_file"])
    except (OSError, ValueError) as e:
        raise SealError(f"cannot read CA generation {row['generation']}'s key {files.dir / row['key_file']}: "
                        f"{getattr(e, 'strerror', None) or e}") from None


def _same_key(a: KeySigner, b: KeySigner) -> bool:
    return a.pem() == b.pem()


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    """uptrakitd-keys seal --data-dir DIR --ca-key-encryption-key-file FILE"""
    parser = argparse.ArgumentParser(prog="uptrakitd-keys", description="Custody of uptrakitd's CA keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    seal = commands.add_parser("seal", help="seal the clear CA key files of a stopped controller's data dir "
                                            "(embedded SQLite) into its database, then remove the files",
                               description="Seal the clear CA key files of a data dir into its database under "
                                           "the key-encryption key, then remove them. Stop the daemon first; "
                                           "start it again with --ca-key-encryption-key-file.")
    seal.add_argument("--data-dir", required=True, type=Path, help="the daemon's --data-dir")
    seal.add_argument("--ca-key-encryption-key-file", required=True, type=Path,
                      help="base64 AES-256 keys, one per line, mode 0600 (head -c 32 /dev/urandom | base64)")
    args = parser.parse_args(argv)
    before = _schema(args.data_dir)
    try:
        sealed = seal_data_dir(args.data_dir, args.ca_key_encryption_key_file)
    except SealError as e:
        sys.stderr.write(f"uptrakitd-keys: error: {e}\n")
        return 2
    after = _schema(args.data_dir)
    if before is not None and after is not None and after > before:
        print(f"the database was at schema {before}, an earlier release's: upgraded to {after} first, as the daemon's "
              f"start would (a copy is kept as uptrakit.sqlite3.v{before}.bak; docs/deployment/upgrade.md)")
    if sealed:
        print(f"sealed CA generation(s) {', '.join(map(str, sealed))}; the clear key files are removed. Start the "
              f"daemon with --ca-key-encryption-key-file {args.ca_key_encryption_key_file}")
    else:
        print("no clear CA key file to seal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
