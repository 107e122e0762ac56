"""A bounded cache of forwarded certificates whose signature was already checked.

Checking a certificate header costs a header decode, a DER parse and a P-384 signature verification
(about 1 ms, most of a request's CPU). Only that part is cached, keyed by the header value (by its
SHA-256 when it is longer than 4 KiB): validity, usage, our records, revocation and the service's
status are checked on every request from the live state, and the cached issuer must still be a trusted
generation. Entries for a revoked serial and, on a rotation, all entries are dropped as well.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

MAX_ENTRIES = 10_000
MAX_LITERAL_KEY = 4096   # characters: up to this, a value is kept as its own key


@dataclass(frozen=True)
class Checked:
    """What a header value decoded to: the certificate's facts and the CA generation whose signature is on it."""

    cert: Any | None                # identity.CertFacts
    issuer_generation: int | None   # None: not signed by any CA that was trusted when it was checked
    error: Exception | None = None  # the decode error (MalformedHeader), re-raised on every hit


class VerifiedCertificates:
    """LRU of Checked by header value; `max_entries` bounds memory (about 2 KiB an entry, at most ~6 KiB)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str | bytes, Checked] = OrderedDict()
        self._by_serial: dict[int, set[str | bytes]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, value: str | bytes, check: Callable[[], Checked]) -> Checked:
        """The Checked for `value`, computed by `check()` on a miss."""
        # a header value of ordinary size is its own key (hashing it is cheaper than a SHA-256, and a dict
        # compares keys in full, so no collision can stand in for it); a long one is kept as its SHA-256
        key: str | bytes = value if len(value) <= MAX_LITERAL_KEY else hashlib.sha256(
            value if isinstance(value, bytes) else value.encode("latin-1", "replace")).digest()
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry
        self.misses += 1
        entry = check()
        self._entries[key] = entry
        if entry.cert is not None:
            self._by_serial.setdefault(entry.cert.serial, set()).add(key)
        if len(self._entries) > self.max_entries:
            old_key, old = self._entries.popitem(last=False)
            self._unindex(old_key, old)
        return entry

    def _unindex(self, key: str | bytes, entry: Checked) -> None:
        if entry.cert is not None:
            keys = self._by_serial.get(entry.cert.serial)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_serial[entry.cert.serial]

    def on_revoked(self, event: Any) -> None:
        """CertificateRevoked: forget entries for that serial (revocation is checked live anyway).

        Indexed by serial: a rotation supersedes thousands of certificates, each one event.
        """
        for key in self._by_serial.pop(event.serial, ()):
            self._entries.pop(key, None)

    def on_ca_rotated(self, event: Any) -> None:
        """CaRotated: the trusted set changed; check every certificate again."""
        self._entries.clear()
        self._by_serial.clear()
