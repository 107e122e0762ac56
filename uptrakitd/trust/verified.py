"""A bounded cache of forwarded certificates whose signature was already checked.

Checking a certificate header costs a header decode, a DER parse and a P-384 signature verification
(about 1 ms, most of a request's CPU). Only that part is cached, keyed by a SHA-256 of the header
value: validity, usage, our records, revocation and the service's status are checked on every
request from the live state, and the cached issuer must still be a trusted generation. Entries for a
revoked serial and, on a rotation, all entries are dropped as well.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class Checked:
    """What a header value decoded to: the certificate's facts and the CA generation whose signature is on it."""

    cert: Any | None                # identity.CertFacts
    issuer_generation: int | None   # None: not signed by any CA that was trusted when it was checked
    error: Exception | None = None  # the decode error (MalformedHeader), re-raised on every hit


class VerifiedCertificates:
    """LRU of Checked by header value; `max_entries` bounds memory (about 2 KiB an entry)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, Checked] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, value: str | bytes, check: Callable[[], Checked]) -> Checked:
        """The Checked for `value`, computed by `check()` on a miss."""
        key = hashlib.sha256(value if isinstance(value, bytes) else value.encode("latin-1", "replace")).digest()
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry
        self.misses += 1
        entry = check()
        self._entries[key] = entry
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry

    def on_revoked(self, event: Any) -> None:
        """CertificateRevoked: forget entries for that serial (revocation is checked live anyway)."""
        for key in [k for k, e in self._entries.items() if e.cert is not None and e.cert.serial == event.serial]:
            del self._entries[key]

    def on_ca_rotated(self, event: Any) -> None:
        """CaRotated: the trusted set changed; check every certificate again."""
        self._entries.clear()
