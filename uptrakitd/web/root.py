"""The two sites: HTTPS (every route, the channel endpoints, identity resolution) and plain-HTTP PKI."""
from __future__ import annotations

from typing import Any, Callable, Mapping


from ..listen.closing import DEFAULT_CLOSE_GRACE
from ..trust.identity import RequestContext
from .router import Route, Router
from .site import IdentifyingSite


def build_sites(https_routes: list[Route], pki_routes: list[Route], endpoints: Mapping[str, Any],
                resolver: Callable[..., RequestContext],
                check_admin: Callable[[str, str], bool | None], head_timeout: float,
                counters: dict[str, Any], access_log: str = "off",
                fast_ocsp: Any = None, close_grace: float = DEFAULT_CLOSE_GRACE,
                catch_up: Callable[[Any], Any] | None = None,
                describe_admin: Callable[[str], Any] | None = None,
                on_unknown_token: Callable[[Any, str], None] | None = None) -> tuple[IdentifyingSite, IdentifyingSite]:
    """(https_site, pki_site). The PKI site serves only `pki_routes`, without identity resolution."""
    router = Router(https_routes, check_admin, describe_admin, on_unknown_token)
    router.resources.update(endpoints)
    return (IdentifyingSite(router, resolver=resolver, head_timeout=head_timeout, counters=counters,
                            access_log=access_log, fast_ocsp=fast_ocsp, close_grace=close_grace, catch_up=catch_up),
            IdentifyingSite(Router(pki_routes), head_timeout=head_timeout, counters=counters, access_log=access_log,
                            fast_ocsp=fast_ocsp, close_grace=close_grace))
