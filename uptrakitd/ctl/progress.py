"""`uptrakitctl ca rotate --wait`: the rotation's progress, live, until every connected service has renewed.

Read from `GET /api/v1/rotation` (services by the generation of their current certificate: the records, so
it is right on any controller and after a restart) and `GET /api/v1/controllers` (a controller that has not
yet loaded the new generation lags). On a terminal one line is redrawn: a bar, renewed / total, the lagging
controllers and an estimate of the time left; otherwise a line is printed each time the figures change
(a JSON object per line with --output json).
"""
from __future__ import annotations

import datetime
import json
import sys
import time
from typing import Any, Callable

import click

from .client import REFUSED, Api, CtlError

POLL_SECONDS = 1.0
LIVE_SECONDS = 30.0
BAR = 24


def snapshot(api: Api, generation: int, tracked: dict[str, str]) -> dict[str, Any]:
    """Where the rotation to `generation` stands for the services `tracked` (id -> name): every service seen
    connected since the rotation began is added to it and stays, so one that is reconnecting when asked (as each
    does right after renewing) is still counted."""
    rotation = api.get("/api/v1/rotation")
    if rotation["generation"] != generation:
        raise CtlError(f"generation {rotation['generation']} is active now, not {generation}: another rotation "
                       "started; follow it with uptrakitctl status", REFUSED)
    for s in rotation["renewed"] + rotation["on_old_generation"]:
        if s["connected"]:
            tracked.setdefault(s["id"], s["name"])
    renewed = {s["id"] for s in rotation["renewed"]}
    waiting = [name for sid, name in tracked.items() if sid not in renewed]
    offline = [s for s in rotation["on_old_generation"] if not s["connected"] and s["id"] not in tracked]
    lagging = lagging_controllers(api.get("/api/v1/controllers")["controllers"], generation)
    return {"generation": generation, "renewed": len(tracked) - len(waiting), "total": len(tracked),
            "waiting": waiting, "offline_on_old_generation": len(offline), "lagging_controllers": lagging,
            "rotating": rotation["rotating"], "complete": not waiting and not rotation["rotating"] and not lagging}


def lagging_controllers(controllers: list[dict[str, Any]], generation: int) -> list[str]:
    """Live controllers whose TLS does not trust `generation` yet. Live: seen within LIVE_SECONDS of the most
    recently seen one (the database's clock, not this host's; a dead controller's row lingers until the leader
    clears it)."""
    def seen(c: dict[str, Any]) -> float:
        return datetime.datetime.fromisoformat(c["seen_at"].replace("Z", "+00:00")).timestamp() \
            if c.get("seen_at") else 0.0
    newest = max((seen(c) for c in controllers), default=0.0)
    return [str(c.get("id") or c.get("hostname")) for c in controllers
            if c.get("ca_generation") is not None and c["ca_generation"] < generation
            and newest - seen(c) <= LIVE_SECONDS]


def line(s: dict[str, Any], eta: float | None) -> str:
    total, renewed = s["total"], s["renewed"]
    filled = BAR if total == 0 else round(BAR * renewed / total)
    lag = ", ".join(map(str, s["lagging_controllers"])) or "none"
    left = "" if s["complete"] else (f"  ETA {eta:.0f} s" if eta is not None else "  ETA -")
    return f"[{'#' * filled}{'-' * (BAR - filled)}] {renewed}/{total} renewed  lagging controllers: {lag}{left}"


def wait_for_rotation(api: Api, generation: int, timeout: float, json_lines: bool = False,
                      clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Show progress until the rotation is complete (returns) or `timeout` seconds pass (CtlError)."""
    live = sys.stdout.isatty() and not json_lines
    started = clock()
    first: tuple[float, int] | None = None
    shown = None
    tracked: dict[str, str] = {}
    while True:
        s = snapshot(api, generation, tracked)
        now = clock()
        if first is None:
            first = (now, s["renewed"])
        rate = (s["renewed"] - first[1]) / (now - first[0]) if now > first[0] else 0.0
        eta = (s["total"] - s["renewed"]) / rate if rate > 0 else None
        figures = (s["renewed"], s["total"], tuple(s["lagging_controllers"]), s["complete"])
        if json_lines:
            if figures != shown:
                click.echo(json.dumps(dict(s, eta_seconds=None if eta is None else round(eta, 1)), sort_keys=True))
        elif live:
            click.echo("\r" + line(s, eta).ljust(100), nl=False)
        elif figures != shown:
            click.echo(line(s, eta))
        shown = figures
        if s["complete"]:
            if live:
                click.echo("")
            if not json_lines:
                click.echo(f"rotation to generation {generation} complete: {s['renewed']} connected service(s) "
                           "renewed" + (f"; {s['offline_on_old_generation']} offline service(s) renew when they "
                                        "reconnect" if s["offline_on_old_generation"] else ""))
            return
        if now - started > timeout:
            if live:
                click.echo("")
            names = ", ".join(s["waiting"][:10]) + (" …" if len(s["waiting"]) > 10 else "")
            raise CtlError(f"not complete after {timeout:g} s: {s['total'] - s['renewed']} service(s) connected "
                           f"during the rotation still on the old generation ({names or 'none'}); lagging controllers: "
                           f"{', '.join(map(str, s['lagging_controllers'])) or 'none'}", REFUSED)
        sleep(POLL_SECONDS)
