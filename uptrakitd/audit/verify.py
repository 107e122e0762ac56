"""`uptrakit-audit verify EXPORT --ca CA_BUNDLE`: check an audit export offline (GET /api/v1/audit/export).

Every entry must follow the one before it (sequence + 1, its `prev_hash` the previous `hash`; the first one
follows the genesis hash), and its `hash` must be SHA-256(prev_hash ‖ canonical JSON of the entry). Each line must
be exactly the export's canonical form of its entry (sorted keys, no spaces, the entry's fields and nothing else):
a field no hash covers is refused. Every `audit.checkpoint` entry must carry a valid signature, by one of the CA
certificates given, over the sequence number and hash of an earlier entry of the export, and those must match it.
An export needs at least one checkpoint; one that starts after sequence 1 (a pruned trail) must hold the
`audit.pruned` entry that says so, with a later checkpoint vouching for it. The first entry that fails is named.
What this proves, and what it cannot, is in docs/audit.md: entries after the last checkpoint could have been cut
off the end without a trace, so keep the last checkpoint's sequence and hash elsewhere and compare (`--expect`).
Exit status: 0 verified, 1 not, 2 the files cannot be read.
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any, Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from uptrakitd.audit import checkpoint_message
from uptrakitd.store.audit import FIELDS, GENESIS, entry_hash


class Broken(Exception):
    """The export fails verification at `seq`."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"first bad sequence {seq}: {reason}")
        self.seq = seq


def _signature_ok(cas: list[x509.Certificate], signature: bytes, message: bytes) -> bool:
    for cert in cas:
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            continue
        algorithm = hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()
        try:
            key.verify(signature, message, ec.ECDSA(algorithm))
            return True
        except InvalidSignature:
            continue
    return False


def _entry(line: str | dict[str, Any], number: int, previous_seq: int) -> dict[str, Any]:
    """An export line parsed (it must be the canonical form of an entry with exactly the stored fields), or a
    stored entry as it is."""
    if isinstance(line, dict):
        return line
    try:
        entry = json.loads(line)
        int(entry["seq"])
    except (ValueError, KeyError, TypeError):
        raise Broken(previous_seq + 1, f"line {number} is not an audit entry") from None
    if not isinstance(entry, dict) or set(entry) != set(FIELDS) | {"hash"}:
        raise Broken(previous_seq + 1, f"line {number} has fields an audit entry has not (or lacks some)")
    if json.dumps(entry, sort_keys=True, separators=(",", ":")) != line.rstrip("\r\n"):
        raise Broken(int(entry["seq"]), f"line {number} is not in the export's canonical form")
    return entry


