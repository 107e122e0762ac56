"""Settings an admin changes at runtime: network (SPEC §7) and service certificates (SPEC §4.2)."""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from uptrakitd.config import NetworkSettings
from uptrakitd.events import EventBus, NetworkSettingsChanged
from uptrakitd.pki.issue import renewal_window
from uptrakitd.audit import BY_SYSTEM, AuditTrail, Said, audited
from uptrakitd.store import Store, settings as stored

log = Logger()


@dataclass(frozen=True)
class ServiceCertSettings:
    """Lifetime and renewal window of service certificates (SPEC §4.2)."""

    lifetime_hours: int = 168
    renewal_window_hours: int | None = None

    @classmethod
    def from_json(cls, value: Any) -> ServiceCertSettings:
        """From the stored JSON (missing keys take the defaults)."""
        value = value or {}
        return cls(int(value.get("lifetime_hours", 168)), value.get("renewal_window_hours"))

    def to_json(self) -> dict[str, Any]:
        """The stored JSON shape."""
        return {"lifetime_hours": self.lifetime_hours, "renewal_window_hours": self.renewal_window_hours}


class RuntimeSettings:
    """The current runtime settings; changes are validated, stored, applied, then announced."""

    def __init__(self, store: Store, bus: EventBus, network: NetworkSettings,
                 service_certs: ServiceCertSettings, audit: AuditTrail | None = None) -> None:
        self.store = store
        self.audit = audit
        self.bus = bus
        self.network = network
        self.service_certs = service_certs

    def pki_addr(self) -> str | None:
        """The base URL embedded in certificates issued from now on."""
        return self.network.pki_addr

    def update_network(self, changes: dict[str, Any], said: Said = BY_SYSTEM) -> Any:
        """Validate (ConfigError naming the field), store, then apply network settings; fires with them."""
        return self.replace_network(self.network.updated(changes), said)

    @inlineCallbacks
    def replace_network(self, new: NetworkSettings, said: Said = BY_SYSTEM) -> Any:
        """Store validated network settings, then use them from the next request on."""
        before, after = self.network.to_json(), new.to_json()
        changes = {k: {"old": before[k], "new": after[k]} for k in after if before.get(k) != after[k]}
        yield audited(self.audit, self.store, stored.put, "network", after, action="settings.network.changed",
                      obj={"kind": "settings", "id": "network"}, details={"changes": changes}, said=said)
        old, self.network = self.network, new
        if new.trusts_everything():
            log.warn("network.trusted_proxies trusts every address: ANY client can claim any identity "
                     "through forwarded headers")
        changed = tuple(k for k in NetworkSettings.FIELDS if getattr(old, k) != getattr(new, k))
        yield self.bus.publish(NetworkSettingsChanged(changed))
        return new

    @inlineCallbacks
    def update_service_certs(self, changes: dict[str, Any], said: Said = BY_SYSTEM) -> Any:
        """Store then apply new service-certificate settings; fires with them."""
        current = self.service_certs
        new = ServiceCertSettings(changes.get("lifetime_hours", current.lifetime_hours),
                                  changes.get("renewal_window_hours", current.renewal_window_hours))
        yield audited(self.audit, self.store, stored.put, "service_certificates", new.to_json(),
                      action="settings.certificates.changed", obj={"kind": "settings", "id": "service_certificates"},
                      details={"old": current.to_json(), "new": new.to_json()}, said=said)
        self.service_certs = new
        return new

    @inlineCallbacks
    def reload(self, key: str) -> Any:
        """Another controller stored setting `key` (`network`, `service_certificates`): use it here too."""
        value = yield self.store.run(stored.get, key)
        if value is None:
            return
        if key == "network":
            new = NetworkSettings().updated(value)
            old, self.network = self.network, new
            changed = tuple(k for k in NetworkSettings.FIELDS if getattr(old, k) != getattr(new, k))
            if changed:
                log.info("network settings changed on another controller: {fields}", fields=", ".join(changed))
                yield self.bus.publish(NetworkSettingsChanged(changed))
        elif key == "service_certificates":
            self.service_certs = ServiceCertSettings.from_json(value)

    def lifetime_for(self, override_hours: int | None) -> datetime.timedelta:
        """A service's certificate lifetime: its own override, else the setting."""
        return datetime.timedelta(hours=override_hours or self.service_certs.lifetime_hours)

    def renewal_window_hours(self) -> int:
        """The renewal window in whole hours (at least 1)."""
        sc = self.service_certs
        window = renewal_window(datetime.timedelta(hours=sc.lifetime_hours), sc.renewal_window_hours)
        return max(1, int(window.total_seconds() // 3600))
