"""Text that reaches a log line or a certificate must not carry control characters.

A newline in an agent's host name makes a fake log line, ESC drives the operator's terminal, CR hides
what came before it; the same characters in `pki_addr` would be embedded in the CA's URLs. Names are
refused at the edge (`has_control`); whatever is logged anyway is escaped (`escape_controls`). Unicode's
invisible format characters count too: a bidi override (U+202E) shows `vm-evil` as `vm-live` in a list, and
zero-width characters make two names that look the same.
"""
from __future__ import annotations

import re
import unicodedata

# C0, DEL, C1, the Unicode line and paragraph separators, and the format characters (category Cf: soft hyphen,
# Arabic letter mark, zero-width and joiners, bidi marks, embeddings, overrides and isolates, invisible operators,
# BOM, interlinear annotation, tags)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff"
                      "\ufff9-\ufffb\U000e0000-\U000e007f]")


def _format_character(ch: str) -> bool:
    return unicodedata.category(ch) == "Cf"


def has_control(text: str) -> bool:
    """True when `text` holds a control or format character (tab and newline included)."""
    return _CONTROL.search(text) is not None or (not text.isascii() and any(map(_format_character, text)))


def escape_controls(text: str) -> str:
    """`text` with each control or format character written as a Python escape (`\\n`, `\\x1b`, `\\u202e`)."""
    if not has_control(text):
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii") if _CONTROL.match(ch) or _format_character(ch) else ch
                   for ch in text)
