"""Several controllers on one PostgreSQL: the Cluster that waits for, catches up with and leads the others."""
from __future__ import annotations

from typing import Any, Callable

from prometheus_client import Gauge
from twisted.internet.defer import Deferred, succeed

from ..events import CaRotated
from uptrakitd.process.lifecycle import Hooks, PeriodicJob
from ..store import changes, make_store, read_probe
from .alone import Cluster
from .postgresql import ChangeFeed, Leadership
from .sync import ClusterFreshness, ClusterSync, TrustedGeneration

DAY = 86400


class SharedDatabase(Cluster):
    """This controller among the others on `settings.database`."""

    shared = True

    def __init__(self, settings: Any, booted: Any, store: Any, reactor: Any, metrics: Any) -> None:
        super().__init__(booted.controller_id)
        self.settings, self.store, self.reactor, self.metrics = settings, store, reactor, metrics
        self.change_seq = booted.change_seq
        self.freshness = ClusterFreshness(reactor, settings.cluster_max_staleness)
        # the CA generation each controller trusts: renewals after a rotation wait until all trust it
        self.trusted = TrustedGeneration(store, booted.controller_id, booted.state.active().generation, reactor)
        self.leadership = Leadership(settings.database, booted.controller_id, booted.hostname,
                                     int(reactor.seconds()), lambda: self.trusted.generation)
        # the catch-up reads through a store of its own: the main one may be seconds behind in a storm
        self.reads = make_store(settings.data_dir, settings.database, reactor, booted.controller_id)
        self.sync: ClusterSync | None = None
        self.feed: ChangeFeed | None = None
        self.ca: Any = None
        Gauge("uptrakit_cluster_staleness_seconds", "Seconds since this controller last confirmed it applied "
              "every change the other controllers made", registry=metrics.registry).set_function(
            self.freshness.staleness)

    @property
    def leader(self) -> bool:
        return self.leadership.leader

    def stale(self) -> bool:
        return self.freshness.stale()

    def on_leader(self, job: Callable[[], Any]) -> Callable[[], Any]:
        return lambda: job() if self.leadership.leader else None

    def barrier(self, generation: int) -> Deferred | None:
        return self.trusted.everywhere(generation)

    def catch_up(self, unknown: Any) -> Deferred | None:
        return self.sync.catch_up(unknown) if self.sync is not None else succeed(None)

    def describe(self) -> Any:
        return self.freshness.describe()

    def attach(self, ca: Any, directory: Any, runtime: Any, admin_tokens: Any, channel: Any, bus: Any) -> None:
        self.ca = ca
        bus.subscribe(CaRotated, self.trusted.on_ca_rotated)
        self.sync = ClusterSync(ca, directory, runtime, admin_tokens, channel, self.metrics, self.reactor, self.reads)
        self.feed = ChangeFeed(self.settings.database, self.reactor, self.change_seq, self.controller_id,
                               self.sync.apply, self.freshness.confirm)

    def add_to(self, tree: Any, store: Any, run_blocking: Callable[..., Deferred]) -> None:
        assert self.feed is not None, "attach() first"
        leadership, reactor = self.leadership, self.reactor
        self.metrics.cluster_leader.set_function(lambda: 1 if leadership.leader else 0)

        def check() -> Deferred:
            was = leadership.leader

            def checked(leader: bool) -> Any:
                return self.ca.check_expiry() if leader and not was else None   # a new leader checks at once
            return run_blocking(leadership.check).addCallback(checked)
        PeriodicJob("leadership check", 2, check, reactor, run_at_start=True).setServiceParent(tree)
        Hooks("leadership", stop=lambda: run_blocking(leadership.release)).setServiceParent(tree)
        Hooks("rotation barrier", stop=self.trusted.stop).setServiceParent(tree)
        Hooks("catch-up store", start=self.reads.start, stop=self.reads.close).setServiceParent(tree)
        PeriodicJob("cluster freshness", 1, self.freshness.watch, reactor).setServiceParent(tree)
        Hooks("change feed", start=self.feed.start, stop=self.feed.stop).setServiceParent(tree)
        PeriodicJob("daily change-log pruning", DAY,
                    self.on_leader(lambda: store.run(changes.prune, int(reactor.seconds()))), reactor
                    ).setServiceParent(tree)
        # a write-free check of the database session (and so of the lock) every 2 s
        PeriodicJob("database session check", 2, lambda: store.run(read_probe).addErrback(lambda f: None),
                    reactor).setServiceParent(tree)
