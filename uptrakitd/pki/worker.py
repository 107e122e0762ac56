"""The PKI worker process: CRL signing and certificate issuing run there, off the reactor, and the CA keys it
needs are made there from their specs (signer.py). One process, started on first use (spawn: it shares no
state with the daemon but what it is sent), retired at stop. `submit` returns a Deferred fired in the reactor
thread when the job ends: no thread waits on a job."""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorFromThreads


def _worker_init(parent: int) -> None:
    """In the worker: no core dumps (it holds the CA keys, or the token's PIN, too); leave when the daemon is
    gone (kill -9 included), instead of lingering with its stdout and stderr open."""
    import threading
    import time

    from ..process.nodump import no_core_dumps
    no_core_dumps()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)
    threading.Thread(target=watch, name="uptrakitd-worker-parent-watch", daemon=True).start()


class PkiWorker:
    """Owns the worker process; given to the CRL publisher and the CA alike."""

    def __init__(self, reactor: IReactorFromThreads) -> None:
        self.reactor = reactor
        self._executor: ProcessPoolExecutor | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        """fn(*args) in the worker process (a module-level function; arguments pickled); fires with its result,
        or fails with the exception it raised (a CsrRejected comes back as is)."""
        if self._executor is None:
            self._executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_worker_init, initargs=(os.getpid(),))
        done: Deferred = Deferred()
        self._executor.submit(fn, *args).add_done_callback(
            lambda future: self.reactor.callFromThread(_settle, done, future))
        return done

    def retire(self, result: Any = None) -> Any:
        """Let the process go once the jobs it has are done (it is started again on the next submit); passes
        `result` through, to be chained after a last job."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)
        return result


def _settle(done: Deferred, future: Future) -> None:
    if future.cancelled():
        done.errback(CancelledError())
    elif future.exception() is not None:
        done.errback(future.exception())
    else:
        done.callback(future.result())
