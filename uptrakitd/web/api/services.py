"""Services (SPEC §6): list, read, change, approve, reject, deactivate."""
from __future__ import annotations

from typing import Any, Protocol

from uptrakitd.registry.directory import ServiceDirectory, ServiceRecord
from ...errors import BadRequest
from ...pki.authority import CertificateAuthority
from ...pki.serials import format_serial
from ...printable import has_control
from ..router import Route, int_field, iso, json_body, route
from .audit import said_by

UUID = r"[0-9a-fA-F-]{36}"
ID_OR_PREFIX = r"[0-9a-fA-F-]{4,36}"   # a service id, or a unique start of one (the UI shows 8 characters)
KINDS = ("agent", "mqtt")
STATUSES = ("pending", "approved", "rejected", "deactivated")


class Connections(Protocol):
    """The channel hub as the routes see it: who holds an authenticated socket, and the last rotation's
    progress (the overview)."""

    connected: dict[str, Any]
    last_rotation: dict[str, Any] | None   # generation, at, notified (ChannelHub.on_ca_rotated)

    def is_connected(self, service_id: str) -> bool: ...


class ServiceRoutes:
    """Translate HTTP to the services directory."""

    def __init__(self, directory: ServiceDirectory, connections: Connections, ca: CertificateAuthority) -> None:
        self.directory = directory
        self.connections = connections
        self.ca = ca

    def routes(self) -> list[Route]:
        one = rf"/api/v1/services/(?P<service_id>{ID_OR_PREFIX})"
        return [
            route("GET", r"/api/v1/services", self.list_services, admin=True),
            route("GET", one, self.get_service, admin=True),
            route("PUT", one, self.put_service, admin=True),
            route("DELETE", one, self.deactivate, admin=True),
            route("POST", one + "/approve", self.approve, admin=True),
            route("POST", one + "/reject", self.reject, admin=True),
        ]

    def describe(self, s: ServiceRecord) -> dict[str, Any]:
        """The API's JSON for one service."""
        cert = self.ca.state.current_for(s.id, self.ca.clock.seconds())
        connected, controller = self.directory.holder(s, self.connections.is_connected(s.id))
        return {"id": s.id, "kind": s.kind, "hostname": s.hostname, "friendly_name": s.friendly_name,
                "status": s.status, "capabilities": list(s.capabilities), "ip_address": s.ip_address,
                "proxy_ip": s.proxy_ip, "identity_source": s.identity_source,
                "connected": connected, "controller": controller, "last_seen_at": iso(s.last_seen_at),
                "created_at": iso(s.created_at), "cert_lifetime_hours": s.cert_lifetime_hours,
                "ping_interval_seconds": s.ping_interval_seconds,
                "certificate": None if cert is None else {"serial": format_serial(cert.serial),
                                                          "not_after": iso(cert.not_after),
                                                          "ca_generation": cert.ca_generation}}

    def list_services(self, request: Any) -> dict:
        def arg(name: str) -> str | None:
            value = request.args.get(name.encode(), [None])[0]
            return value.decode("utf-8", "replace") if value is not None else None
        kind, status, connected = arg("kind"), arg("status"), arg("connected")
        if kind is not None and kind not in KINDS:
            raise BadRequest("kind: must be agent or mqtt", "invalid_filter")
        if status is not None and status not in STATUSES:
            raise BadRequest("status: must be pending, approved, rejected or deactivated", "invalid_filter")
        if connected is not None and connected not in ("true", "false"):
            raise BadRequest("connected: must be true or false", "invalid_filter")
        out = []
        for s in sorted(self.directory, key=lambda s: (s.created_at, s.id)):
            if kind and s.kind != kind or status and s.status != status:
                continue
            if connected is not None and self.directory.holder(s, self.connections.is_connected(s.id))[0] != \
                    (connected == "true"):
                continue
            out.append(self.describe(s))
        return {"services": out}

    def get_service(self, request: Any, service_id: str) -> dict:
        return self.describe(self.directory.resolve(service_id))

    def put_service(self, request: Any, service_id: str) -> Any:
        service = self.directory.resolve(service_id)
        body = json_body(request, {"cert_lifetime_hours", "ping_interval_seconds", "friendly_name"})
        changes: dict[str, Any] = {}
        if "cert_lifetime_hours" in body:
            changes["cert_lifetime_hours"] = int_field(body, "cert_lifetime_hours", 1, 730 * 24)
        if "ping_interval_seconds" in body:
            changes["ping_interval_seconds"] = int_field(body, "ping_interval_seconds", 5, 3600)
        if "friendly_name" in body:
            if body["friendly_name"] is not None and (not isinstance(body["friendly_name"], str)
                                                      or len(body["friendly_name"]) > 200
                                                      or has_control(body["friendly_name"])):
                raise BadRequest("friendly_name: must be a string of up to 200 characters without control "
                                 "characters", "invalid_field")
            changes["friendly_name"] = body["friendly_name"]
        return self.directory.update(service.id, changes, said_by(request)).addCallback(self.describe)

    def deactivate(self, request: Any, service_id: str) -> Any:
        return self.directory.deactivate(self.directory.resolve(service_id).id, said_by(request)).addCallback(
            self.describe)

    def approve(self, request: Any, service_id: str) -> Any:
        return self.directory.approve(self.directory.resolve(service_id).id, said_by(request)).addCallback(
            self.describe)

    def reject(self, request: Any, service_id: str) -> Any:
        return self.directory.reject(self.directory.resolve(service_id).id, said_by(request)).addCallback(
            self.describe)
