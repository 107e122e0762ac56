"""`twistd uptrakit`: command-line options and makeService (wiring only)."""
from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from uptrakitd.config import SETTINGS, ConfigError, Setting, build_settings


class Options(usage.Options):
    """uptrakitd options; every flag also has a key in the TOML config file (SPEC §1)."""

    synopsis = "[options]"
    longdesc = ("Run the Uptrakit controller security edge: private CA, OCSP/CRL, identity resolution "
                "(mTLS or trusted-proxy headers) and the service WebSocket channel. With no options it "
                "keeps its state in ./uptrakit-data and serves HTTPS on port 8443.")

    optParameters = [
        ["config", "c", None, "TOML config file with the same keys as these flags (flag > file > stored > default)."],
    ] + [[setting.flag, None, None, setting.help] for setting in SETTINGS if setting.kind not in (bool, list)]
    optFlags = [[setting.flag, None, setting.help] for setting in SETTINGS if setting.kind is bool]

    def __init__(self) -> None:
        super().__init__()
        for setting in SETTINGS:
            if setting.kind is list:
                self[setting.name] = []

    def opt_version(self) -> None:
        """Print uptrakitd's and Twisted's versions and exit."""
        from twisted import copyright

        from uptrakitd import __version__
        print(f"uptrakitd {__version__} (Twisted {copyright.version}, Python {sys.version.split()[0]})")
        sys.exit(0)


def _repeatable(setting: Setting) -> Any:
    """The opt_ method of a repeatable flag: each use adds one value (usage.Options shows its docstring)."""
    def opt(self: Options, value: str) -> None:
        self[setting.name].append(value)
    opt.__doc__ = setting.help
    return opt


for _setting in SETTINGS:
    if _setting.kind is list:
        setattr(Options, "opt_" + _setting.flag.replace("-", "_"), _repeatable(_setting))


def flags_from_options(options: Any) -> dict[str, Any]:
    """Flag values given on the command line, keyed by setting name."""
    flags: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.kind is list:
            flags[setting.name] = list(options.get(setting.name, []))
        elif setting.kind is bool:
            if options.get(setting.flag):
                flags[setting.name] = True
        elif options.get(setting.flag) is not None:
            flags[setting.name] = options[setting.flag]
    return flags


def makeService(options: Any) -> Any:
    """Validate settings, prepare state, return the service tree. Errors: one line, exit status 2."""
    from twisted.internet import reactor

    from uptrakitd.process.boot import StartupError, boot
    from uptrakitd.process.daemon import build_daemon

    from uptrakitd.listen.fdlimit import fit_open_file_limit
    from uptrakitd.listen.preflight import listen_problem

    from uptrakitd.process.nodump import no_core_dumps
    no_core_dumps()   # before any key or PIN is read into memory
    flags = flags_from_options(options)
    try:
        settings = build_settings(flags, options.get("config"))
        # every listener is tried before the data dir is touched: a typo creates no CA, token or settings
        for what, description in (("HTTPS", settings.https_listen), ("plain-HTTP PKI", settings.pki_listen_endpoint())):
            problem = listen_problem(reactor, description) if description else None
            if problem:
                raise StartupError(f"cannot listen for {what} on {description}: {problem} (nothing was created "
                                   f"or changed)")
        booted = boot(settings)
        fit_open_file_limit(settings.limits.max_connections, 2 if settings.pki_listen_endpoint() else 1)
    except (ConfigError, StartupError) as e:
        sys.stderr.write(f"uptrakitd: error: {e}\n")
        raise SystemExit(2)
    return build_daemon(booted, reactor, flags, handle_sigterm=True, manage_gc=True)
