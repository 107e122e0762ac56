"""The backup archive's format: authenticated before any byte of it is used (docs/security.md, "What a backup
proves").

An archive is a gzip'd tar of `manifest.json`, then `manifest.json.hmac`, then the members. The manifest names
every member with its size and SHA-256; the `.hmac` member is HMAC-SHA256 over the manifest's exact bytes, under a
key derived from a key file the operator keeps apart from the backups: the key-encryption key file (the KEK that
seals the CA keys, which a restore of a sealed CA needs anyway) or a backup key made the same way
(`head -c 32 /dev/urandom | base64`) for a data dir without one. Whoever can write an archive but does not hold
that file cannot make one that is accepted; the CA key cannot serve here, since an archive made with
`--include-clear-keys` carries it.

Reading is streamed: the manifest (at most MAX_MANIFEST bytes) and its MAC come first and are checked before
anything else is read; each member is then written out as it is read, at most the size the manifest declares,
and its digest compared before the caller uses it. A gzip bomb or a member the manifest does not name is refused
after at most a megabyte of output.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import tarfile
import unicodedata
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from ..pki.keys import KeyStoreError, load_keks
from .client import REFUSED, USAGE, CtlError

FORMAT = "uptrakitd-backup/2"
MANIFEST = "manifest.json"
MAC = "manifest.json.hmac"
MAX_MANIFEST = 1 << 20
CHUNK = 1 << 16
_MAC_LABEL = b"uptrakitd backup authentication"
_ID_LABEL = b"uptrakitd backup key id"


def _keys(key_file: Path) -> list[bytes]:
    try:
        return load_keks(key_file)
    except KeyStoreError as e:
        raise CtlError(f"the backup key: {e}", USAGE) from None


def key_id(key: bytes) -> str:
    """A short public name of a key file's key (what a refusal says the archive needs): reveals nothing of it."""
    return hmac.new(key, _ID_LABEL, hashlib.sha256).hexdigest()[:16]


def _mac(key: bytes, manifest: bytes) -> str:
    mac_key = hmac.new(key, _MAC_LABEL, hashlib.sha256).digest()   # (never the KEK's own bytes for another use)
    return hmac.new(mac_key, FORMAT.encode() + b"\n" + manifest, hashlib.sha256).hexdigest()


def safe_member_name(name: str) -> bool:
    """A relative path of plain printable parts (no `..`, no absolute path, no control or format characters)."""
    parts = name.split("/")
    return (bool(name) and len(name) <= 200 and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts)
            and all(unicodedata.category(ch)[0] not in "CZ" or ch == " " for ch in name))


