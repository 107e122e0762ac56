"""The controllers on one database (PostgreSQL): each refreshes its row; the leader clears the dead."""
from __future__ import annotations

from typing import Any

from . import services

DEAD_AFTER_SECONDS = 15   # a controller not seen for this long is gone: its sockets are released


def heartbeat(conn: Any, controller_id: str, hostname: str, started_at: int, now: int, leader: bool,
              ca_generation: int) -> None:
    """Insert or refresh this controller's row."""
    conn.execute("INSERT INTO controllers (id, hostname, started_at, seen_at, leader, ca_generation) "
                 "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at, "
                 "leader = excluded.leader, ca_generation = excluded.ca_generation",
                 (controller_id, hostname, started_at, now, int(leader), ca_generation))


def trusts(conn: Any, controller_id: str, ca_generation: int) -> None:
    """This controller's TLS context trusts CA generation `ca_generation` from now on."""
    conn.execute("UPDATE controllers SET ca_generation = ? WHERE id = ? AND ca_generation < ?",
                 (ca_generation, controller_id, ca_generation))


def behind(conn: Any, ca_generation: int, now: int) -> list[str]:
    """Live controllers whose TLS context does not trust CA generation `ca_generation` yet."""
    return [row["id"] for row in conn.execute(
        "SELECT id FROM controllers WHERE seen_at >= ? AND ca_generation < ?",
        (now - DEAD_AFTER_SECONDS, ca_generation))]


def clear_dead(conn: Any, now: int) -> list[str]:
    """Leader: forget controllers not seen for DEAD_AFTER_SECONDS and release their services; their ids."""
    dead = [row["id"] for row in conn.execute("SELECT id FROM controllers WHERE seen_at < ?",
                                              (now - DEAD_AFTER_SECONDS,))]
    for controller_id in dead:
        services.release_controller(conn, controller_id)
        conn.execute("DELETE FROM controllers WHERE id = ?", (controller_id,))
    return dead


def leave(conn: Any, controller_id: str) -> None:
    """A controller stops: its row goes, and so does its hold on any service."""
    services.release_controller(conn, controller_id)
    conn.execute("DELETE FROM controllers WHERE id = ?", (controller_id,))


def load_all(conn: Any) -> list[Any]:
    """Every controller row, oldest first, with how many services it holds."""
    return conn.execute("SELECT c.id, c.hostname, c.started_at, c.seen_at, c.leader, c.ca_generation, "
                        "(SELECT count(*) FROM services s WHERE s.controller = c.id) AS services "
                        "FROM controllers c ORDER BY c.started_at, c.id").fetchall()
