"""Check, before anything is created, that each listener's endpoint string can be listened on now.

A first start embeds the PKI address in a five-year CA and stores the settings for good, so a typo in an
endpoint string must stop the daemon before the data dir is touched: one line, exit status 2.
"""
from __future__ import annotations

import os
import re
import socket

from twisted.internet import endpoints
from twisted.internet.interfaces import IReactorCore

from ..config import is_proxy_protocol

_TCP = re.compile(r"^tcp:(?:port=)?(?P<port>\d+)(?P<rest>(?::(?:[^:\\]|\\.)+=(?:[^:\\]|\\.)*)*)$")
_UNIX = re.compile(r"^unix:(?:address=)?(?P<path>(?:[^:\\]|\\.)+)")


def _option(rest: str, name: str) -> str:
    # endpoint strings escape ':' in IPv6 addresses as '\:'
    for part in re.split(r"(?<!\\):", rest.lstrip(":")):
        key, _, value = part.partition("=")
        if key == name:
            return value.replace("\\:", ":")
    return ""


def listen_problem(reactor: IReactorCore, description: str) -> str | None:
    """Why `description` cannot be listened on now, or None. TCP: the address is bound and released
    (a port out of range, an interface that is not an address here, a port another process holds);
    UNIX: the socket's directory must exist and be writable; every kind must parse as Twisted parses it.
    systemd sockets are inherited and checked by the real start."""
    inner = description[len("haproxy:"):] if is_proxy_protocol(description) else description
    try:
        endpoints.serverFromString(reactor, inner)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        return f"not a valid endpoint string ({e})"
    if (m := _TCP.match(inner)) is not None:
        port, host = int(m.group("port")), _option(m.group("rest"), "interface")
        if port > 65535:
            return f"port {port} is not a TCP port (0-65535)"
        # as Twisted does: no interface is IPv4's any address, an address with ':' is IPv6
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host or "0.0.0.0", port))
            except socket.gaierror as e:
                return f"{host!r} is not an address of this host ({e.strerror})"
            except (OSError, OverflowError) as e:
                return getattr(e, "strerror", None) or str(e)
    elif (m := _UNIX.match(inner)) is not None:
        directory = os.path.dirname(os.path.abspath(m.group("path").replace("\\:", ":"))) or "/"
        if not os.path.isdir(directory):
            return f"the directory {directory} does not exist"
        if not os.access(directory, os.W_OK | os.X_OK):
            return f"the directory {directory} is not writable by this user"
    return None
