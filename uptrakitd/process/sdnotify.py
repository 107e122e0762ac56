"""systemd's notify protocol (sd_notify(3)): READY, STOPPING and WATCHDOG datagrams to $NOTIFY_SOCKET."""
from __future__ import annotations

import os
import socket
from typing import Mapping

from twisted.logger import Logger

log = Logger()


class Notifier:
    """Sends state changes to systemd when it asked for them (NOTIFY_SOCKET set); otherwise does nothing."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        # an abstract socket is spelt with a leading '@'
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_seconds = int(usec) / 1e6 if usec.isdigit() and mine and self.address else 0.0

    @property
    def enabled(self) -> bool:
        """True under a Type=notify unit."""
        return bool(self.address)

    def send(self, message: str) -> None:
        """One datagram; a failure is logged, never raised (the daemon works without systemd)."""
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(self.address)
                s.sendall(message.encode())
        except OSError as e:
            log.warn("could not notify systemd ({message}): {error}", message=message.split("\n")[0], error=str(e))

    def ready(self) -> None:
        """The listeners are up and the reactor runs."""
        self.send("READY=1\nSTATUS=serving")

    def stopping(self) -> None:
        """A clean stop began."""
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        """The reactor is alive (sent from a timer on it, so a stalled reactor stops sending)."""
        self.send("WATCHDOG=1")
