"""Quote-aware splitting shared by the header, DN and Forwarded parsers. Pure function."""
from __future__ import annotations


def split_outside_quotes(text: str, separators: str, escapes: str = "quoted") -> list[str] | None:
    """Split `text` on any of `separators` that are outside double quotes.

    `escapes`: "quoted" — a backslash escapes the next character inside quotes (XFCC, kv);
    "anywhere" — also outside quotes (RFC 2253 DNs); "none" — backslashes are plain (RFC 7239).
    Escape sequences are kept as they are. None when a quote or an escape is left open.
    """
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and (escapes == "anywhere" or (escapes == "quoted" and quoted)):
            if i + 1 >= len(text):
                return None
            current.append(text[i:i + 2])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        if ch in separators and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    if quoted:
        return None
    parts.append("".join(current))
    return parts
