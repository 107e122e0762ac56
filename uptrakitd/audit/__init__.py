"""The audit trail: security actions recorded in the transaction of the change they record, on a hash chain with
checkpoints signed by the active CA, so an export can be verified offline (`uptrakit-audit verify`).

An entry: sequence number, time, controller id, actor (`{"kind": "admin_token", "id", "name", "role"}`,
`{"kind": "service", "id"}`, `{"kind": "system"}`), action (`certificate.revoked`, `ca.rotated`, …), object
(`{"kind": "certificate", "id": serial}`, …), details, the client address as the trusted-proxy rules resolved
it, the request id the client sent (`X-Request-Id`), the previous entry's hash and its own:
`hash = SHA-256(prev_hash ‖ canonical JSON of the entry)` (store/audit.py). `AuditTrail.run` composes the
change's store operation with the entry's append, so the two commit together or not at all, and writes the
entry as one JSON log line with `"audit": true` once committed.

Every CHECKPOINT_EVERY entries or CHECKPOINT_MINUTES minutes (whichever comes first, checked each minute) an
`audit.checkpoint` entry carries the active CA's signature over `uptrakitd-audit-checkpoint:<seq>:<hash>` of
the entry before it, made through the CA's Signer (so a key in a token signs it too). Before it signs, the
controller checks that the stored chain continues from the last checkpoint it signed (its anchor, kept in the data
dir as ANCHOR_FILE for the database it names): a trail rewritten in the database, even re-hashed, is never signed
(docs/security.md, "Who can rewrite the audit trail"). An export and a prune sign the head first.
"""
from __future__ import annotations

import base64
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from uptrakitd.store import audit as stored

log = Logger()
SYSTEM: dict[str, Any] = {"kind": "system"}
CHECKPOINT_EVERY = 1000
CHECKPOINT_MINUTES = 10
SIGN_IN_WINDOW = 60.0   # seconds: one entry for the sign-in failures of each window that had any
MAX_LISTED = 64         # address ranges (and routes) named in that entry, the most failing first
MAX_COUNTED = 4096      # ranges counted one by one in a window; beyond, they are counted together
ANCHOR_FILE = "audit-anchor.json"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")


def checkpoint_message(seq: int, digest: str) -> bytes:
    """What a checkpoint's signature covers."""
    return f"uptrakitd-audit-checkpoint:{seq}:{digest}".encode("ascii")


@dataclass(frozen=True)
class Said:
    """Who asked for a change, and from where."""

    actor: dict[str, Any] = field(default_factory=lambda: dict(SYSTEM))
    client: str | None = None
    request_id: str | None = None


BY_SYSTEM = Said()


def with_entry(operation: Callable[..., Any], controller_id: str, action: str, obj: dict[str, Any],
               details: dict[str, Any], actor: dict[str, Any] | None = None) -> Callable[..., Any]:
    """`operation` followed, in its transaction, by an entry made by `system` (or `actor`): for the changes the
    start-up makes before the reactor runs (boot.py), where no AuditTrail exists yet."""
    def together(conn: Any, *args: Any) -> Any:
        result = operation(conn, *args)
        log_entry(stored.append(conn, int(time.time()), controller_id, actor or dict(SYSTEM), action, obj, details))
        return result
    return together


def local_actor(command: str) -> dict[str, Any]:
    """Who ran a local command (uptrakitd-keys, uptrakitctl with the data dir): the real user and uid, and the
    login name the environment claims only as a claim (LOGNAME and USER are the caller's to set)."""
    import pwd
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    actor: dict[str, Any] = {"kind": "local", "command": command, "user": user, "uid": uid}
    claimed = os.environ.get("LOGNAME") or os.environ.get("USER")
    if claimed and claimed != user:
        actor["claimed_login"] = claimed
    return actor


def request_id_of(raw: bytes | None) -> str | None:
    """The client's X-Request-Id when it is a plain token (anything else is not recorded)."""
    text = raw.decode("latin-1") if raw else None
    return text if text and _REQUEST_ID.match(text) else None


def audited(audit: AuditTrail | None, store: Any, operation: Callable[..., Any], *args: Any, action: str,
            obj: dict[str, Any], details: Any = None, said: Said = BY_SYSTEM, also: Any = None) -> Deferred:
    """audit.run(…) — or store.run(operation, *args) where no trail is kept (unit tests of one component)."""
    if audit is None:
        return store.run(operation, *args)
    return audit.run(operation, *args, action=action, obj=obj, details=details, said=said, also=also)


