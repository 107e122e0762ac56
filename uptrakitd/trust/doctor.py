"""The proxy doctor: a bounded record of recent identity decisions per peer address, and advice from it.

What is kept per peer: whether it was a trusted proxy, which header *families* arrived (names like
`x-ssl-client` or `xfcc`, never values), whether the forwarding header was there, how the requests
were decided and the last rejection reason (our own short text, never header contents). Peers are
recorded when they are trusted proxies, or when an untrusted peer sends identity headers (the
mistake the doctor exists to find); plain browsers and direct mTLS clients are not recorded.

Memory is bounded: at most MAX_PEERS trusted proxies and MAX_PEERS untrusted senders, kept apart (least
recently seen dropped first), each a few hundred bytes; untrusted clients, who choose their addresses,
can only push out each other, never a trusted proxy's record. Cost per request is a dict lookup and a few counters; the request's header names are scanned
at most once per SAMPLE_SECONDS per peer.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

MAX_PEERS = 256
SAMPLE_SECONDS = 1.0
# header families that are not client-certificate evidence
NOT_IDENTITY = frozenset({"real-ip", "origin", "forwarded-proto-host"})


@dataclass
class PeerRecord:
    """What the doctor knows about one peer address."""

    peer: str
    trusted: bool
    first_seen: float
    last_seen: float = 0.0
    count: int = 0
    # accepted | rejected | ignored | none | unchecked (a route that does not read identity)
    decisions: dict[str, int] = field(default_factory=dict)
    families: set[str] = field(default_factory=set)           # identity header families seen
    configured_seen: bool = False      # a configured certificate header name arrived
    forwarded_for: bool | None = None  # the real-IP header was there in the last sample (trusted only)
    last_reason: str | None = None
    last_source: str | None = None
    sampled_at: float = -1e18


class IdentityDoctor:
    """Records decisions (IdentityResolver calls `wants` then `record`) and turns them into advice."""

    def __init__(self, clock: Callable[[], float], max_peers: int = MAX_PEERS) -> None:
        self.clock = clock
        self.max_peers = max_peers
        self._kept: dict[bool, OrderedDict[str, PeerRecord]] = {True: OrderedDict(), False: OrderedDict()}

    @property
    def peers(self) -> dict[str, PeerRecord]:
        """Every record, untrusted senders first, each group least recently seen first."""
        return {**self._kept[False], **self._kept[True]}

    def wants_sample(self, peer: str) -> bool:
        """True when this request's header names should be scanned for `peer` (new, or not recently)."""
        record = self._kept[True].get(peer) or self._kept[False].get(peer)
        return record is None or self.clock() - record.sampled_at >= SAMPLE_SECONDS

    def record(self, peer: str, trusted: bool, decision: str, families: Iterable[str] | None,
               forwarded_for: bool | None = None, reason: str | None = None, source: str | None = None) -> None:
        """One request's decision; `families` None when this request was not sampled."""
        now = self.clock()
        kept = self._kept[trusted]
        self._kept[not trusted].pop(peer, None)   # its trust changed (network settings)
        record = kept.get(peer)
        if record is None:
            record = kept[peer] = PeerRecord(peer, trusted, now)
            while len(kept) > self.max_peers:
                kept.popitem(last=False)
        else:
            kept.move_to_end(peer)
        record.count += 1
        record.last_seen = now
        record.decisions[decision] = record.decisions.get(decision, 0) + 1
        if reason is not None:
            record.last_reason = reason[:200]
        if source is not None:
            record.last_source = source
        if families is not None:
            record.sampled_at = now
            for family in families:
                if family == "configured":
                    record.configured_seen = True
                elif family not in NOT_IDENTITY:
                    record.families.add(family)
            if forwarded_for is not None:
                record.forwarded_for = forwarded_for

    def report(self, real_ip_header: str, configured: dict[str, str | None],
               trusted_now: Callable[[str], bool] | None = None) -> dict[str, Any]:
        """The API's JSON: every recorded peer, most recent first, each with its advice. `trusted_now` says
        whether an address is a trusted proxy under the settings in force: a record made before the settings
        changed is shown as they are now (`trusted`), with what it was when seen (`trusted_when_seen`)."""
        peers = []
        for record in sorted(self.peers.values(), key=lambda r: r.last_seen, reverse=True):
            now_trusted = record.trusted if trusted_now is None else trusted_now(record.peer)
            if now_trusted != record.trusted:   # the settings changed since: no advice from stale evidence
                shown = []
            else:
                shown = advice(record, real_ip_header, configured)
            peers.append({"peer": record.peer, "trusted": now_trusted, "trusted_when_seen": record.trusted,
                          "count": record.count,
                          "first_seen": record.first_seen, "last_seen": record.last_seen,
                          "decisions": dict(record.decisions), "header_families": sorted(record.families),
                          "configured_header_seen": record.configured_seen,
                          "forwarded_for_present": record.forwarded_for, "last_rejection": record.last_reason,
                          "last_identity_source": record.last_source,
                          "advice": shown})
        return {"peers": peers, "max_peers": self.max_peers * 2}


def advice(record: PeerRecord, real_ip_header: str, configured: dict[str, str | None]) -> list[dict[str, str]]:
    """What an operator should do about one peer, as {code, severity, text} items."""
    out = []
    families = ", ".join(sorted(record.families))
    if not record.trusted:
        if record.families or record.configured_seen:
            families = ", ".join(sorted(record.families | ({"the configured one"} if record.configured_seen else set())))
            cidr = f"{record.peer}/{128 if ':' in record.peer else 32}"
            out.append({"code": "untrusted_sender", "severity": "warning", "trust": cidr,
                        "text": f"{record.peer} sends client-certificate headers ({families}) but is not a trusted "
                                f"proxy, so they are removed and ignored. If {record.peer} is your reverse proxy, "
                                f"add {cidr} to the trusted proxies in the network settings (the Network page, or "
                                f"uptrakitctl network set --trusted-proxy ...). They are stored and outlive a "
                                "restart: a --trusted-proxy flag alone does not replace stored settings (only with "
                                "--force-settings-override). If it is not your proxy, it is trying to claim an "
                                "identity it does not have."})
        return out
    names = {k: v for k, v in configured.items() if v}
    if record.families and not record.configured_seen:
        wanted = ", ".join(f"{k} = {v}" for k, v in sorted(names.items())) or "no certificate header is configured"
        out.append({"code": "header_mismatch", "severity": "warning",
                    "text": f"trusted proxy {record.peer} sends client-certificate headers ({families}) that the "
                            f"configured header names do not match ({wanted}): no identity is taken from "
                            "them. Set the header the proxy really sends (see docs/deployment/)."})
    elif not record.families and not record.configured_seen and not record.decisions.get("accepted"):
        out.append({"code": "no_certificate_headers", "severity": "info",
                    "text": f"trusted proxy {record.peer} sends no client-certificate headers: services behind "
                            "it get no identity unless the proxy forwards their certificate."})
    if record.forwarded_for is False:
        out.append({"code": "no_forwarded_for", "severity": "warning",
                    "text": f"requests through {record.peer} carry no {real_ip_header}: service IP addresses "
                            f"will show the proxy ({record.peer}). Make the proxy set {real_ip_header}, or "
                            "set real_ip_header to the header it does send."})
    if record.decisions.get("rejected"):
        out.append({"code": "rejected", "severity": "warning",
                    "text": f"{record.decisions['rejected']} request(s) through {record.peer} carried a certificate "
                            f"that was refused; the last reason: {record.last_reason or 'unknown'}."})
    return out
