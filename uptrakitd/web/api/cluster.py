"""`GET /api/v1/controllers`: the controllers sharing this one's database, and which of them leads."""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorTime

from ...errors import StorageUnavailable
from uptrakitd.observability.readiness import DATABASE_TIMEOUT
from ...store import Store, controllers
from ..router import Route, iso, route


class ControllerRoutes:
    """With SQLite there is one controller, this one; with PostgreSQL, every controller's heartbeat row."""

    def __init__(self, store: Store, me: str | None, hostname: str, started_at: float,
                 is_leader: Callable[[], bool], connected: Callable[[], int], clock: IReactorTime,
                 freshness: Callable[[], dict[str, Any]] | None = None) -> None:
        self.store = store
        self.freshness = freshness   # ClusterFreshness.describe: whether this one's view of the others is current
        self.me = me
        self.hostname = hostname
        self.started_at = started_at
        self.is_leader = is_leader
        self.connected = connected
        self.clock = clock

    def routes(self) -> list[Route]:
        return [route("GET", r"/api/v1/controllers", self.list_controllers, admin=True)]

    @inlineCallbacks
    def list_controllers(self, request: Any) -> Any:
        if self.me is None:
            return {"controllers": [{"id": None, "hostname": self.hostname, "started_at": iso(self.started_at),
                                     "seen_at": iso(self.clock.seconds()), "leader": True,
                                     "services": self.connected(), "this": True, "ca_generation": None}]}
        cluster = self.freshness() if self.freshness is not None else None
        try:
            # a silent partition answers nothing for tens of seconds: this route is how an operator learns it
            rows = yield self.store.run(controllers.load_all).addTimeout(DATABASE_TIMEOUT, self.clock)
        except (StorageUnavailable, TimeoutError, defer.TimeoutError):
            # what this controller knows of itself, and why it cannot say more
            return {"controllers": [{"id": self.me, "hostname": self.hostname, "started_at": iso(self.started_at),
                                     "seen_at": None, "leader": self.is_leader(), "services": self.connected(),
                                     "this": True, "ca_generation": None}],
                    "database": "unreachable", "cluster": cluster}
        return {"controllers": [{"id": r["id"], "hostname": r["hostname"], "started_at": iso(r["started_at"]),
                                 "seen_at": iso(r["seen_at"]), "leader": bool(r["leader"]),
                                 "services": int(r["services"]), "this": r["id"] == self.me,
                                 "ca_generation": int(r["ca_generation"])} for r in rows],
                "database": "ok", "cluster": cluster}
