"""Several controllers on one PostgreSQL: what another controller changed, applied here.

`ClusterSync.apply` receives the change-log rows other controllers wrote (store/changes.py, read by
cluster.postgresql.ChangeFeed) and makes this controller agree with the database, through the same
domain methods and events a local change uses: a revocation made on A closes the socket on B, fails
B's next handshake and changes B's OCSP answer; a rotation made on A swaps B's TLS context and tells
B's services. Each change names a row; the row is read again, so applying twice changes nothing.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

from uptrakitd.registry.admin_tokens import AdminTokenRegistry
from ..channel.hub import ChannelHub
from uptrakitd.registry.directory import ServiceDirectory
from ..errors import StorageUnavailable
from uptrakitd.observability.metrics import Metrics
from ..pki.authority import CertificateAuthority
from ..pki.serials import format_serial
from uptrakitd.registry.runtime_settings import RuntimeSettings
from ..store import controllers
from ..store import certificates, services as stored_services
from ..store.changes import Change

log = Logger()
CATCH_UP_SECONDS = 5.0
MAX_CATCH_UPS = 64   # pairs read at once by the catch-up (each is up to two reads on its store)
_ABANDONED = object()   # a catch-up read skipped: every request that wanted it had given up
_SKIPPED = "(skipped)"
TURN = 50   # changes applied per reactor turn


def _unless_abandoned(conn: Any, wanted: list[int], operation: Any, key: str) -> Any:
    """On the store's thread, when the read's turn comes: run it only if a request still waits for it."""
    if wanted[0] <= 0:
        return _ABANDONED
    return operation(conn, key)


class ClusterFreshness:
    """How long ago this controller last confirmed it had applied every change the others made.

    The change feed confirms each time a read of the change log, started at time t, came back complete and
    was applied: from then on every change committed before t is in this controller's memory. Cut off from
    the database (a hung link is silent for tens of seconds), the confirmations stop, and a certificate
    revoked on another controller would still look good here. Past `max_staleness` seconds, `stale()` is
    true: OCSP answers tryLater and new identity decisions are refused (`cluster_stale`) until a read
    confirms again (docs/high-availability.md, "Partitions").
    """

    def __init__(self, clock: Any, max_staleness: float) -> None:
        self.clock = clock
        self.max_staleness = max_staleness
        self.confirmed_at = clock.seconds()
        self._said_stale = False

    def confirm(self, started: float) -> None:
        """A read of the change log begun at `started` (clock seconds) came back complete and was applied.
        Called from the feed's thread: one float is replaced, which is atomic."""
        if started > self.confirmed_at:
            self.confirmed_at = started

    def staleness(self) -> float:
        """Seconds since the last confirmation."""
        return max(0.0, self.clock.seconds() - self.confirmed_at)

    def stale(self) -> bool:
        """True past the bound: nothing here may be taken as current."""
        return self.clock.seconds() - self.confirmed_at > self.max_staleness

    def watch(self) -> None:
        """Say when the state changes (a periodic job, every second)."""
        stale = self.stale()
        if stale and not self._said_stale:
            log.error("cluster: no confirmed read of the other controllers' changes for {seconds:.0f} s (over "
                      "--cluster-max-staleness {bound:g} s; is the database reachable?): OCSP answers tryLater "
                      "and new identities are refused (cluster_stale) until it is back; open sockets stay",
                      seconds=self.staleness(), bound=self.max_staleness)
        elif not stale and self._said_stale:
            log.info("cluster: the other controllers' changes are applied again; OCSP and identities are back")
        self._said_stale = stale

    def describe(self) -> dict[str, Any]:
        """For GET /api/v1/controllers."""
        stale = self.stale()
        return {"stale": stale, "staleness_seconds": round(self.staleness(), 1), "max_staleness": self.max_staleness,
                "reason": ("no confirmed read of the change log within the bound: the database may be unreachable"
                           if stale else None)}


