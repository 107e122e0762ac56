"""The controllers on one database (PostgreSQL): each refreshes its row; the leader clears the dead."""
from __future__ import annotations

from typing import Any

from . import services

DEAD_AFTER_SECONDS = 15   # a controller not seen for this long is gone: its sockets are released


def heartbeat(conn: Any, controller: str, hostname: str, started_at: int, now: int, leader: bool) -> None:
    """Insert or refresh this controller's row."""
    conn.execute("INSERT INTO controllers (id, hostname, started_at, seen_at, leader) VALUES (?, ?, ?, ?, ?) "
                 "ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at, leader = excluded.leader",
                 (controller, hostname, started_at, now, int(leader)))


def clear_dead(conn: Any, now: int) -> list[str]:
    """Leader: forget controllers not seen for DEAD_AFTER_SECONDS and release their services; their ids."""
    dead = [row["id"] for row in conn.execute("SELECT id FROM controllers WHERE seen_at < ?",
                                              (now - DEAD_AFTER_SECONDS,))]
    for controller in dead:
        services.release_controller(conn, controller)
        conn.execute("DELETE FROM controllers WHERE id = ?", (controller,))
    return dead


def leave(conn: Any, controller: str) -> None:
    """A controller stops: its row goes, and so does its hold on any service."""
    services.release_controller(conn, controller)
    conn.execute("DELETE FROM controllers WHERE id = ?", (controller,))


def load_all(conn: Any) -> list[Any]:
    """Every controller row, oldest first, with how many services it holds."""
    return conn.execute("SELECT c.id, c.hostname, c.started_at, c.seen_at, c.leader, "
                        "(SELECT count(*) FROM services s WHERE s.controller = c.id) AS services "
                        "FROM controllers c ORDER BY c.started_at, c.id").fetchall()
