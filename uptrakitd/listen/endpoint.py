"""One listener per endpoint string, as a service in the tree: start listens, stop stops listening.

A listener that cannot bind ends the daemon with one clear line on stderr and a non-zero status.
"""
from __future__ import annotations

import re
import sys
from typing import Any, Callable, NoReturn

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorCore
from twisted.protocols.haproxy import proxyEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import is_proxy_protocol
from ..process.lifecycle import stop_with_status
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


class ListenerService(Service):
    """Listens on one endpoint while running (as Twisted's StreamServerEndpointService, whose private
    `_waitingForPort` a subclass would have to set); names what it serves and refuses to run without its port."""

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
        self.endpoint: Any = endpoint
        self.factory = factory
        self.reactor = reactor
        self.description = description
        self._binding: Deferred | None = None   # endpoint.listen()'s, until stopped
        self.what = what
        self.port: IListeningPort | None = None
        self.setName(what)

    def privilegedStartService(self) -> None:
        if self._endpoint_error is not None or self.endpoint is None:
            self._fail(self._endpoint_error or f"no {self.what} endpoint")
        self._binding = self.endpoint.listen(self.factory)
        failed: list[Failure] = []
        self._binding.addCallbacks(self._listening, failed.append)
        if failed:  # endpoints that bind at once (tcp, haproxy, systemd) fail here, before the reactor runs
            self._fail(f"cannot listen for {self.what} on {self.description}: {failed[0].getErrorMessage()}")
        elif not self._binding.called:
            self._binding.addErrback(lambda f: self._fail_later(
                f"cannot listen for {self.what} on {self.description}: {f.getErrorMessage()}"))

    def startService(self) -> None:
        if self._binding is None:   # not started by twistd's privileged phase (tests, the agent)
            self.privilegedStartService()
        super().startService()

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        log.info("{what} listening on {address}", what=self.what, address=str(port.getHost()))
        return port

    def _fail(self, message: str) -> NoReturn:
        _say(message)
        raise ListenerFailed(1)

    def _fail_later(self, message: str) -> None:
        _say(message)
        stop_with_status(self.reactor, 1)   # (the failure arrived after twistd handed control to the reactor)

    def stopService(self) -> Deferred:
        super().stopService()
        self.port = None
        binding, self._binding = self._binding, None
        if binding is None:
            return succeed(None)
        binding.cancel()   # still binding: give up; bound: the port stops listening
        return binding.addCallback(lambda port: port.stopListening() if port is not None else None)


def _say(message: str) -> None:
    log.critical("{message}", message=message)
    # the process's real stderr: under twistd, sys.stderr is redirected into the log
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"uptrakitd: error: {message}\n")
    stream.flush()
