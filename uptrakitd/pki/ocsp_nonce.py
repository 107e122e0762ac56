"""Nonce answers from templates: one built by cryptography, then re-dated, given the nonce and re-signed.

A nonce answer is signed per request. Through `OCSPResponseBuilder`, building, signing and encoding it
were ~45 % of the reactor's time for a delegated (P-256) answer, the signature itself ~10 %. So the first
answer for a (certificate, status, signer, nonce length) is built by cryptography with placeholders, and
kept as the bytes around four holes of fixed length: producedAt, thisUpdate, nextUpdate and the nonce.
Later answers fill the holes, sign the result with the same key and hash, and wrap it the way the first
one was wrapped. What a template holds is everything but times and nonce, so the status (good, revoked
with its time and reason, unknown) is part of its key: a revocation makes a new template.

A template is only used after a check at its making: filled with the placeholder's own values it must
give byte for byte the data cryptography signed, and each hole must be found exactly once. Anything
else (an RSA or Ed25519 CA, a nonce shorter than 8 bytes) is built by cryptography every time.
"""
from __future__ import annotations

import datetime
import os
from typing import Callable, Hashable

from cryptography.x509 import ocsp

from .der import BASIC_OCSP_OID, OCSP_SUCCESSFUL, read, tlv

MAX_TEMPLATES = 10_000
MIN_NONCE = 8   # a shorter placeholder could be found elsewhere in the data by chance
_TEMPLATE_TIME = datetime.datetime(2000, 1, 1, 0, 0, 1, tzinfo=datetime.timezone.utc)

# build(nonce, this_update, next_update) -> the DER answer, as cryptography makes it
Build = Callable[[bytes, datetime.datetime, datetime.datetime], bytes]


def _time(when: datetime.datetime) -> bytes:
    """A GeneralizedTime's content (always 15 bytes for years 1000-9999)."""
    return when.strftime("%Y%m%d%H%M%SZ").encode()


class _Times:
    """`_time` of the last few seconds: every answer in a second has the same three times."""

    def __init__(self) -> None:
        self._seen: dict[datetime.datetime, bytes] = {}

    def __call__(self, when: datetime.datetime) -> bytes:
        text = self._seen.get(when)
        if text is None:
            if len(self._seen) >= 8:
                self._seen.clear()
            text = self._seen[when] = _time(when)
        return text


class _Template:
    """The signed data around its holes, and how the signed answer is wrapped."""

    def __init__(self, pieces: tuple[bytes, ...], signature_algorithm: bytes, certs: bytes) -> None:
        self.pieces = pieces
        self.signature_algorithm = signature_algorithm
        self.certs = certs

    def data(self, produced: bytes, this_update: bytes, next_update: bytes, nonce: bytes) -> bytes:
        p = self.pieces
        return b"".join((p[0], produced, p[1], this_update, p[2], next_update, p[3], nonce, p[4]))

    def wrap(self, data: bytes, signature: bytes) -> bytes:
        basic = tlv(0x30, data + self.signature_algorithm + tlv(0x03, b"\x00" + signature) + self.certs)
        return tlv(0x30, OCSP_SUCCESSFUL + tlv(0xA0, tlv(0x30, BASIC_OCSP_OID + tlv(0x04, basic))))


def _make(der: bytes, placeholder: bytes, this_update: datetime.datetime,
          next_update: datetime.datetime) -> _Template | None:
    """The template of `der` (built with `placeholder` and these times), or None when it cannot be one."""
    try:
        return _parts(der, placeholder, this_update, next_update)
    except (ValueError, IndexError):   # a shape other than the one expected: build every answer instead
        return None


def _parts(der: bytes, placeholder: bytes, this_update: datetime.datetime,
           next_update: datetime.datetime) -> _Template | None:
    data = ocsp.load_der_ocsp_response(der).tbs_response_bytes
    # ResponseData { [0] version (absent: v1), responderID, producedAt, responses, [1] extensions }
    _, pos, _ = read(data, 0)
    tag, _, pos = read(data, pos)
    if tag == 0xA0:
        _, _, pos = read(data, pos)
    tag, produced, after = read(data, pos)
    if tag != 0x18 or after - produced != 15:
        return None
    # the rest is searched: the placeholder times (in 2000) and nonce must each be there exactly once
    rest = data[after:]
    marks = [b"\x18\x0f" + _time(this_update), b"\x18\x0f" + _time(next_update), placeholder]
    if any(rest.count(mark) != 1 for mark in marks):
        return None
    at = [produced] + [after + rest.index(mark) + (2 if i < 2 else 0) for i, mark in enumerate(marks)]
    if at != sorted(at):
        return None
    sizes = (15, 15, 15, len(placeholder))
    pieces = (data[:at[0]], *(data[at[i] + sizes[i]:at[i + 1]] for i in range(3)), data[at[3] + sizes[3]:])
    # OCSPResponse { status, [0] { OID, OCTET STRING { BasicOCSPResponse { data, algorithm, signature, certs } } } }
    _, start, end = read(der, 0)
    _, start, end = read(der, read(der, start)[2])          # [0]
    _, start, end = read(der, start)                        # SEQUENCE
    _, start, end = read(der, read(der, start)[2])          # OCTET STRING, after the OID
    _, start, end = read(der, start)                        # BasicOCSPResponse
    alg_start = read(der, start)[2]                          # after the signed data
    if der[start:alg_start] != data:
        return None
    alg_end = read(der, alg_start)[2]
    certs_start = read(der, alg_end)[2]                      # after the signature BIT STRING
    template = _Template(pieces, der[alg_start:alg_end], der[certs_start:end])
    if template.data(data[produced:after], marks[0][2:], marks[1][2:], placeholder) != data:
        return None
    return template


class NonceTemplates:
    """Bounded templates by key (cleared when full); `built` and `filled` count what was done."""

    def __init__(self, now: Callable[[], datetime.datetime], max_templates: int = MAX_TEMPLATES) -> None:
        self.now = now   # producedAt, whole seconds
        self.max_templates = max_templates
        self._templates: dict[Hashable, _Template | None] = {}
        self.built = 0    # answers cryptography built (templates made, and what cannot be templated)
        self.filled = 0   # answers made from a template
        self._times = _Times()

    def __len__(self) -> int:
        return len(self._templates)

    def answer(self, key: Hashable, build: Build, sign: Callable[[bytes], bytes] | None,
               nonce: bytes, this_update: datetime.datetime, next_update: datetime.datetime) -> bytes:
        """The DER answer `build` would make for `nonce` and these times, signed by `sign` (the signature over
        the data as the answer carries it, with the key and hash `build` signs with; None: build every answer).

        `key` must name everything else the answer holds (certificate, status, signer, validity).
        """
        if len(nonce) < MIN_NONCE or sign is None:
            self.built += 1
            return build(nonce, this_update, next_update)
        key = (key, len(nonce))
        if key not in self._templates:
            if len(self._templates) >= self.max_templates:
                self._templates.clear()
            placeholder = os.urandom(len(nonce))
            template_next = _TEMPLATE_TIME + (next_update - this_update)
            self._templates[key] = _make(build(placeholder, _TEMPLATE_TIME, template_next), placeholder,
                                         _TEMPLATE_TIME, template_next)
        template = self._templates[key]
        if template is None:
            self.built += 1
            return build(nonce, this_update, next_update)
        self.filled += 1
        # producedAt is the moment of signing (whole seconds), as cryptography sets it
        times = self._times
        data = template.data(times(self.now()),
                             times(this_update), times(next_update), nonce)
        return template.wrap(data, sign(data))
