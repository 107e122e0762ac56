"""Strict JSON for untrusted input: valid UTF-8, no lone surrogates (they cannot be stored or echoed)."""
from __future__ import annotations

import json
from typing import Any


def loads_strict(raw: bytes) -> Any:
    """Parse untrusted JSON; ValueError for anything that is not valid JSON text in valid Unicode."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, RecursionError):
        raise ValueError("not valid JSON") from None
    try:
        # "\ud800" is valid JSON syntax but not a character: it would fail later, in the database
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("JSON text contains a lone surrogate (\\ud800-\\udfff)") from None
    except RecursionError:
        raise ValueError("not valid JSON") from None
    return value
