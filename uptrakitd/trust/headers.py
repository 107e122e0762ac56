"""Parsers for the client-certificate headers real proxies send (SPEC §3.4). Pure functions.

They only ever raise MalformedHeader, whatever the input: a header is attacker-reachable text.
"""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from urllib.parse import unquote, unquote_plus

from .split import split_outside_quotes

MAX_HEADER = 64 * 1024
INFO_FORMATS = ("auto", "kv", "xfcc", "traefik")
_XFCC_KEYS = {"by", "hash", "cert", "chain", "subject", "uri", "dns"}
_XFCC_UNIQUE = {"cert", "hash", "subject", "by", "chain"}
_KV_KEYS = {"subject", "issuer", "serialnumber", "serial"}
_TRAEFIK_KEYS = ("Subject", "Issuer", "SerialNumber", "NB", "NA", "SAN")
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)
_B64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


class MalformedHeader(ValueError):
    """A forwarded client-certificate header that is malformed or ambiguous."""


@dataclass(frozen=True)
class ForwardedClientCert:
    """What a proxy said about the client certificate (unverified until identity.py checks it)."""

    subject: str | None = None
    issuer: str | None = None
    serial: int | None = None
    cert_der: bytes | None = None
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()


def _b64_der(text: str) -> bytes:
    cleaned = "".join(text.split())
    if not cleaned or not _B64.match(cleaned):
        raise MalformedHeader("certificate is not base64")
    try:
        der = base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedHeader("certificate is not base64") from None
    if len(der) < 16 or der[0] != 0x30:
        raise MalformedHeader("certificate is not DER")
    return der


def parse_cert_header(value: str) -> bytes:
    """The leaf certificate's DER from a PEM-carrying header (RFC 9440, PEM, base64 DER, Traefik list)."""
    try:
        return _parse_cert_header(value)
    except MalformedHeader:
        raise
    except (ValueError, UnicodeError, TypeError, IndexError) as e:
        raise MalformedHeader(f"unparseable certificate header ({type(e).__name__})") from None


def _parse_cert_header(value: str) -> bytes:
    if not isinstance(value, str):
        raise MalformedHeader("header value must be text")
    if len(value) > MAX_HEADER:
        raise MalformedHeader("header too large")
    text = value.strip()
    if not text:
        raise MalformedHeader("empty certificate header")
    if text.startswith(":"):
        # RFC 9440 byte sequence (a list would be Client-Cert-Chain; here only one item is allowed)
        if not (text.endswith(":") and len(text) > 2) or ":" in text[1:-1]:
            raise MalformedHeader("malformed RFC 9440 byte sequence")
        return _b64_der(text[1:-1])
    if "%" in text:
        if not _valid_percent(text):
            raise MalformedHeader("malformed percent-encoding")
        text = unquote(text, errors="strict")
    if "-----BEGIN" in text:
        blocks = _PEM.findall(text)
        if not blocks:
            raise MalformedHeader("PEM without a complete certificate block")
        return _b64_der(blocks[0])
    if "," in text:  # Traefik sends the chain comma-joined, leaf first
        text = text.split(",", 1)[0]
    return _b64_der(text)


def _valid_percent(text: str) -> bool:
    return re.search(r"%(?![0-9A-Fa-f]{2})", text) is None


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts = split_outside_quotes(text, sep, escapes="quoted")
    if parts is None:
        raise MalformedHeader("unterminated quoted value")
    return parts


def _value(raw: str) -> str:
    raw = raw.strip()
    if raw.startswith('"'):
        if len(raw) < 2 or not raw.endswith('"'):
            raise MalformedHeader("malformed quoted value")
        inner, out, i = raw[1:-1], [], 0
        while i < len(inner):
            if inner[i] == "\\" and i + 1 < len(inner) and inner[i + 1] in '"\\':
                out.append(inner[i + 1])
                i += 2
            elif inner[i] == '"':
                raise MalformedHeader("unescaped quote inside a quoted value")
            else:
                out.append(inner[i])
                i += 1
        return "".join(out)
    if '"' in raw:
        raise MalformedHeader("quote inside an unquoted value")
    return raw


def _pairs(element: str) -> list[tuple[str, str]]:
    pairs = []
    for item in _split_outside_quotes(element, ";"):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key.strip()):
            raise MalformedHeader("expected key=value pairs")
        pairs.append((key.strip().lower(), _value(raw)))
    return pairs


def _hex_serial(text: str) -> int:
    cleaned = text.strip().replace(":", "")
    if not cleaned or len(cleaned) > 80 or not re.fullmatch(r"[0-9A-Fa-f]+", cleaned):
        raise MalformedHeader("serial number is not hexadecimal")
    return int(cleaned, 16)


