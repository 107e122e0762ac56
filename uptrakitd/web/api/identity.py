"""`/api/v1/whoami` (SPEC §3.5) and the runtime network settings (SPEC §7)."""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks

from ...config import ConfigError, NetworkSettings
from ...errors import BadRequest
from ...pki.ca import same_pki_addr
from ...pki.serials import format_serial
from ...pki.state import CaState
from uptrakitd.registry.runtime_settings import RuntimeSettings
from ..router import Route, json_body, route
from .audit import said_by


def whoami(request: Any) -> dict:
    """Who uptrakitd thinks the request is, and why (never header values)."""
    ctx = request.context
    identity = None
    if ctx.identity is not None:
        identity = {"service_id": ctx.identity.service_id, "serial": format_serial(ctx.identity.serial),
                    "ca_generation": ctx.identity.ca_generation}
    return {"peer_ip": ctx.peer_ip, "client_ip": ctx.client_ip, "proxy_ip": ctx.proxy_ip,
            "via_trusted_proxy": ctx.via_trusted_proxy, "identity": identity,
            "identity_source": ctx.identity_source, "rejected": ctx.rejected, "rejected_code": ctx.rejected_code}


class NetworkSettingsRoutes:
    """GET/PUT settings/network."""

    def __init__(self, runtime: RuntimeSettings, state: CaState) -> None:
        self.runtime = runtime
        self.state = state

    def routes(self) -> list[Route]:
        return [
            route("GET", r"/api/v1/whoami", whoami, identity=True),
            route("GET", r"/api/v1/settings/network", self.get_network, admin=True),
            route("PUT", r"/api/v1/settings/network", self.put_network, admin=True),
        ]

    def get_network(self, request: Any) -> dict:
        return self.runtime.network.to_json()

    @inlineCallbacks
    def put_network(self, request: Any) -> Any:
        body = json_body(request, NetworkSettings.FIELDS)
        try:
            new = yield self.runtime.update_network(body, said_by(request))
        except ConfigError as e:
            raise BadRequest(str(e), "invalid_setting", field=e.field) from None
        result = new.to_json()
        active = self.state.active()
        if "pki_addr" in body and not active.external and \
                not same_pki_addr(active.cert, new.pki_addr):
            result["pki_addr_warning"] = ("pki_addr changed: certificates keep the old URLs until you rotate the CA "
                                          "(POST /api/v1/settings/rotate-ca)")
        return result
