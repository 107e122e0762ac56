"""One listener per endpoint string, as a service in the tree: start listens, stop stops listening.

A listener that cannot bind ends the daemon with one clear line on stderr and a non-zero status.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorCore
from twisted.protocols.haproxy import proxyEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import is_proxy_protocol
from .guard import SendersOnlyEndpoint

log = Logger()


def with_backlog(description: str, backlog: int) -> str:
    """A tcp (or haproxy:tcp) endpoint string with backlog= added when it has none; others unchanged."""
    inner = description[len("haproxy:"):] if is_proxy_protocol(description) else description
    if not inner.startswith("tcp:") or re.search(r"(^|:)backlog=", inner):
        return description
    return f"{description}:backlog={backlog}"


class ListenerFailed(SystemExit):
    """A listener could not start; raised out of startService so twistd exits before running."""


class ListenerService(StreamServerEndpointService):
    """StreamServerEndpointService that names what it serves and refuses to run without its port."""

    def __init__(self, reactor: IReactorCore, description: str, factory: IProtocolFactory, what: str,
                 proxy_senders: Callable[[str], bool] | None = None,
                 refuse_sender: Callable[[str], None] = lambda ip: None, backlog: int | None = None) -> None:
        self._endpoint_error: str | None = None
        if backlog is not None:
            description = with_backlog(description, backlog)
        try:
            if is_proxy_protocol(description) and proxy_senders is not None:
                # our own PROXY wrapping, so the real TCP peer is checked before its PROXY header counts
                inner = endpoints.serverFromString(reactor, description[len("haproxy:"):])
                endpoint = proxyEndpoint(SendersOnlyEndpoint(inner, proxy_senders, refuse_sender))
            else:
                endpoint = endpoints.serverFromString(reactor, description)
        except (ValueError, TypeError, KeyError) as e:
            self._endpoint_error = f"invalid {what} endpoint {description!r}: {e}"
            endpoint = None
        super().__init__(endpoint, factory)
        self.reactor = reactor
        self.description = description
        self.what = what
        self.port: IListeningPort | None = None
        self.setName(what)

    def privilegedStartService(self) -> None:
        if self._endpoint_error is not None:
            self._fail(self._endpoint_error)
        self._waitingForPort = self.endpoint.listen(self.factory)
        failed: list[Failure] = []
        self._waitingForPort.addCallbacks(self._listening, failed.append)
        if failed:  # endpoints that bind at once (tcp, haproxy, systemd) fail here, before the reactor runs
            self._fail(f"cannot listen for {self.what} on {self.description}: {failed[0].getErrorMessage()}")
        elif not self._waitingForPort.called:
            self._waitingForPort.addErrback(lambda f: self._fail_later(
                f"cannot listen for {self.what} on {self.description}: {f.getErrorMessage()}"))

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        log.info("{what} listening on {address}", what=self.what, address=str(port.getHost()))
        return port

    def _fail(self, message: str) -> None:
        _say(message)
        raise ListenerFailed(1)

    def _fail_later(self, message: str) -> None:
        _say(message)
        # The failure arrived after twistd handed control to the reactor, and twistd turns a normal
        # reactor stop into exit status 0: exiting from an after-shutdown trigger is the only way left
        # to report it (public API offers no exit status).
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self) -> Deferred:
        self.port = None
        return super().stopService()


def _say(message: str) -> None:
    log.critical("{message}", message=message)
    # the process's real stderr: under twistd, sys.stderr is redirected into the log
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"uptrakitd: error: {message}\n")
    stream.flush()
