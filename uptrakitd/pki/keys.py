"""Where managed CA keys are kept: clear files under `<data-dir>/pki/` (mode 0600), or sealed in the database
(SQLite or PostgreSQL; required with PostgreSQL) with AES-256-GCM under a key-encryption key (KEK) read from
`--ca-key-encryption-key-file`. `uptrakitd-keys seal` moves a data dir from the first to the second.

The KEK file holds one or more keys, one per line, each 32 bytes in base64 (`head -c 32 /dev/urandom |
base64`). The first line seals new keys; the others only open keys sealed earlier, and at start every
key sealed with one of them is sealed again with the first. Rotating the KEK: put a new first line,
keep the old one second, restart the controller, then remove the old line. A sealed key names the KEK
it was sealed with (the first 8 bytes of its SHA-256, in hex), so a missing KEK is named, not guessed.
The generation number is the AEAD's associated data: a sealed key cannot be moved to another row.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .files import PkiFiles
from .signer import KeySigner

SEALED_PREFIX = "v1"


class KeyStoreError(Exception):
    """A KEK file or a sealed key that cannot be used; the message says which and why."""


def kek_id(kek: bytes) -> str:
    return hashlib.sha256(kek).hexdigest()[:16]


def load_keks(path: Path) -> list[bytes]:
    """The keys of a KEK file, current first (KeyStoreError with one clear line when unusable)."""
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise KeyStoreError(f"cannot read the key-encryption key file {path}: {getattr(e, 'strerror', None) or e}") \
            from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyStoreError(f"{path} is readable by others (mode {stat.S_IMODE(mode):o}): chmod 600 it")
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            key = base64.b64decode(line.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise KeyStoreError(f"{path} line {number}: not base64") from None
        if len(key) != 32:
            raise KeyStoreError(f"{path} line {number}: a key must be 32 bytes (head -c 32 /dev/urandom | base64), "
                            f"this one is {len(key)}")
        keys.append(key)
    if not keys:
        raise KeyStoreError(f"{path} holds no key (one base64 line of 32 bytes: head -c 32 /dev/urandom | base64)")
    return keys


def _aad(generation: int) -> bytes:
    return f"uptrakitd CA key, generation {generation}".encode()


def _not_in_a_token(generation: int, key_file: str) -> None:
    if key_file.startswith("pkcs11:"):
        raise KeyStoreError(f"CA generation {generation}'s key is in a PKCS#11 token ({key_file}): start with "
                            "--ca-key-uri, --pkcs11-module and the PIN")


class FileKeys:
    """CA keys as 0600 files in the data dir; the row names the file."""

    def __init__(self, files: PkiFiles) -> None:
        self.files = files

    custody = "file"

    def new(self, generation: int) -> KeySigner:
        """A new CA key for this generation, not kept anywhere yet."""
        return KeySigner.generate(self.custody)

    def save(self, generation: int, signer: Any) -> tuple[str, str | None]:
        """(key_file, key_sealed) for the new row: the key is on disk before the row names it."""
        return self.files.write_ca_key(generation, signer), None

    def load(self, generation: int, key_file: str, key_sealed: str | None) -> Any:
        _not_in_a_token(generation, key_file)
        if not key_file and key_sealed:
            raise KeyStoreError(f"CA generation {generation}'s key is sealed in the database: start with "
                                "--ca-key-encryption-key-file (the file it was sealed with)")
        return self.files.load_ca_key(key_file)

    def needs_resealing(self, key_sealed: str | None) -> bool:
        return False


class SealedKeys:
    """CA keys sealed in the database row itself (no file), under the current KEK. With `files` (the embedded
    SQLite), a generation not sealed yet is still read from its clear file: a data dir half way through
    `uptrakitd-keys seal` starts, and the log says which keys are still clear."""

    def __init__(self, keks: list[bytes], files: PkiFiles | None = None) -> None:
        self.keks = {kek_id(k): k for k in keks}
        self.current = kek_id(keks[0])
        self.files = files

    custody = "sealed"

    def new(self, generation: int) -> KeySigner:
        return KeySigner.generate(self.custody)

    def seal(self, generation: int, signer: KeySigner) -> str:
        nonce = os.urandom(12)
        sealed = AESGCM(self.keks[self.current]).encrypt(nonce, signer.pem(), _aad(generation))
        return f"{SEALED_PREFIX}:{self.current}:{base64.b64encode(nonce + sealed).decode('ascii')}"

    def save(self, generation: int, signer: Any) -> tuple[str, str | None]:
        return "", self.seal(generation, signer)

    def load(self, generation: int, key_file: str, key_sealed: str | None) -> Any:
        _not_in_a_token(generation, key_file)
        if not key_sealed and key_file and self.files is not None:
            return self.files.load_ca_key(key_file)
        if not key_sealed:
            raise KeyStoreError(f"CA generation {generation} has no sealed key in the database (its key is the file "
                                f"{key_file!r} of the controller that made it)")
        try:
            version, wanted, blob = key_sealed.split(":", 2)
            raw = base64.b64decode(blob, validate=True)
        except (ValueError, binascii.Error):
            raise KeyStoreError(f"the sealed key of CA generation {generation} is damaged") from None
        if version != SEALED_PREFIX:
            raise KeyStoreError(f"the sealed key of CA generation {generation} has an unknown format {version!r}")
        kek = self.keks.get(wanted)
        if kek is None:
            raise KeyStoreError(f"CA generation {generation} is sealed with key-encryption key {wanted}, which is not in "
                            f"--ca-key-encryption-key-file (it holds {', '.join(self.keks)})")
        try:
            pem = AESGCM(kek).decrypt(raw[:12], raw[12:], _aad(generation))
        except Exception:
            raise KeyStoreError(f"the sealed key of CA generation {generation} does not open with key-encryption key "
                            f"{wanted}: damaged, or not this generation's") from None
        return KeySigner.from_pem(pem, "sealed")

    def needs_resealing(self, key_sealed: str | None) -> bool:
        return bool(key_sealed) and not str(key_sealed).startswith(f"{SEALED_PREFIX}:{self.current}:")
