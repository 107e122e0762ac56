"""`GET /api/v1/controllers`: the controllers sharing this one's database, and which of them leads."""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorTime

from ...store import Store, controllers
from ..router import Route, iso, route


class ControllerRoutes:
    """With SQLite there is one controller, this one; with PostgreSQL, every controller's heartbeat row."""

    def __init__(self, store: Store, me: str | None, hostname: str, started_at: float,
                 is_leader: Callable[[], bool], connected: Callable[[], int], clock: IReactorTime) -> None:
        self.store = store
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
        rows = yield self.store.run(controllers.load_all)
        return {"controllers": [{"id": r["id"], "hostname": r["hostname"], "started_at": iso(r["started_at"]),
                                 "seen_at": iso(r["seen_at"]), "leader": bool(r["leader"]),
                                 "services": int(r["services"]), "this": r["id"] == self.me,
                                 "ca_generation": int(r["ca_generation"])} for r in rows]}
