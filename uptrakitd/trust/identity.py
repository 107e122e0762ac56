"""The §3 decision: who is this request? Direct mTLS first, then a trusted proxy's headers, else nobody."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Identity:
    """A verified service identity."""

    service_id: str
    serial: int
    ca_generation: int


@dataclass(frozen=True)
class RequestContext:
    """What every resource learns about the request's origin (SPEC §3)."""

    peer_ip: str
    client_ip: str
    proxy_ip: str | None = None
    identity: Identity | None = None
    identity_source: str = "none"  # mtls | proxy-cert | proxy-info | none
    rejected: str | None = None

    @property
    def via_trusted_proxy(self) -> bool:
        return self.proxy_ip is not None


def canonical_ip(value: str) -> str:
    """The ipaddress string form; IPv4-mapped IPv6 folded to IPv4; scope ids dropped."""
    addr = ipaddress.ip_address(value.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def peer_ip_of(request: Any) -> str:
    """The TCP peer address of a twisted.web request (as the PROXY protocol reports it, if used)."""
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    if not host:
        return "0.0.0.0"
    try:
        return canonical_ip(host)
    except ValueError:
        return "0.0.0.0"
