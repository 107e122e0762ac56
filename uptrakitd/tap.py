"""`twistd uptrakit`: command-line options and makeService (wiring only)."""
from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from .config import SCALARS, ConfigError, build_settings


class Options(usage.Options):
    """uptrakitd options; every flag also has a key in the TOML config file (SPEC §1)."""

    synopsis = "[options]"
    longdesc = ("Run the Uptrakit controller security edge: private CA, OCSP/CRL, identity resolution "
                "(mTLS or trusted-proxy headers) and the service WebSocket channel. With no options it "
                "keeps its state in ./uptrakit-data and serves HTTPS on port 8443.")

    optParameters = [
        ["config", "c", None, "TOML config file with the same keys as these flags (flag > file > stored > default)."],
        ["real-ip-header", None, None, "Header with the client address, read only from trusted proxies "
                                       "(default X-Forwarded-For; also Forwarded, X-Real-IP, ...)."],
        ["forwarded-client-cert-info-header", None, None,
         "Structured client-cert info header from a trusted proxy (e.g. X-Forwarded-Client-Cert-Info, "
         "X-Forwarded-Client-Cert for Envoy, X-Forwarded-Tls-Client-Cert-Info for Traefik)."],
        ["forwarded-client-cert-pem-header", None, None,
         "Header carrying the client certificate itself (URL-encoded PEM, base64 DER or RFC 9440)."],
        ["forwarded-client-cert-info-format", None, None,
         "How the info header is written: auto (default), kv, xfcc (Envoy) or traefik."],
        ["forwarded-client-verify-header", None, None,
         "Header in which a trusted proxy reports its own client-certificate check (nginx: X-SSL-Client-Verify "
         "= $ssl_client_verify); anything but SUCCESS then means no identity."],
        ["pki-addr", None, None, "Base URL embedded in certificates (AIA OCSP + caIssuers, CDP); http:// or "
                                 "https://. Changing it needs a CA rotation."],
    ] + [[scalar.flag, None, None, scalar.help] for scalar in SCALARS]
    optFlags = [
        ["force-settings-override", None, "Flags and config file overwrite the stored runtime settings."],
        ["metrics-require-auth", None, "Serve /metrics only with an admin (or read) token."],
        ["proxy-protocol-trust-headers", None, "On a PROXY-protocol listener, still honour client-certificate "
                                               "headers from --trusted-proxy addresses (off: only mTLS counts)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["trusted_proxies"] = []
        self["san"] = []
        self["proxy_protocol_senders"] = []

    def opt_trusted_proxy(self, value: str) -> None:
        """IP or CIDR (v4 or v6) of a reverse proxy whose forwarded headers are trusted; repeatable."""
        self["trusted_proxies"].append(value)

    def opt_proxy_protocol_sender(self, value: str) -> None:
        """IP or CIDR allowed to send PROXY-protocol headers to a haproxy:... listener; repeatable, required there."""
        self["proxy_protocol_senders"].append(value)

    def opt_version(self) -> None:
        """Print uptrakitd's and Twisted's versions and exit."""
        from twisted import copyright

        from . import __version__
        print(f"uptrakitd {__version__} (Twisted {copyright.version}, Python {sys.version.split()[0]})")
        sys.exit(0)

    def opt_san(self, value: str) -> None:
        """Extra DNS name or IP address for the server certificate; repeatable."""
        self["san"].append(value)


def flags_from_options(options: Any) -> dict[str, Any]:
    """Flag values given on the command line, keyed by config name."""
    keys = ["real-ip-header", "forwarded-client-cert-info-header", "forwarded-client-cert-pem-header",
            "forwarded-client-cert-info-format", "forwarded-client-verify-header", "pki-addr",
            *(scalar.flag for scalar in SCALARS)]
    flags = {k.replace("-", "_"): options[k] for k in keys if options.get(k) is not None}
    flags["trusted_proxies"] = list(options.get("trusted_proxies", []))
    flags["san"] = list(options.get("san", []))
    flags["proxy_protocol_senders"] = list(options.get("proxy_protocol_senders", []))
    if options.get("force-settings-override"):
        flags["force_settings_override"] = True
    if options.get("metrics-require-auth"):
        flags["metrics_require_auth"] = True
    if options.get("proxy-protocol-trust-headers"):
        flags["proxy_protocol_trust_headers"] = True
    return flags


def makeService(options: Any) -> Any:
    """Validate settings, prepare state, return the service tree. Errors: one line, exit status 2."""
    from twisted.internet import reactor

    from .boot import StartupError, boot
    from .daemon import build_daemon

    from .listen.fdlimit import fit_open_file_limit
    from .listen.preflight import listen_problem

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
