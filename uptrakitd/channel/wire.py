"""The channel's envelope and message checks (SPEC §5). Pure functions."""
from __future__ import annotations

import json
import re
from typing import Any

from ..jsontext import loads_strict
from ..printable import has_control

PROTOCOL_VERSION = 1
MAX_FRAME = 1024 * 1024
_TYPE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

# Close reasons (code 1008 unless noted).
CERT_REVOKED = "certificate revoked"
CERT_NOT_RECOGNIZED = "certificate not recognized"
CERT_ROTATED = "certificate rotated"
SERVICE_DEACTIVATED = "service deactivated"
SERVICE_NOT_APPROVED = "service not approved"
ENROLLMENT_TIMEOUT = "enrollment timeout"
CLUSTER_STALE = "controller out of date"   # with TRY_AGAIN_LATER: this controller cannot confirm the others' changes
TRY_AGAIN_LATER = 1013
SUPERSEDED = "superseded by new connection"
RATE_LIMITED = "rate limit exceeded"
SLOW_CONSUMER = "slow consumer"
PROTOCOL_ERROR = "protocol error"
SECRET_NOT_RECOGNIZED = "enrollment secret not recognized"
POLICY_VIOLATION = 1008
GOING_AWAY = 1001


class ProtocolViolation(ValueError):
    """A frame that breaks the envelope rules: answered with `error`, then the socket closes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def decode(payload: bytes, expected_seq: int) -> dict[str, Any]:
    """Parse and check one inbound frame: JSON object, protocol_version 1, the expected seq, a type."""
    try:
        message = loads_strict(payload)
    except ValueError as e:
        raise ProtocolViolation("invalid_json", f"frame is not valid JSON: {e}") from None
    if not isinstance(message, dict):
        raise ProtocolViolation("invalid_envelope", "frame must be a JSON object")
    if message.get("protocol_version") != PROTOCOL_VERSION or isinstance(message.get("protocol_version"), bool):
        raise ProtocolViolation("unsupported_version", f"protocol_version must be {PROTOCOL_VERSION}")
    seq = message.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq != expected_seq:
        raise ProtocolViolation("bad_seq", f"seq must be {expected_seq}")
    kind = message.get("type")
    if not isinstance(kind, str) or not _TYPE.match(kind):
        raise ProtocolViolation("invalid_type", "type must be a snake_case string")
    return message


def encode(kind: str, seq: int, **payload: Any) -> bytes:
    """One outbound frame."""
    return json.dumps({"protocol_version": PROTOCOL_VERSION, "seq": seq, "type": kind, **payload},
                      separators=(",", ":")).encode("utf-8")


def field(message: dict[str, Any], name: str, kind: type | tuple[type, ...], required: bool = True,
          max_len: int = 16384, name_like: bool = False) -> Any:
    """A checked payload field; ProtocolViolation when missing or of the wrong type (`name_like`: or when
    the text holds a control character, uptrakitd.printable)."""
    if name not in message or message[name] is None:
        if required:
            raise ProtocolViolation("invalid_message", f"{message.get('type')}: {name} is required")
        return None
    value = message[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ProtocolViolation("invalid_message", f"{message.get('type')}: {name} has the wrong type")
    if isinstance(value, str) and len(value) > max_len:
        raise ProtocolViolation("invalid_message", f"{message.get('type')}: {name} is too long")
    if name_like and isinstance(value, str) and has_control(value):
        raise ProtocolViolation("invalid_message", f"{message.get('type')}: {name} must not contain control "
                                                   "characters")
    return value