class ClusterSync:
    """Applies other controllers' changes, in order; a change that fails is logged and counted."""

    def __init__(self, ca: CertificateAuthority, directory: ServiceDirectory, runtime: RuntimeSettings,
                 admin_tokens: AdminTokenRegistry, channel: ChannelHub, metrics: Metrics, clock: Any,
                 reads: Any = None) -> None:
        self.clock = clock
        # the catch-up's reads go through a store of their own: the main one may be seconds behind in a storm
        self.reads = reads if reads is not None else ca.store
        self.ca = ca
        self.directory = directory
        self.runtime = runtime
        self.admin_tokens = admin_tokens
        self.channel = channel
        self.metrics = metrics
        self.applied = 0
        self.catch_up_reads = 0
        self._catching_up: dict[tuple[int | None, str | None], Deferred] = {}
        # read and not found, until then: pairs, and services alone as (None, service id)
        self._missed: dict[tuple[int | None, str | None], float] = {}
        self._wanted: dict[tuple[int | None, str | None], list[int]] = {}   # requests still waiting, per read
        self.catch_ups_refused = 0

    @inlineCallbacks
    def apply(self, changes: list[Change]) -> Any:
        """Apply a batch, oldest first (the feed waits for this before reading on); fires with how many
        were dealt with. The database being unreachable stops the batch there: the feed tries the rest
        again (nothing is skipped); any other failure is logged and counted, and the batch goes on.

        The rows the batch names are read first, two queries for the whole batch (a connect storm on
        another controller is thousands of changes): read after the changes were committed, they are at
        least as new as each of them."""
        serials = sorted({c.key for c in changes if c.kind in ("certificate", "revoked")})
        service_ids = sorted({c.key for c in changes if c.kind in ("service", "connected")})
        try:
            certs = (yield self.ca.store.run(certificates.load_many, serials)) if serials else {}
            services = (yield self.directory.store.run(stored_services.load_many, service_ids)) if service_ids else {}
        except StorageUnavailable:
            log.warn("cannot apply {count} change(s) yet: the database cannot be reached; trying again",
                     count=len(changes))
            return 0
        for done, change in enumerate(changes):
            if done and done % TURN == 0:   # a big batch applies without waiting: let the reactor breathe
                yield deferLater(self.clock, 0, lambda: None)
            try:
                yield self._apply_one(change, certs, services)
            except StorageUnavailable:
                log.warn("cannot apply change {seq} ({kind}) yet: the database cannot be reached; trying again",
                         seq=change.seq, kind=change.kind)
                return done
            except Exception:
                log.failure("could not apply change {seq} ({kind} {key}) from controller {controller_id}",
                            seq=change.seq, kind=change.kind, key=change.key, controller_id=change.controller_id)
                self.metrics.cluster_changes.labels(change.kind, "failed").inc()
            else:
                self.metrics.cluster_changes.labels(change.kind, "applied").inc()
                self.applied += 1
        return len(changes)

    def catch_up(self, unknown: tuple[int | None, str | None] | None) -> Any:
        """A request named a certificate or service this controller has no record of, maybe made on another
        controller a moment ago: read those two rows now, without waiting for the change feed (it may be
        behind by seconds in a storm); fires when done, or after CATCH_UP_SECONDS.

        What a flood of made-up names can cost is bounded: requests naming the same pair while its read
        runs share it; a pair, or a service, read and not found is not read again for CATCH_UP_SECONDS; at
        most MAX_CATCH_UPS pairs are read at once (more are decided at once, as not known here); and a read
        whose requests all gave up before the store got to it is skipped, not run."""
        pair = unknown if unknown is not None else (None, None)
        now = self.clock.seconds()
        if self._missed.get(pair, 0.0) > now or (pair[1] is not None and self._missed.get((None, pair[1]), 0.0) > now):
            return succeed(None)
        running = self._catching_up.get(pair)
        if running is None:
            if len(self._catching_up) >= MAX_CATCH_UPS:
                self.catch_ups_refused += 1
                return succeed(None)
            wanted = self._wanted[pair] = [0]
            running = self._catching_up[pair] = self._read(pair, wanted)
            running.addBoth(self._caught_up, pair)
        wanted = self._wanted[pair]
        wanted[0] += 1
        waiter: Deferred = Deferred()

        def release(result: Any) -> Any:
            if not waiter.called:   # (it timed out already)
                wanted[0] -= 1
                waiter.callback(None)
            return result

        def gave_up(failure: Any) -> Any:
            wanted[0] -= 1   # the store may not have got to the read yet: with nobody left, it is skipped
            return failure
        running.addBoth(release)
        return waiter.addTimeout(CATCH_UP_SECONDS, self.clock).addErrback(gave_up)

    def _read(self, pair: tuple[int | None, str | None], wanted: list[int]) -> Deferred:
        serial, service_id = pair
        reads: list[Deferred] = []
        found: list[str] = []
        self.catch_up_reads += 1

        def certificate(row: Any, key: str) -> Any:
            if row is _ABANDONED:
                found.append(_SKIPPED)
            elif row is not None:
                found.append(key)
                return self.ca.adopt_certificate(key, row)
            return None

        def service(values: Any, key: str) -> Any:
            if values is _ABANDONED:
                found.append(_SKIPPED)
            elif values is None:
                self._miss((None, key))   # a service not found: every pair naming it, whatever the serial
            else:
                found.append(key)
                return self.directory.refresh(key, values)
            return None
        if serial is not None:
            reads.append(self.reads.run(_unless_abandoned, wanted, certificates.load_one, format_serial(serial))
                         .addCallback(certificate, format_serial(serial)))
        if service_id is not None:
            reads.append(self.reads.run(_unless_abandoned, wanted, stored_services.load_one, service_id)
                         .addCallback(service, service_id))
        return DeferredList(reads, consumeErrors=True).addCallback(
            lambda _: None if _SKIPPED in found else bool(found))

    def _caught_up(self, found: Any, pair: tuple[int | None, str | None]) -> None:
        self._catching_up.pop(pair, None)
        self._wanted.pop(pair, None)
        if found is False:
            self._miss(pair)

    def _miss(self, pair: tuple[int | None, str | None]) -> None:
        if len(self._missed) >= 10_000:
            self._missed.clear()
        self._missed[pair] = self.clock.seconds() + CATCH_UP_SECONDS

    def _apply_one(self, change: Change, certs: dict[str, Any], services: dict[str, Any]) -> Any:
        kind, key = change.kind, change.key
        if kind in ("certificate", "revoked"):
            return self.ca.adopt_certificate(key, certs.get(key)) if key in certs else None
        if kind == "ca":
            return self.ca.adopt_generation(int(key))
        if kind == "service":
            return self.directory.refresh(key, services.get(key)) if key in services else None
        if kind == "connected":
            if key not in services:
                return None
            d = self.directory.refresh(key, services.get(key))
            d.addCallback(lambda _: self.channel.connected_elsewhere(key, change.seq, change.controller_id))
            return d
        if kind == "settings":
            return self.runtime.reload(key)
        if kind == "admin_tokens":
            return self.admin_tokens.reload()
        log.warn("ignoring change {seq} of unknown kind {kind} (a newer controller on the same database?)",
                 seq=change.seq, kind=kind)
        return None