def _dec_serial(text: str) -> int:
    cleaned = text.strip()
    if not cleaned or len(cleaned) > 100 or not re.fullmatch(r"[0-9]+", cleaned):
        raise MalformedHeader("serial number is not decimal")
    return int(cleaned)


def _xfcc(value: str) -> ForwardedClientCert:
    elements = _split_outside_quotes(value, ",")
    parsed = [_pairs(e) for e in elements]
    if not parsed or not parsed[-1]:
        raise MalformedHeader("empty XFCC element")
    for pairs in parsed:
        keys = [k for k, _ in pairs]
        for unique in _XFCC_UNIQUE:
            if keys.count(unique) > 1:
                raise MalformedHeader(f"duplicate {unique} in one XFCC element")
    last = parsed[-1]  # added by the nearest proxy
    found = dict(last)
    cert_der = parse_cert_header(found["cert"]) if found.get("cert") else None
    return ForwardedClientCert(subject=found.get("subject"), issuer=None, serial=None, cert_der=cert_der,
                               uris=tuple(v for k, v in last if k == "uri"),
                               dns=tuple(v for k, v in last if k == "dns"))


def _kv(value: str) -> ForwardedClientCert:
    if len(_split_outside_quotes(value, ",")) > 1:
        raise MalformedHeader("several elements in a single-element header")
    pairs = _pairs(value)
    keys = [k for k, _ in pairs]
    for key in set(keys):
        if keys.count(key) > 1:
            raise MalformedHeader(f"duplicate {key}")
    found = dict(pairs)
    serial_text = found.get("serialnumber", found.get("serial"))
    cert_der = parse_cert_header(found["cert"]) if found.get("cert") else None
    return ForwardedClientCert(subject=found.get("subject"), issuer=found.get("issuer"),
                               serial=_hex_serial(serial_text) if serial_text else None, cert_der=cert_der)


def _traefik(value: str) -> ForwardedClientCert:
    text = unquote_plus(value)
    # Values are quoted but nothing inside them is escaped: split only at `";Key="` for known keys.
    boundary = re.compile(r'(?:^|(?<=");)(' + "|".join(_TRAEFIK_KEYS) + r')="')
    starts = list(boundary.finditer(text))
    if not starts or starts[0].start() != 0:
        raise MalformedHeader("not a Traefik client-cert info header")
    fields: dict[str, str] = {}
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)  # the match starts at its ";"
        chunk = text[m.end():end]
        if not chunk.endswith('"'):
            raise MalformedHeader("unterminated Traefik value")
        if m.group(1) in fields:
            raise MalformedHeader(f"duplicate {m.group(1)}")
        fields[m.group(1)] = chunk[:-1]
    serial = _dec_serial(fields["SerialNumber"]) if fields.get("SerialNumber") else None
    sans = tuple(s for s in fields.get("SAN", "").split(",") if s)
    return ForwardedClientCert(subject=fields.get("Subject") or None, issuer=fields.get("Issuer") or None,
                               serial=serial, uris=tuple(s for s in sans if "://" in s),
                               dns=tuple(s for s in sans if "://" not in s))


def detect_format(value: str) -> str:
    """Which grammar an info header value uses (the `auto` rule)."""
    stripped = value.strip()
    if "=" not in stripped and re.search(r"%3[Dd]", stripped):
        return "traefik"
    try:
        keys = {k for element in _split_outside_quotes(stripped, ",") for k, _ in _pairs(element)}
        elements = len(_split_outside_quotes(stripped, ","))
    except MalformedHeader:
        return "kv"
    if {"nb", "na"} & keys:
        return "traefik"
    if elements > 1 or keys & {"by", "hash", "cert", "chain", "uri", "dns"}:
        return "xfcc"
    return "kv"


def parse_info_header(value: str, fmt: str = "auto") -> ForwardedClientCert:
    """Parse a structured client-cert header (Envoy XFCC, nginx/HAProxy kv, Traefik Info)."""
    if not isinstance(value, str):
        raise MalformedHeader("header value must be text")
    if len(value) > MAX_HEADER:
        raise MalformedHeader("header too large")
    if fmt not in INFO_FORMATS:
        raise MalformedHeader(f"unknown info header format {fmt!r}")
    if not value.strip():
        raise MalformedHeader("empty info header")
    try:
        chosen = detect_format(value) if fmt == "auto" else fmt
        if chosen == "xfcc":
            return _xfcc(value)
        if chosen == "traefik":
            return _traefik(value)
        return _kv(value)
    except MalformedHeader:
        raise
    except (ValueError, UnicodeError, KeyError, IndexError, TypeError) as e:
        raise MalformedHeader(f"unparseable header ({type(e).__name__})") from None
