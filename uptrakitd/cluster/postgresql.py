"""Several controllers on one PostgreSQL, the parts that talk to the database on their own: `Leadership` (who
runs the once-per-database jobs) and `ChangeFeed` (what the others changed). Both run their blocking work in
threads of their own, with their own connections; the engine code they use is in uptrakitd.store.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger

from ..store import changes, controllers
from ..store.common import close_quietly, transaction
from ..store.postgresql import MIGRATION_LOCK, PgConnection, connect

log = Logger()
LEADER_LOCK = MIGRATION_LOCK - 1   # pg_advisory_lock key held by the controller that runs the periodic jobs


class Leadership:
    """Which controller runs the jobs that must run once per database (automatic CA rotation, pruning
    the change log, releasing dead controllers' services): the one whose session holds an advisory
    lock. Every controller serves, issues and revokes; only these jobs must not run twice. PostgreSQL
    drops a dead controller's session, and its lock with it, so another one takes over at its next
    `check()` (every 2 s). Every check also refreshes this controller's row in `controllers`."""

    def __init__(self, url: str, controller_id: str, hostname: str, started_at: int,
                 ca_generation: Callable[[], int] = lambda: 0) -> None:
        self.url = url
        self.ca_generation = ca_generation   # the active CA generation (its TLS context trusts it)
        self.controller_id = controller_id
        self.hostname = hostname
        self.started_at = started_at
        self._conn: PgConnection | None = None
        self.leader = False
        self._lock = threading.Lock()   # check() and release() run in threads and share the session
        self._released = False

    def check(self) -> bool:
        """Keep or try to take the lock (blocking: run it in a thread); True while this controller leads."""
        with self._lock:
            return self._check() if not self._released else False

    def _check(self) -> bool:
        try:
            if self._conn is None:
                self._conn = connect(self.url, self.controller_id)
            if not self.leader and self._conn.execute("SELECT pg_try_advisory_lock(?) AS locked",
                                                      (LEADER_LOCK,)).fetchone()["locked"]:
                self.leader = True
                log.info("this controller is now the leader: it runs the jobs that run once per database")
            now = int(time.time())
            # a live session means the lock is still ours
            transaction(self._conn, controllers.heartbeat, self.controller_id, self.hostname, self.started_at, now,
                        self.leader, self.ca_generation())
            if self.leader:
                for dead in transaction(self._conn, controllers.clear_dead, now):
                    log.info("controller {controller} was not seen for {seconds} s: its services are released",
                             controller=dead, seconds=controllers.DEAD_AFTER_SECONDS)
        except Exception as e:   # the database is away: whoever holds the lock when it is back leads
            if self._conn is not None:
                close_quietly(self._conn)
                self._conn = None
            if self.leader:
                log.warn("lost the database session that made this controller the leader: {error}",
                         error=str(e).strip())
            self.leader = False
        return self.leader

    def release(self) -> None:
        """At stop: leave the controllers' table and give the lock up (another leads within its next check)."""
        with self._lock:
            self._released = True
            if self._conn is not None:
                try:
                    transaction(self._conn, controllers.leave, self.controller_id)
                except Exception as e:
                    log.warn("could not remove this controller's row: {error}", error=str(e).strip())
                close_quietly(self._conn)
                self._conn = None
            self.leader = False


class ChangeFeed:
    """Applies what other controllers on the database changed (store/changes.py), in commit order.

    A thread LISTENs for `uptrakit_changes` and, on a notification or after a second without one,
    reads the change rows after the last it applied and hands them to `apply` on the reactor, waiting
    for it. Rows are read again from a little before the last one (`WINDOW`), so a transaction that took
    its sequence number earlier but committed later is not skipped. The controller's own changes are
    already in its memory and are not applied again.
    """

    WINDOW = 200
    BATCH = 1000

    def __init__(self, url: str, reactor: Any, after: int, controller_id: str,
                 apply: Callable[[list[Any]], Any], confirm: Callable[[float], None] = lambda started: None) -> None:
        self.url = url
        self.confirm = confirm   # ClusterFreshness.confirm: every change committed before `started` is applied
        self.reactor = reactor
        self.last = after
        self.controller_id = controller_id
        self.apply = apply
        self._seen: set[int] = set()
        self._running = False
        self._stopped: Deferred | None = None

    def start(self) -> None:
        self._running = True
        self._stopped = Deferred()
        threading.Thread(target=self._loop, name="uptrakitd-change-feed", daemon=True).start()

    def stop(self) -> Deferred | None:
        """Stop reading; fires when the thread is done (within about a second)."""
        self._running = False
        return self._stopped

    def _loop(self) -> None:
        conn: PgConnection | None = None
        failed = False
        try:
            while self._running:
                try:
                    if conn is None:
                        conn = connect(self.url)
                        conn.execute(f"LISTEN {changes.CHANNEL}")
                        if failed:
                            log.info("change feed: reconnected; reading what was missed")
                            failed = False
                    started = time.time()
                    rows = changes.since(conn, max(0, self.last - self.WINDOW), self.BATCH)
                    fresh = [c for c in rows if c.seq not in self._seen]
                    theirs = [c for c in fresh if c.controller_id != self.controller_id]
                    done = len(theirs)
                    if theirs and self._running:
                        done = blockingCallFromThread(self.reactor, self.apply, theirs)
                    # what was dealt with is done; from the first change that was not, read again
                    until = theirs[done].seq if done < len(theirs) else None
                    for c in fresh:
                        if until is not None and c.seq >= until:
                            break
                        self._seen.add(c.seq)
                        self.last = max(self.last, c.seq)
                    self._seen = {seq for seq in self._seen if seq > self.last - self.WINDOW}
                    if until is not None:
                        time.sleep(1.0)   # the database is away for the store too: give it a moment
                    elif len(rows) < self.BATCH:
                        self.confirm(started)
                        for _ in conn.raw.notifies(timeout=1.0, stop_after=1):
                            pass
                except Exception as e:
                    if not failed:
                        log.error("change feed: {error}; retrying every second", error=str(e).strip())
                    failed = True
                    if conn is not None:
                        close_quietly(conn)
                        conn = None
                    time.sleep(1.0)
        finally:
            if conn is not None:
                close_quietly(conn)
            stopped = self._stopped
            if stopped is not None:
                self.reactor.callFromThread(stopped.callback, None)
