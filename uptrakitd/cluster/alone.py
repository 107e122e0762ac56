"""`Cluster` itself: one controller alone (the embedded SQLite), where nothing is stale, this controller always
leads, nothing is waited for and nothing is caught up. `SharedDatabase` (shared.py) extends it."""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred


class Cluster:
    """This controller alone."""

    shared = False
    freshness: Any = None   # SharedDatabase: how current its view of the others is (cluster.sync.ClusterFreshness)

    def __init__(self, controller_id: str) -> None:
        self.controller_id = controller_id

    @property
    def leader(self) -> bool:
        return True

    def stale(self) -> bool:
        return False

    def on_leader(self, job: Callable[[], Any]) -> Callable[[], Any]:
        """`job`, made to run only while this controller runs the once-per-database jobs."""
        return job

    def barrier(self, generation: int) -> Deferred | None:
        """Fires when every controller trusts CA `generation` (None: nobody else to wait for)."""
        return None

    def catch_up(self, unknown: Any) -> Deferred | None:
        """Read now what a request named and this controller does not know (None: nothing can be elsewhere)."""
        return None

    def describe(self) -> Any:
        """What GET /api/v1/controllers says of this controller's view of the others (None alone)."""
        return None

    def attach(self, ca: Any, directory: Any, runtime: Any, admin_tokens: Any, channel: Any, bus: Any) -> None:
        """The components whose state the others' changes are applied to (built after the cluster)."""

    def add_to(self, tree: Any, store: Any, run_blocking: Callable[..., Deferred]) -> None:
        """What it runs (jobs, threads, connections) into the service tree."""
        self.metrics.cluster_leader.set(1)

    def with_metrics(self, metrics: Any) -> Cluster:
        self.metrics = metrics
        return self