class TrustedGeneration:
    """Several controllers: which CA generation this one's TLS context trusts, told to the others through
    the `controllers` table; and a wait until every live controller trusts a new one.

    After a rotation the services are asked to renew, and each then reconnects through the load balancer
    with a certificate of the new CA, to *any* controller: one that has not applied the rotation yet would
    refuse it in the handshake. So the renewal requests wait (at most BARRIER_SECONDS) until every live
    controller trusts the new generation; the new bundle goes out at once.
    """

    BARRIER_SECONDS = 10.0
    POLL_SECONDS = 0.1

    def __init__(self, store: Any, controller_id: str, generation: int, clock: Any) -> None:
        self.store = store
        self.controller_id = controller_id
        self.generation = generation
        self.clock = clock
        self._stopped = False
        self._sleeps: set[Any] = set()

    def stop(self) -> None:
        """The controller stops: waits end now."""
        self._stopped = True
        for sleep in list(self._sleeps):
            sleep.cancel()

    def on_ca_rotated(self, event: Any) -> Any:
        """CaRotated, after the TLS context was swapped: record that this controller trusts it."""
        self.generation = max(self.generation, event.generation)
        return self.store.run(controllers.trusts, self.controller_id, event.generation).addErrback(
            lambda f: log.warn("could not record that this controller trusts CA generation {generation}",
                               generation=event.generation))

    @inlineCallbacks
    def everywhere(self, generation: int) -> Any:
        """Fires when every live controller trusts `generation`, or after BARRIER_SECONDS."""
        from twisted.internet.defer import CancelledError
        from twisted.internet.task import deferLater
        deadline = self.clock.seconds() + self.BARRIER_SECONDS
        behind: list[str] = []
        while self.clock.seconds() < deadline and not self._stopped:
            try:
                behind = yield self.store.run(controllers.behind, generation, int(self.clock.seconds()))
            except StorageUnavailable:
                behind = ["(the database cannot be reached)"]
            if not behind or self._stopped:
                return None
            sleep = deferLater(self.clock, self.POLL_SECONDS, lambda: None)
            self._sleeps.add(sleep)
            try:
                yield sleep
            except CancelledError:
                return None
            finally:
                self._sleeps.discard(sleep)
        log.warn("controller(s) {behind} do not trust CA generation {generation} after {seconds} s; asking for "
                 "renewals anyway", behind=", ".join(behind), generation=generation, seconds=self.BARRIER_SECONDS)
        return None
