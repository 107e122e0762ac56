"""Service-tree building blocks: children stopped one after the other, periodic jobs, signals."""
from __future__ import annotations

import signal
from typing import Any, Callable, Protocol

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


class OrderedServices(MultiService):
    """A MultiService that stops its children one at a time, last started first.

    MultiService stops every child at once; ours depend on each other (the channel must say
    goodbye while the store still runs, a CRL rebuild must finish before the store closes).
    """

    @inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        for child in reversed(list(self)):
            if child.running:
                try:
                    yield maybeDeferred(child.stopService)
                except Exception:
                    log.failure("stopping {name} failed", name=child.name)


STOP_WAIT_SECONDS = 10.0


class PeriodicJob(Service):
    """Runs `job()` every `interval` seconds on an injected clock; a failing run is logged, never fatal.

    As Twisted's TimerService: a run that returns a Deferred is waited for before the next is scheduled
    (runs never overlap), and stopping waits for the running one (here at most STOP_WAIT_SECONDS: a run
    stuck on an unreachable database must not hold the whole shutdown).
    """

    def __init__(self, name: str, interval: float, job: Callable[[], Any], clock: IReactorTime,
                 run_at_start: bool = False) -> None:
        self.setName(name)
        self.interval = interval
        self.job = job
        self.clock = clock
        self.run_at_start = run_at_start
        self._loop: LoopingCall | None = None
        self._current: Deferred | None = None

    def _run(self) -> Deferred:
        d = maybeDeferred(self.job)
        d.addErrback(lambda f: log.failure("{name} failed", f, name=self.name))
        self._current = d
        return d   # LoopingCall schedules the next run only once this one is over

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._run)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=self.run_at_start)

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        current = self._current
        if current is None or current.called:
            return None
        waited: Deferred = Deferred()

        def give_up() -> None:
            if not waited.called:
                log.warn("{name}: stopped without waiting longer for its running call", name=self.name)
                waited.callback(None)
        timer = self.clock.callLater(STOP_WAIT_SECONDS, give_up)

        def over(result: Any) -> Any:
            if not waited.called:
                timer.cancel()
                waited.callback(None)
            return result
        current.addBoth(over)
        return waited


class _Reactor(Protocol):
    def callFromThread(self, fn: Callable[..., Any], *args: Any) -> None: ...

    def callWhenRunning(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def stop(self) -> None: ...


class SignalHandlers(Service):
    """SIGHUP reloads; with `handle_term`, SIGTERM stops the reactor as a completed, clean shutdown.

    Both are installed before the listeners start (whoever sees the "listening" line may signal at
    once), and SIGTERM again once the reactor runs (its start-up installs its own). twistd then exits
    0 after a clean stop instead of re-raising the signal (exit 143).
    """

    def __init__(self, reactor: _Reactor, reload: Callable[[], Any], handle_term: bool = False) -> None:
        self.setName("signals")
        self.reactor = reactor
        self.reload = reload
        self.handle_term = handle_term
        self._previous: dict[int, Any] = {}

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._install_now()

    def startService(self) -> None:
        super().startService()
        self._install_now()
        if self.handle_term:
            # again once the reactor runs: its start-up installs its own SIGTERM handler over ours
            self.reactor.callWhenRunning(self._install, signal.SIGTERM, self._terminate)

    def _install_now(self) -> None:
        # before the listeners start: whoever sees the "listening" line may signal at once
        self._install(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        if self.handle_term:
            self._install(signal.SIGTERM, self._terminate)

    def _install(self, signum: int, handler: Any) -> None:
        self._previous.setdefault(signum, signal.getsignal(signum))
        signal.signal(signum, handler)

    def _terminate(self, signum: int, frame: Any) -> None:
        log.info("SIGTERM: shutting down")
        self.reactor.callFromThread(self.reactor.stop)

    def stopService(self) -> Any:
        super().stopService()
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        return None


class Hooks(Service):
    """A named child whose start and stop call the given functions (stop may return a Deferred)."""

    def __init__(self, name: str, start: Callable[[], Any] = lambda: None,
                 stop: Callable[[], Any] = lambda: None) -> None:
        self.setName(name)
        self._start = start
        self._stop = stop

    def startService(self) -> None:
        super().startService()
        self._start()

    def stopService(self) -> Any:
        super().stopService()
        return self._stop()


def stop_with_status(reactor: Any, status: int) -> None:
    """Stop the reactor cleanly, then exit with `status`. twistd turns a normal reactor stop into exit status 0,
    and no public API sets another: exiting from an after-shutdown trigger is the only way to report a failure
    found once the reactor runs (a listener that cannot bind, an agent that gave up)."""
    import os
    reactor.addSystemEventTrigger("after", "shutdown", os._exit, status)
    if getattr(reactor, "running", False):
        reactor.callLater(0, reactor.stop)
    else:
        reactor.callWhenRunning(reactor.stop)
