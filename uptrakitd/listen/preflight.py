"""Check that the listeners can bind before a first start creates anything that embeds their address."""
from __future__ import annotations

import re
import socket

_TCP = re.compile(r"^(?:haproxy:)?tcp:(?:port=)?(?P<port>\d+)(?P<rest>(?::[^:]+=[^:]*)*)$")


class CannotListen(Exception):
    """The endpoint cannot be bound now; the message says why."""


def _interface(rest: str) -> str:
    # endpoint strings escape ':' in IPv6 addresses as '\:'
    for part in re.split(r"(?<!\\):", rest.lstrip(":")):
        key, _, value = part.partition("=")
        if key == "interface":
            return value.replace("\\:", ":")
    return ""


def check_bindable(description: str, what: str) -> None:
    """Bind and release a TCP endpoint string's address; CannotListen when that fails. Others pass."""
    m = _TCP.match(description)
    if m is None:
        return  # systemd sockets, unix sockets...: nothing to check before the real listen
    port, host = int(m.group("port")), _interface(m.group("rest")) or "::"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CannotListen(f"cannot listen for {what} on {description}: {host!r} does not resolve ({e.strerror})") \
            from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise CannotListen(f"cannot listen for {what} on {description}: {e.strerror}") from None
