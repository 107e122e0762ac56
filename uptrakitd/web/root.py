"""Builds the HTTPS site (everything) and the plain-HTTP PKI site (PKI routes and /healthz only)."""
from __future__ import annotations

from typing import Any

from .api.identity import IdentityRoutes
from .api.pki_admin import PkiAdminRoutes
from .api.services import ServiceRoutes
from .ui_routes import UiRoutes
from .api.status import StatusRoutes
from .pki import PkiRoutes
from .router import Router, route
from .site import IdentifyingSite


def build_sites(controller: Any) -> tuple[IdentifyingSite, IdentifyingSite]:
    """(https_site, pki_site) for a Controller."""
    status = StatusRoutes(controller)
    pki = PkiRoutes(controller)
    https_routes = (status.routes() + IdentityRoutes(controller).routes() + PkiAdminRoutes(controller).routes()
                    + ServiceRoutes(controller).routes() + UiRoutes().routes() + pki.routes())
    for extra in getattr(controller, "extra_routes", lambda: [])():
        https_routes.append(extra)
    router = Router(https_routes, controller.check_admin)
    hub = getattr(controller, "hub", None)
    if hub is not None:
        router.resources.update(hub.resources)
    https = IdentifyingSite(router, resolver=getattr(controller, "resolve_request", None))
    pki_routes = [route("GET", r"/healthz", status.healthz)] + pki.routes()
    plain = IdentifyingSite(Router(pki_routes))
    return https, plain
