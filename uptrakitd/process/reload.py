"""SIGHUP: re-read the config file; apply changed runtime settings, or reject the whole file."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.logger import Logger

from uptrakitd.audit import Said
from uptrakitd.config import SETTINGS, ConfigError, Settings, build_settings, read_config_file
from uptrakitd.registry.runtime_settings import RuntimeSettings

log = Logger()
# every setting but the runtime ones (network.*) takes effect at the next start
RESTART_KEYS = tuple(dict.fromkeys(s.restart_key for s in SETTINGS if s.in_file and not s.live))


class ConfigReloader:
    """Validates the whole file first (nothing changes when it is invalid), then applies.

    The precedence rule is the one start-up uses (README, "Which value wins"): stored runtime
    (network) settings win over the file unless the daemon runs with --force-settings-override, and
    keys read only at start say that they need a restart.
    """

    def __init__(self, flags: dict[str, Any], settings: Settings, runtime: RuntimeSettings) -> None:
        self.flags = dict(flags)
        self.settings = settings
        self.runtime = runtime
        self._file = self._read_file()

    def _read_file(self) -> dict[str, Any]:
        if self.settings.config_path is None:
            return {}
        try:
            return read_config_file(self.settings.config_path)
        except ConfigError:
            return {}

    def reload(self) -> Any:
        """Re-read and apply; returns a Deferred when settings are being stored, else None."""
        if self.settings.config_path is None:
            log.info("SIGHUP: no --config file to re-read")
            return None
        try:
            file_now = read_config_file(self.settings.config_path)
            fresh = build_settings(self.flags, str(self.settings.config_path))
        except ConfigError as e:
            log.error("SIGHUP: config file rejected, nothing changed: {error}", error=str(e))
            return None
        for key in sorted(set(file_now) | set(self._file)):
            if file_now.get(key) != self._file.get(key) and _flag_name(key) in self.flags:
                log.warn("SIGHUP: {key} changed in the config file, but --{flag} on the command line overrides it",
                         key=key, flag=_flag_name(key).replace("_", "-"))
        self._file = file_now
        for key in RESTART_KEYS:
            if getattr(fresh, key) != getattr(self.settings, key):
                log.warn("SIGHUP: {key} changed in the config file; it takes effect after a restart", key=key)
        changed = {k: getattr(fresh.network, k) for k in fresh.network_given
                   if getattr(fresh.network, k) != getattr(self.settings.network, k)}
        self.settings = fresh
        if not changed:
            log.info("SIGHUP: config re-read, no runtime setting changed")
            return None
        if not fresh.force_settings_override:
            for key in sorted(changed):
                log.warn("SIGHUP: network.{key} changed in the config file, but the stored runtime setting stays "
                         "({stored!r}): change it with PUT /api/v1/settings/network, or run with "
                         "--force-settings-override to make the file authoritative", key=key,
                         stored=self.runtime.network.to_json()[key])
            return None
        d = self.runtime.replace_network(replace(self.runtime.network, **changed),
                                         Said({"kind": "system", "via": "SIGHUP (the config file)"}))
        d.addCallbacks(lambda _: log.info("SIGHUP: applied {keys}", keys=", ".join(sorted(changed))),
                       lambda f: log.failure("SIGHUP: could not apply settings", f))
        return d


def _flag_name(config_key: str) -> str:
    """The flags-dict name of a flattened config key (network.x -> x)."""
    return config_key.split(".", 1)[-1]
