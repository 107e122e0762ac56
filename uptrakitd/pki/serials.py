"""Certificate serial numbers: one canonical text form, compared as integers."""
from __future__ import annotations

import re

_HEX = re.compile(r"^[0-9a-fA-F]+$")


class BadSerial(ValueError):
    """Text that is not a hexadecimal serial number."""


def parse_serial(text: str) -> int:
    """Hex serial in any case, optional colons, optional leading 00 sign byte -> int."""
    if not isinstance(text, str):
        raise BadSerial("serial must be a string")
    cleaned = text.strip().replace(":", "")
    if cleaned.lower().startswith("0x"):
        cleaned = cleaned[2:]
    if not cleaned or len(cleaned) > 80 or not _HEX.match(cleaned):
        raise BadSerial("serial must be hexadecimal")
    return int(cleaned, 16)


def format_serial(serial: int) -> str:
    """Uppercase hex, no colons, no sign byte, even number of digits (as nginx and HAProxy print it)."""
    text = format(serial, "X")
    return text if len(text) % 2 == 0 else "0" + text