class AuditTrail:
    """Appends entries with the changes they record; writes checkpoints."""

    def __init__(self, store: Any, controller_id: str, clock: Any, run_blocking: Callable[..., Deferred],
                 signer_of: Callable[[], Any], anchor_file: Path | None = None, database: str = "sqlite") -> None:
        self.store = store
        self.anchor_file = anchor_file
        self.database = database   # the anchor holds for this database only (a restore makes a new one)
        self.anchor = self._read_anchor()
        self.broken: str | None = None   # why the stored chain does not continue from the anchor
        self.controller_id = controller_id
        self.clock = clock
        self.run_blocking = run_blocking
        self.signer_of = signer_of   # () -> (generation, Signer) of the active CA
        self._sign_ins: SignInWindow | None = None   # sign-in failures counted since the last entry
        self._sign_in_flush: Any = None

    def run(self, operation: Callable[..., Any], *args: Any, action: str, obj: dict[str, Any],
            details: dict[str, Any] | Callable[[Any], dict[str, Any] | None] | None = None,
            said: Said = BY_SYSTEM, also: Callable[[Any], list[tuple[str, dict[str, Any], dict[str, Any]]]] | None = None
            ) -> Deferred:
        """store.run(operation, *args) with the entry appended in the same transaction; fires with the
        operation's result. `details` may be a function of that result (None from it: nothing to record);
        `also(result)` gives more entries (action, object, details) that the same change made."""
        written: list[dict[str, Any]] = []

        def together(conn: Any, *a: Any) -> Any:
            # (a group-commit batch that failed is run again alone: only the attempt that commits is logged)
            written.clear()
            result = operation(conn, *a)
            said_details = details(result) if callable(details) else (details or {})
            entries = ([(action, obj, said_details)] if said_details is not None else []) + \
                (also(result) if also is not None else [])
            for entry_action, entry_obj, entry_details in entries:
                written.append(stored.append(conn, int(self.clock.seconds()), self.controller_id, said.actor,
                                             entry_action, entry_obj, entry_details, said.client, said.request_id))
            return result

        def logged(result: Any) -> Any:
            for entry in written:
                log_entry(entry)
            return result
        return self.store.run(together, *args).addCallback(logged)

    def record(self, action: str, obj: dict[str, Any], details: dict[str, Any] | None = None,
               said: Said = BY_SYSTEM) -> Deferred:
        """An entry on its own (start-up, shutdown)."""
        return self.run(lambda conn: None, action=action, obj=obj, details=details or {}, said=said)

    def sign_in_failed(self, client: str | None, method: str, path: str, request_id: str | None) -> None:
        """An admin API request with a token nobody holds: counted, never dropped, and written as one entry per
        SIGN_IN_WINDOW seconds that says how many came from which address range (/24, /64) to which route. A
        flood of guesses, from one address or from thousands, cannot flood the trail (at most 1,440 such entries a
        day) nor hide among decoys (every failure is in a count)."""
        window = self._sign_ins
        if window is None:
            window = self._sign_ins = SignInWindow(self.clock.seconds())
            self._sign_in_flush = self.clock.callLater(SIGN_IN_WINDOW, self.flush_sign_in_failures)
        window.add(client, f"{method} {path}")

    def flush_sign_in_failures(self) -> Deferred | None:
        """Write the window's entry now (the timer does it SIGN_IN_WINDOW seconds after its first failure)."""
        window, self._sign_ins = self._sign_ins, None
        if self._sign_in_flush is not None and self._sign_in_flush.active():
            self._sign_in_flush.cancel()
        self._sign_in_flush = None
        if window is None:
            return None
        return self.record("admin.sign_in_failed", {"kind": "admin_api", "id": "sign-in"},
                           window.details(self.clock.seconds()), Said({"kind": "anonymous"})).addErrback(
            lambda f: log.warn("audit: sign-in failures could not be recorded ({error})", error=f.getErrorMessage()))

    @inlineCallbacks
    def prune(self, cutoff: int) -> Any:
        """Delete the checkpointed segments written before `cutoff` (store/audit.py prune), recording it in the
        same transaction, then sign a checkpoint that vouches for that entry; fires with (first sequence kept,
        entries deleted) or None."""
        done = yield self.run(stored.prune, cutoff, action="audit.pruned", obj={"kind": "audit", "id": "trail"},
                              details=lambda done: None if done is None else {"kept_from": done[0],
                                                                              "deleted": done[1]})
        if done is not None:
            yield self.checkpoint_if_due(force=True)
        return done

    def prune_by_age(self, days: int) -> Deferred | None:
        """Daily, with --audit-retention-days: prune what is older than that."""
        return self.prune(int(self.clock.seconds()) - days * 86400) if days > 0 else None

    def _read_anchor(self) -> tuple[int, str] | None:
        if self.anchor_file is None:
            return None
        try:
            kept = json.loads(self.anchor_file.read_text("utf-8"))
            if not isinstance(kept, dict):
                raise ValueError("not a JSON object")
            if kept.get("database") != self.database:
                log.info("audit: {file} is for another database (a restore or a new one): a new anchor starts "
                         "with the next checkpoint", file=str(self.anchor_file))
                return None
            seq, digest = kept["seq"], kept["hash"]
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1 or not isinstance(digest, str):
                raise ValueError("no sequence number and hash")
            return seq, digest
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError) as e:
            # (anything else in that file is not what this controller wrote: refuse to sign, never crash)
            log.error("audit: cannot read {file} ({error}): checkpoints are signed only once it is readable "
                      "or removed", file=str(self.anchor_file), error=str(e))
            return (-1, "")

    def _write_anchor(self, seq: int, digest: str) -> None:
        """The anchor file, written and synced (in a thread: never on the reactor)."""
        if self.anchor_file is None:
            return
        partial = self.anchor_file.with_name(self.anchor_file.name + ".partial")
        try:
            with open(partial, "w", encoding="utf-8") as f:
                json.dump({"database": self.database, "seq": seq, "hash": digest}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, self.anchor_file)
        except OSError as e:
            log.error("audit: cannot write {file} ({error})", file=str(self.anchor_file), error=str(e))

    @inlineCallbacks
    def checkpoint_if_due(self, force: bool = False) -> Any:
        """Sign the chain's head when CHECKPOINT_EVERY entries or CHECKPOINT_MINUTES passed since the last one
        (`force`: whenever an entry is not yet covered), once the stored chain continues from this controller's
        anchor."""
        count, oldest, _ = yield self.store.run(stored.since_checkpoint)
        now = self.clock.seconds()
        if count == 0 or (not force and count < CHECKPOINT_EVERY and oldest is not None
                          and now - oldest < CHECKPOINT_MINUTES * 60):
            return None
        seq, digest = yield self.store.run(stored.head)
        if self.anchor is not None:
            problem = "the anchor file is unreadable" if self.anchor[0] < 0 else None
            at, reached = self.anchor, self.anchor[0] < 0
            while not reached:
                problem, *step, reached = yield self.store.run(stored.continues_from, *at)
                at = (step[0], step[1])
            if problem is not None:
                if problem != self.broken:
                    log.error("audit: the trail in the database does not continue from the checkpoint this "
                              "controller signed last (entry {seq}): {problem}. Someone rewrote it; no checkpoint "
                              "is signed until an operator has checked it (uptrakit-audit verify with --expect "
                              "{seq}:{hash}) and removed {file}", seq=self.anchor[0], hash=self.anchor[1],
                              problem=problem, file=str(self.anchor_file))
                self.broken = problem
                return None
        self.broken = None
        generation, signer = self.signer_of()
        if signer is None or not signer.signs_data():
            log.warn("audit: the active CA's key cannot sign checkpoints (not an EC key here); the chain is kept "
                     "without them")
            return None
        signature = yield self.run_blocking(signer.sign, checkpoint_message(seq, digest))
        yield self.record("audit.checkpoint", {"kind": "audit", "id": str(seq)},
                          {"sequence": seq, "hash": digest, "ca_generation": generation,
                           "signature": base64.b64encode(signature).decode("ascii")})
        self.anchor = (seq, digest)
        yield self.run_blocking(self._write_anchor, seq, digest)
        return seq   # the sequence number the new checkpoint vouches for


