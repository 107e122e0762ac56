"""Trusted proxies and the real client address (SPEC §3.2). Pure functions."""
from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import Iterable, Sequence

from ..config import IPNetwork
from .split import split_outside_quotes

SINGLE_ADDRESS_HEADERS = {"x-real-ip", "true-client-ip", "cf-connecting-ip"}
_PORT_V4 = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3}):\d{1,5}$")
_BRACKETED = re.compile(r"^\[([0-9A-Fa-f:.]+(?:%[^\]]+)?)\](?::\d{1,5})?$")


@lru_cache(maxsize=8192)  # pure, and called for every request's peer: most peers come back
def parse_address(text: str) -> str | None:
    """Canonical address from `1.2.3.4`, `1.2.3.4:80`, `[v6]`, `[v6]:80` or a bare v6; None for garbage."""
    text = text.strip().strip('"').strip()
    if not text or len(text) > 100:
        return None
    m = _BRACKETED.match(text)
    if m:
        text = m.group(1)
    else:
        m = _PORT_V4.match(text)
        if m:
            text = m.group(1)
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def is_trusted(address: str, networks: Iterable[IPNetwork]) -> bool:
    """True when the (canonical) address lies in one of the trusted networks."""
    if isinstance(networks, tuple):   # the settings' own tuples: asked for every request (parsing was ~4 %)
        return _trusted_memo(address, networks)
    return _trusted(address, networks)


@lru_cache(maxsize=4096)
def _trusted_memo(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    return _trusted(address, networks)


def _trusted(address: str, networks: Iterable[IPNetwork]) -> bool:
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(addr.version == net.version and addr in net for net in networks)


def forwarded_for_values(header: str) -> list[str | None]:
    """The `for=` values of an RFC 7239 Forwarded header, in order (None for unknown/obfuscated/garbage)."""
    out: list[str | None] = []
    for element in _split_quoted(header, ","):
        for pair in _split_quoted(element, ";"):
            key, sep, value = pair.partition("=")
            if sep and key.strip().lower() == "for":
                value = value.strip()
                if value.startswith('"') and value.endswith('"') and len(value) >= 2:
                    value = value[1:-1]
                if value.lower() == "unknown" or value.startswith("_"):
                    out.append(None)
                else:
                    out.append(parse_address(value) or "garbage")
    return out


def _split_quoted(text: str, sep: str) -> list[str]:
    # an unterminated quote leaves one element that will not parse as an address: garbage
    return split_outside_quotes(text, sep, escapes="none") or [text]


def resolve_client_ip(peer_ip: str, header_name: str, values: Sequence[str],
                      networks: Sequence[IPNetwork]) -> str:
    """The client address behind a trusted peer: walk the header from the right, skipping trusted hops.

    Several copies of the header are joined in order. Missing or garbage gives the peer address.
    """
    if not values:
        return peer_ip
    name = header_name.lower()
    if name in SINGLE_ADDRESS_HEADERS:
        return parse_address(values[-1]) or peer_ip
    if name == "forwarded":
        hops: list[str | None] = []
        for value in values:
            hops.extend(forwarded_for_values(value))
    else:
        hops = [parse_address(v) or "garbage" for value in values for v in value.split(",") if v.strip()]
    if not hops:
        return peer_ip
    leftmost_trusted = None
    for hop in reversed(hops):
        if hop is None:  # unknown/obfuscated: says nothing, keep walking
            continue
        if hop == "garbage":
            return peer_ip
        if not is_trusted(hop, networks):
            return hop
        leftmost_trusted = hop
    return leftmost_trusted or peer_ip
