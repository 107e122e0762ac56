"""SIGHUP: re-read the config file; apply changed runtime settings, or reject the whole file."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.logger import Logger

from .config import ConfigError, Settings, build_settings
from .runtime_settings import RuntimeSettings

log = Logger()
RESTART_KEYS = ("https_listen", "data_dir", "pki_http", "pki_listen", "ca_cert", "ca_key", "san", "trust_domain",
                "log_format", "log_level", "access_log", "metrics_require_auth", "limits", "proxy_protocol_senders",
                "proxy_protocol_trust_headers")


class ConfigReloader:
    """Validates the whole file first (nothing changes when it is invalid), then applies."""

    def __init__(self, flags: dict[str, Any], settings: Settings, runtime: RuntimeSettings) -> None:
        self.flags = dict(flags)
        self.settings = settings
        self.runtime = runtime

    def reload(self) -> Any:
        """Re-read and apply; returns a Deferred when settings are being stored, else None."""
        if self.settings.config_path is None:
            log.info("SIGHUP: no --config file to re-read")
            return None
        try:
            fresh = build_settings(self.flags, str(self.settings.config_path))
        except ConfigError as e:
            log.error("SIGHUP: config file rejected, nothing changed: {error}", error=str(e))
            return None
        changed = {k: getattr(fresh.network, k) for k in fresh.network_given
                   if getattr(fresh.network, k) != getattr(self.settings.network, k)}
        for key in RESTART_KEYS:
            if getattr(fresh, key) != getattr(self.settings, key):
                log.warn("SIGHUP: {key} changed in the config file; it takes effect after a restart", key=key)
        self.settings = fresh
        if not changed:
            log.info("SIGHUP: config re-read, no runtime setting changed")
            return None
        d = self.runtime.replace_network(replace(self.runtime.network, **changed))
        d.addCallbacks(lambda _: log.info("SIGHUP: applied {keys}", keys=", ".join(sorted(changed))),
                       lambda f: log.failure("SIGHUP: could not apply settings", f))
        return d
