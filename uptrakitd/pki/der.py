"""The little DER this package writes by hand: reading one element, writing one, and putting a signature made
elsewhere (a PKCS#11 token) into a structure cryptography built and signed with a placeholder key.

X.509 certificates and CRLs are both SEQUENCE { signed data, signatureAlgorithm,
BIT STRING signature, ... }: the signed data cryptography makes does not depend on the key that signs
it (only on the algorithm, which the placeholder shares), so replacing the signature gives the structure
the real key would have made. tests/test_signer.py proves it byte for byte against deterministic ECDSA.
"""
from __future__ import annotations

from typing import Callable

BASIC_OCSP_OID = bytes.fromhex("06092b0601050507300101")   # id-pkix-ocsp-basic
OCSP_SUCCESSFUL = bytes.fromhex("0a0100")                   # OCSPResponseStatus successful


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element."""
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def read(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at `pos`."""
    tag, n, pos = data[pos], data[pos + 1], pos + 2
    if n & 0x80:
        count = n & 0x7F
        n, pos = int.from_bytes(data[pos:pos + count], "big"), pos + count
    if pos + n > len(data):
        raise ValueError("DER element runs past its container")
    return tag, pos, pos + n


def resign(signed: bytes, sign: Callable[[bytes], bytes]) -> bytes:
    """`signed` (SEQUENCE { data, algorithm, BIT STRING, rest }) with its signature replaced by sign(data)."""
    _, start, end = read(signed, 0)
    data_end = read(signed, start)[2]
    alg_end = read(signed, data_end)[2]
    tag, _, sig_end = read(signed, alg_end)
    if tag != 0x03:
        raise ValueError("no BIT STRING signature where one was expected")
    data = signed[start:data_end]
    return tlv(0x30, data + signed[data_end:alg_end] + tlv(0x03, b"\x00" + sign(data)) + signed[sig_end:end])