def address_range(client: str | None) -> str:
    """The /24 (IPv4) or /64 (IPv6) of an address: one attacker's neighbours are one line of the count."""
    import ipaddress
    try:
        address = ipaddress.ip_address(client or "")
    except ValueError:
        return "unknown"
    return str(ipaddress.ip_network(f"{address}/{24 if address.version == 4 else 64}", strict=False))


class SignInWindow:
    """The sign-in failures of one window: counted by address range and by route, bounded in memory."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.total = 0
        self.ranges: dict[str, int] = {}
        self.routes: dict[str, int] = {}
        self.uncounted_ranges = 0   # failures from ranges past MAX_COUNTED

    def add(self, client: str | None, route: str) -> None:
        self.total += 1
        key = address_range(client)
        if key in self.ranges or len(self.ranges) < MAX_COUNTED:
            self.ranges[key] = self.ranges.get(key, 0) + 1
        else:
            self.uncounted_ranges += 1
        if route in self.routes or len(self.routes) < MAX_LISTED:
            self.routes[route] = self.routes.get(route, 0) + 1

    def details(self, now: float) -> dict[str, Any]:
        """The entry's details: every failure is in `failures`; the ranges and routes most seen are named."""
        top = sorted(self.ranges.items(), key=lambda kv: (-kv[1], kv[0]))
        listed = dict(top[:MAX_LISTED])
        return {"failures": self.total, "from": int(self.start), "until": int(now), "ranges": listed,
                "other_ranges": len(top) - len(listed) + (1 if self.uncounted_ranges else 0),
                "other_failures": self.total - sum(listed.values()),
                "routes": dict(sorted(self.routes.items(), key=lambda kv: -kv[1])[:10])}


def log_entry(entry: dict[str, Any]) -> None:
    """One JSON-able log line per committed entry, with "audit": true (for a SIEM reading the journal)."""
    log.info("audit #{seq}: {action} {object_kind} {object_id} by {actor_kind} {actor_name}", audit=True,
             seq=entry["seq"], action=entry["action"], object_kind=entry["object"].get("kind"),
             object_id=entry["object"].get("id"), actor_kind=entry["actor"].get("kind"),
             actor_name=entry["actor"].get("name") or entry["actor"].get("id") or "", entry=entry)
