"""Text that reaches a log line or a certificate must not carry control characters.

A newline in an agent's host name makes a fake log line, ESC drives the operator's terminal, CR hides
what came before it; the same characters in `pki_addr` would be embedded in the CA's URLs. Names are
refused at the edge (`has_control`); whatever is logged anyway is escaped (`escape_controls`).
"""
from __future__ import annotations

import re

# C0, DEL, C1, and the Unicode line and paragraph separators
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def has_control(text: str) -> bool:
    """True when `text` holds a control character (tab and newline included)."""
    return _CONTROL.search(text) is not None


def escape_controls(text: str) -> str:
    """`text` with each control character written as a Python escape (`\\n`, `\\x1b`, `\\u2028`)."""
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