def verify(lines: Iterable[str | dict[str, Any]], cas: list[x509.Certificate], expect: tuple[int, str] | None = None,
           require_checkpoint: bool = True) -> dict[str, Any]:
    """Check an export (its lines, or stored entries); Broken naming the first bad sequence, else a summary.
    `require_checkpoint=False` accepts a trail too young to have a checkpoint (a restore's check of a database)."""
    hashes_by_seq: dict[int, str] = {}
    previous_seq, previous_hash, checkpoints, last_checkpoint = 0, GENESIS, 0, 0
    start: int | None = None   # an export of a pruned trail starts later: a checkpoint must vouch for that entry
    pruned_at: int | None = None   # the audit.pruned entry that says the trail starts at `start`
    vouched: set[int] = set()
    for number, line in enumerate(lines, 1):
        if isinstance(line, str) and not line.strip():
            continue
        entry = _entry(line, number, previous_seq)
        seq = int(entry["seq"])
        if previous_seq == 0 and seq > 1 and start is None:
            start, previous_seq, previous_hash = seq, seq - 1, str(entry.get("prev_hash"))
        if seq != previous_seq + 1:
            raise Broken(previous_seq + 1, f"the next entry is {seq} (missing, inserted or reordered entries)")
        if entry.get("prev_hash") != previous_hash:
            raise Broken(seq, "its prev_hash is not the previous entry's hash")
        try:
            computed = entry_hash(entry)
        except (KeyError, ValueError, TypeError):
            raise Broken(seq, "the entry lacks fields or is malformed") from None
        if computed != entry.get("hash"):
            raise Broken(seq, "its hash does not match its content (modified)")
        found = entry.get("details")
        details: dict[str, Any] = found if isinstance(found, dict) else {}
        if entry.get("action") == "audit.pruned" and start is not None and details.get("kept_from") == start:
            pruned_at = seq
        if entry.get("action") == "audit.checkpoint":
            covered, digest = details.get("sequence"), details.get("hash")
            if not isinstance(covered, int) or not isinstance(digest, str) or hashes_by_seq.get(covered) != digest:
                raise Broken(seq, f"the checkpoint names sequence {covered} with a hash the export does not have")
            try:
                signature = base64.b64decode(details.get("signature", ""), validate=True)
            except (ValueError, TypeError):
                raise Broken(seq, "the checkpoint's signature is not base64") from None
            if not _signature_ok(cas, signature, checkpoint_message(covered, digest)):
                raise Broken(seq, "the checkpoint's signature does not verify with the CA certificates given")
            checkpoints, last_checkpoint = checkpoints + 1, covered
            vouched.add(covered)
        hashes_by_seq[seq] = computed
        previous_seq, previous_hash = seq, computed
    if previous_seq == 0:
        raise Broken(1, "the export holds no entry")
    if start is not None and not (last_checkpoint and start in vouched):
        raise Broken(start, "the export starts after sequence 1 and no signed checkpoint vouches for its first "
                            "entry (entries cut from the start)")
    if start is not None and (pruned_at is None or last_checkpoint < pruned_at):
        raise Broken(start, "the export starts after sequence 1 and holds no audit.pruned entry, vouched for by a "
                            "later checkpoint, that says so (entries cut from the start)")
    if require_checkpoint and not checkpoints:
        raise Broken(1, "the export holds no signed checkpoint: nothing in it is vouched for by the CA")
    if expect is not None and hashes_by_seq.get(expect[0]) != expect[1]:
        raise Broken(expect[0], "the export does not hold the entry expected there (cut or replaced)")
    return {"entries": previous_seq, "checkpoints": checkpoints, "covered_by_checkpoint": last_checkpoint,
            "last_hash": previous_hash}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="uptrakit-audit", description="Verify an uptrakitd audit export offline.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="check an export's hash chain and signed checkpoints",
                                description=__doc__.split("\n\n")[1] if __doc__ else None)
    check.add_argument("export", type=Path, help="the JSON Lines of GET /api/v1/audit/export")
    check.add_argument("--ca", type=Path, required=True, action="append",
                       help="PEM file of CA certificates that may have signed checkpoints (the bundle "
                            "/api/v1/pki/ca.crt, plus older generations' certificates); repeatable")
    check.add_argument("--expect", metavar="SEQ:HASH",
                       help="an entry known to exist (e.g. the last checkpoint you kept): catches a cut-off end")
    args = parser.parse_args(argv)
    try:
        cas = [c for path in args.ca for c in x509.load_pem_x509_certificates(path.read_bytes())]
        lines = args.export.read_text("utf-8").splitlines()
    except (OSError, ValueError) as e:
        print(f"uptrakit-audit: cannot read: {e}", file=sys.stderr)
        return 2
    expect = None
    if args.expect:
        seq, _, digest = args.expect.partition(":")
        if not (seq.isascii() and seq.isdigit() and len(seq) < 19) or len(digest) != 64:
            print("uptrakit-audit: --expect is SEQ:HASH (a sequence number and 64 hex digits)", file=sys.stderr)
            return 2
        expect = (int(seq), digest.lower())
    try:
        summary = verify(lines, cas, expect)
    except Broken as e:
        print(f"NOT VERIFIED: {e}")
        return 1
    print(f"verified: {summary['entries']} entries, {summary['checkpoints']} signed checkpoint(s), the last covering "
          f"entries 1-{summary['covered_by_checkpoint']}; last hash {summary['last_hash']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