def write_archive(out: Path, manifest: dict[str, Any], sources: dict[str, Path], key_file: Path) -> dict[str, Any]:
    """Write `out`: the manifest (given, without `members`, which this adds from `sources`: name -> file), its MAC
    under the key file's current key, the members. Created under a private temporary name in `out`'s directory
    (O_EXCL|O_NOFOLLOW, mode 0600), synced, renamed over nothing: a file someone else made first is never used."""
    key = _keys(key_file)[0]
    members: dict[str, dict[str, Any]] = {}
    for name, path in sorted(sources.items()):
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                digest.update(chunk)
                size += len(chunk)
        members[name] = {"sha256": digest.hexdigest(), "size": size}
    manifest = {**manifest, "format": FORMAT, "key_id": key_id(key), "members": members}
    text = json.dumps(manifest, indent=2, sort_keys=True).encode()
    if out.exists() or out.is_symlink():
        raise CtlError(f"{out} exists: name a new file", USAGE)
    partial = out.with_name(f".{out.name}.{os.urandom(6).hex()}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise CtlError(f"cannot write {out}: {e.strerror or e}", USAGE) from None
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:gz") as tar:
                for name, data in ((MANIFEST, text), (MAC, _mac(key, text).encode())):
                    _add(tar, name, len(data), int(manifest["taken_at"]), io.BytesIO(data))
                for name in members:
                    with open(sources[name], "rb") as f:
                        _add(tar, name, int(members[name]["size"]), int(manifest["taken_at"]), f)
            raw.flush()
            os.fsync(raw.fileno())
        os.link(partial, out)   # (fails if `out` appeared meanwhile: never replaces another's file)
        partial.unlink()
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise CtlError(f"cannot write {out}: {e.strerror or e}", USAGE) from None
    return manifest


def _add(tar: tarfile.TarFile, name: str, size: int, mtime: int, data: IO[bytes]) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, mtime
    tar.addfile(info, data)


def _parsed(text: bytes) -> dict[str, Any] | None:
    """The manifest when it is a JSON object whose `members` name safe paths with an int size and a sha256."""
    try:
        manifest = json.loads(text)
    except ValueError:
        return None
    members = manifest.get("members") if isinstance(manifest, dict) else None
    if not isinstance(members, dict) or not all(
            safe_member_name(n) and isinstance(m, dict) and isinstance(m.get("size"), int)
            and isinstance(m.get("sha256"), str) for n, m in members.items()):
        return None
    return manifest


class Reader:
    """An archive opened and authenticated: `manifest` is trusted; `members()` streams the rest, each checked."""

    def __init__(self, archive: Path, key_file: Path) -> None:
        self.archive = archive
        keys = _keys(key_file)
        try:
            self._file = open(archive, "rb")
            self._tar = tarfile.open(fileobj=self._file, mode="r|gz")   # a stream: nothing read ahead
        except (OSError, tarfile.TarError) as e:
            raise CtlError(f"cannot read {archive}: {getattr(e, 'strerror', None) or e}", USAGE) from None
        try:
            text = self._small(MANIFEST, MAX_MANIFEST)
            mac = self._small(MAC, 64).decode("ascii", "replace")
        except CtlError:
            self.close()
            raise
        if not any(hmac.compare_digest(_mac(key, text), mac) for key in keys):
            self.close()
            raise CtlError(f"{archive} is not authenticated by the key in {key_file}: altered, or made with another "
                           "key (the archive was made with the key file given to `uptrakitctl backup --key-file`)",
                           REFUSED)
        manifest = _parsed(text)
        if manifest is None:
            self.close()
            raise CtlError(f"{archive}: its manifest is authenticated but malformed", REFUSED)
        self.manifest: dict[str, Any] = manifest

    def _next(self) -> tarfile.TarInfo | None:
        try:
            return self._tar.next()
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            raise CtlError(f"{self.archive} is damaged: {e}", REFUSED) from None

    def _small(self, name: str, limit: int) -> bytes:
        info = self._next()
        if info is None or info.name != name:
            old = " (made before archives were authenticated: take a new backup)" if name == MAC else ""
            raise CtlError(f"{self.archive}: not an uptrakitd backup of format {FORMAT} (its member "
                           f"{'#1' if name == MANIFEST else '#2'} is not {name}){old}", REFUSED)
        if not info.isfile() or info.size > limit:
            raise CtlError(f"{self.archive}: {name} is not a regular member of at most {limit} bytes", REFUSED)
        return self._read(info, lambda chunk: None, info.size, keep=True)

    def _read(self, info: tarfile.TarInfo, sink: Callable[[bytes], Any], limit: int, keep: bool = False) -> bytes:
        f = self._tar.extractfile(info)
        out, total = [], 0
        while f is not None:
            try:
                chunk = f.read(min(CHUNK, limit - total + 1))
            except (tarfile.TarError, OSError, EOFError, ValueError) as e:
                raise CtlError(f"{self.archive} is damaged: {e}", REFUSED) from None
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise CtlError(f"{self.archive}: {info.name} is larger than its manifest says", REFUSED)
            if keep:
                out.append(chunk)
            sink(chunk)
        return b"".join(out)

    def members(self) -> Iterator[tuple[str, Callable[[IO[bytes]], None]]]:
        """(name, copy) for each member in the archive's order: `copy(f)` writes it to `f` and checks its size and
        digest (CtlError on a mismatch: the caller then discards what was written)."""
        listed, seen = self.manifest["members"], set()
        while True:
            info = self._next()
            if info is None:
                break
            name = info.name
            if name not in listed or name in seen or not info.isfile():
                raise CtlError(f"{self.archive}: unexpected member {name!r}: not named in its manifest", REFUSED)
            if info.size != listed[name]["size"]:
                raise CtlError(f"{self.archive}: {name} is not the size its manifest says (damaged or altered)",
                               REFUSED)
            seen.add(name)

            def copy(f: IO[bytes], info: tarfile.TarInfo = info) -> None:
                digest = hashlib.sha256()

                def sink(chunk: bytes) -> None:
                    digest.update(chunk)
                    f.write(chunk)
                self._read(info, sink, info.size)
                if digest.hexdigest() != listed[info.name]["sha256"]:
                    raise CtlError(f"{self.archive}: {info.name} does not match the sha256 in its manifest "
                                   "(damaged or altered)", REFUSED)
            yield name, copy
        if seen != set(listed):
            raise CtlError(f"{self.archive}: members {sorted(set(listed) - seen)} of its manifest are missing",
                           REFUSED)

    def close(self) -> None:
        self._tar.close()
        self._file.close()


def read_all(archive: Path, key_file: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and every member in memory (small archives: tests, `--dry-run`), all checked."""
    reader = Reader(archive, key_file)
    try:
        members = {}
        for name, copy in reader.members():
            buffer = io.BytesIO()
            copy(buffer)
            members[name] = buffer.getvalue()
        return reader.manifest, members
    finally:
        reader.close()
