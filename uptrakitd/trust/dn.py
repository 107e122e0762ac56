"""Distinguished names as proxies print them: RFC 2253/4514 (nginx, HAProxy rfc2253, Envoy, Go's form
used by Caddy and Traefik) and the OpenSSL slash form (HAProxy default, nginx legacy).

A DN from a header is display text: only its CN is read, for a lookup in our own records.
"""
from __future__ import annotations

import re

from .split import split_outside_quotes

_CN_TYPES = {"cn", "commonname", "2.5.4.3", "oid.2.5.4.3"}
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}")


def _unescape_rfc2253(value: str) -> str | None:
    """Undo RFC 2253 escapes (`\\,` `\\"` `\\+` `\\XX` UTF-8 byte pairs); None when malformed."""
    out = bytearray()
    i = 0
    while i < len(value):
        ch = value[i]
        if ch != "\\":
            out += ch.encode("utf-8")
            i += 1
            continue
        nxt = value[i + 1:i + 3]
        if _HEX2.fullmatch(nxt):
            out.append(int(nxt, 16))
            i += 3
        elif len(nxt) >= 1:
            out += nxt[0].encode("utf-8")
            i += 2
        else:
            return None
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _rfc2253_cns(dn: str) -> list[str] | None:
    attributes = split_outside_quotes(dn, ",+;", escapes="anywhere")
    if attributes is None:
        return None
    cns = []
    for attribute in attributes:
        attr_type, sep, value = attribute.partition("=")
        if not sep:
            if attribute.strip():
                return None
            continue
        if attr_type.strip().lower() in _CN_TYPES:
            value = value.strip()
            if value.startswith('"') and value.endswith('"') and len(value) >= 2:
                value = value[1:-1]
            if value.startswith("#"):
                return None  # BER-encoded CN: not something our CA issues
            unescaped = _unescape_rfc2253(value)
            if unescaped is None:
                return None
            cns.append(unescaped)
    return cns


def _slash_cns(dn: str) -> list[str] | None:
    # OpenSSL's one-line form: /C=CH/O=Acme, Inc./CN=client "A". nginx legacy writes non-ASCII as
    # \xC3\xBC and escapes '/' and '+' with '\'; HAProxy writes raw UTF-8 and escapes nothing.
    cns = []
    for part in re.split(r"(?<!\\)/(?=[A-Za-z0-9.]+=)", dn[1:]):
        attr_type, sep, value = part.partition("=")
        if not sep:
            return None
        if attr_type.strip().lower() in _CN_TYPES:
            raw = bytearray()
            i = 0
            while i < len(value):
                if value.startswith("\\x", i) and _HEX2.fullmatch(value[i + 2:i + 4]):
                    raw.append(int(value[i + 2:i + 4], 16))
                    i += 4
                elif value[i] == "\\" and i + 1 < len(value):
                    raw += value[i + 1].encode("utf-8")
                    i += 2
                else:
                    raw += value[i].encode("utf-8")
                    i += 1
            try:
                cns.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                return None
    return cns


def common_name(dn: str) -> str | None:
    """The CN of a DN in RFC 2253, Go or slash form; None when absent, repeated or malformed."""
    if not isinstance(dn, str) or len(dn) > 8192:
        return None
    text = dn.strip()
    if not text:
        return None
    cns = _slash_cns(text) if text.startswith("/") else _rfc2253_cns(text)
    if not cns or len(cns) != 1:
        return None
    return cns[0]
