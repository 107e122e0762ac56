"""Typed, validated settings from flags, the TOML file and the store (SPEC §1, §7)."""
from __future__ import annotations

import os
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Mapping
from urllib.parse import urlsplit, urlunsplit

from uptrakitd.printable import has_control

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

INFO_FORMATS = ("auto", "kv", "xfcc", "traefik")
PKI_HTTP_MODES = ("listener", "external")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warn", "error")
ACCESS_LOG_MODES = ("off", "sampled", "all")
OCSP_SIGNERS = ("ca", "delegated")
# a CA rotation's renewals per second on one controller: 5,000 agents back in ~50 s with /healthz p99 under
# 100 ms on two cores (docs/performance.md); each is a CSR check, a signature, commits and an mTLS reconnect
DEFAULT_ROTATION_RENEWAL_RATE = 100
DEFAULT_OCSP_NONCE_RATE = 100   # answers signed per request, per client address and second
DEFAULT_HTTPS_LISTEN = r"tcp:8443:interface=\:\:"
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")


class ConfigError(ValueError):
    """A setting is invalid; `field` names it, the message says why in one line."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.reason = message


def parse_network(value: str, field_name: str = "trusted_proxies") -> IPNetwork:
    """Parse an IP or CIDR (bare IP = /32 or /128); IPv4-mapped IPv6 folds to IPv4."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(field_name, f"not an IP address or CIDR: {value!r}")
    try:
        net = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ConfigError(field_name, f"not an IP address or CIDR: {value!r}") from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped and net.prefixlen >= 96:
        net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    return net


def normalize_pki_addr(value: str | None, field_name: str = "pki_addr") -> str | None:
    """Validate a PKI base URL (http/https with a host); drop the trailing slash."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(field_name, "must be a string URL")
    if any(c.isspace() for c in value) or has_control(value):
        # urlsplit drops tabs and newlines silently, and the CA would embed the rest in its URLs
        raise ConfigError(field_name, f"URL must not contain spaces or control characters: {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(field_name, f"URL scheme must be http:// or https://, got {value!r}")
    if not parts.hostname:
        raise ConfigError(field_name, f"URL has no host: {value!r}")
    if parts.query or parts.fragment:
        raise ConfigError(field_name, "URL must not have a query or fragment")
    try:
        parts.port
    except ValueError:
        raise ConfigError(field_name, f"URL has an invalid port: {value!r}") from None
    if parts.username is not None or parts.password is not None:
        raise ConfigError(field_name, "URL must not carry a user or password")
    host = parts.hostname
    if not host.isascii():
        # certificates carry URIs in ASCII: store the A-label form the CA will embed
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ConfigError(field_name, f"host name cannot be written in ASCII (IDNA): {host!r}") from None
        netloc = parts.netloc.replace(parts.netloc.split("@")[-1].split(":")[0], ascii_host, 1)
        value = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    if not value.isascii():
        raise ConfigError(field_name, "URL path must be ASCII (percent-encode it)")
    host = urlsplit(value).hostname or ""
    if not _is_ip(host) and (host.startswith("*") or not _DNS_NAME.match(host)):
        raise ConfigError(field_name, f"URL host is not a valid host name or IP address: {host!r}")
    return value.rstrip("/")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _header(value: Any, field_name: str, optional: bool = True) -> str | None:
    if value is None or (optional and value == ""):
        return None
    if not isinstance(value, str) or not _HEADER_NAME.match(value):
        raise ConfigError(field_name, f"not a valid HTTP header name: {value!r}")
    return value


@dataclass(frozen=True)
class NetworkSettings:
    """Runtime network settings (SPEC §7): which peers are proxies and which headers they send."""

    trusted_proxies: tuple[IPNetwork, ...] = ()
    real_ip_header: str = "X-Forwarded-For"
    forwarded_client_cert_info_header: str | None = None
    forwarded_client_cert_info_format: str = "auto"
    forwarded_client_cert_pem_header: str | None = None
    forwarded_client_verify_header: str | None = None
    pki_addr: str | None = None

    FIELDS: ClassVar[tuple[str, ...]] = ()   # the names SETTINGS declares in section "network" (set below SETTINGS)

    def to_json(self) -> dict[str, Any]:
        """The JSON shape used by the API and the store."""
        return {
            "trusted_proxies": [str(n) for n in self.trusted_proxies],
            "real_ip_header": self.real_ip_header,
            "forwarded_client_cert_info_header": self.forwarded_client_cert_info_header,
            "forwarded_client_cert_info_format": self.forwarded_client_cert_info_format,
            "forwarded_client_cert_pem_header": self.forwarded_client_cert_pem_header,
            "forwarded_client_verify_header": self.forwarded_client_verify_header,
            "pki_addr": self.pki_addr,
        }

    def updated(self, changes: Mapping[str, Any]) -> NetworkSettings:
        """Return a copy with `changes` applied; validates every field first, raises ConfigError."""
        unknown = sorted(set(changes) - set(self.FIELDS))
        if unknown:
            raise ConfigError(unknown[0], "unknown setting")
        new: dict[str, Any] = {}
        for key, value in changes.items():
            if key == "trusted_proxies":
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, (list, tuple)):
                    raise ConfigError(key, "must be a list of IPs or CIDRs")
                new[key] = tuple(dict.fromkeys(parse_network(v, key) for v in value))
            elif key == "real_ip_header":
                if value in (None, ""):
                    raise ConfigError(key, "must not be empty")
                new[key] = _header(value, key, optional=False)
            elif key == "forwarded_client_cert_info_format":
                if value not in INFO_FORMATS:
                    raise ConfigError(key, f"must be one of {', '.join(INFO_FORMATS)}")
                new[key] = value
            elif key == "pki_addr":
                new[key] = normalize_pki_addr(value, key)
            else:
                new[key] = _header(value, key)
        return replace(self, **new)

    def trusts_everything(self) -> bool:
        """True when 0.0.0.0/0 or ::/0 is trusted: anyone can claim any identity via headers."""
        return any(n.prefixlen == 0 for n in self.trusted_proxies)


@dataclass(frozen=True)
class ConnectionLimits:
    """What one unauthenticated host, and everyone together, may hold open (docs/security.md)."""

    max_connections: int = 4096            # per listener, every peer together
    max_connections_per_ip: int = 64       # not yet authenticated, per source address; trusted proxies exempt
    request_head_timeout: float = 10.0     # seconds from accept (or the next request's first byte) to a full head
    close_grace: float = 2.0               # seconds a connection the daemon closes may take to go (listen.closing)
    listen_backlog: int = 1024             # accept queue of TCP listeners that do not set backlog= themselves


@dataclass(frozen=True)
class Settings:
    """Everything the daemon is started with, validated (SPEC §1)."""

    data_dir: Path = Path("./uptrakit-data")
    https_listen: str = DEFAULT_HTTPS_LISTEN
    network: NetworkSettings = field(default_factory=NetworkSettings)
    network_given: frozenset[str] = frozenset()
    pki_http: str | None = None
    pki_listen: str | None = None
    ca_cert: Path | None = None
    ca_key: Path | None = None
    san: tuple[str, ...] = ()
    trust_domain: str = "uptrakit.local"
    ocsp_signer: str = "ca"               # "delegated": a short-lived P-256 responder certificate signs OCSP
    ocsp_nonce_rate: int = DEFAULT_OCSP_NONCE_RATE   # per client address; 0: no limit
    ocsp_signing_share: float = 0.5   # of one core, for answers signed per request, all clients together; 0: no limit
    rotation_renewal_rate: int = DEFAULT_ROTATION_RENEWAL_RATE   # per second, asked of this controller's services
    force_settings_override: bool = False
    proxy_protocol_senders: tuple[IPNetwork, ...] = ()
    proxy_protocol_trust_headers: bool = False
    log_format: str = "text"
    log_level: str = "info"
    access_log: str = "off"
    metrics_require_auth: bool = False
    config_path: Path | None = None
    database: str | None = None          # None: SQLite in data_dir; else a postgresql:// URL
    cluster_max_staleness: float = 10.0  # with database: seconds without a confirmed change-log read before
                                         # OCSP answers tryLater and identities are refused (cluster.ClusterFreshness)
    ca_key_encryption_key_file: Path | None = None   # seals the CA keys kept in the database (either engine)
    audit_retention_days: int = 0        # 0: the audit trail is never pruned
    certificate_retention_days: int = 90   # certificate rows deleted that long after they expired; 0: never
    ca_key_uri: str | None = None        # pkcs11:token=…: new CA keys are made and used in that token
    pkcs11_module: Path | None = None    # the token's PKCS#11 library
    pkcs11_pin_file: Path | None = None  # its user PIN (else UPTRAKIT_PKCS11_PIN); read at start, never kept here
    limits: ConnectionLimits = field(default_factory=lambda: ConnectionLimits())

    def pki_listen_endpoint(self) -> str | None:
        """Endpoint string for the plain-HTTP PKI listener, derived from pki_addr when not given."""
        if self.pki_http != "listener":
            return None
        if self.pki_listen:
            return self.pki_listen
        parts = urlsplit(self.network.pki_addr or "")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname or "127.0.0.1"
        return f"tcp:{port}:interface=" + host.replace(":", "\\:")  # endpoint strings escape ":"


FILE = "file"   # Setting.kind: a path that must be readable when the daemon starts


@dataclass(frozen=True)
class Setting:
    """One setting, declared once (SETTINGS): its name (the Settings, ConnectionLimits or NetworkSettings field,
    and its TOML key, in the [pki] or [network] table when `section` says so), its flag (`name` with dashes
    unless `flag` says otherwise), its --help text, the values it takes, and when it takes effect. tap.py makes
    the flags from SETTINGS, read_config_file takes their keys, build_settings checks them, SIGHUP knows which
    need a restart, and docs/reference/configuration.md is made from them. What is checked across settings stays
    in build_settings; the network settings (changed at runtime too) are checked by NetworkSettings.updated."""

    name: str
    help: str
    kind: Any = str                  # int, float, str (with `choices`, or any non-empty string), Path, FILE,
                                     # or a function (value, name) -> the checked value
    low: float = 0
    high: float = 0
    choices: tuple[str, ...] = ()
    section: str = ""                # "pki" or "network": a key of that TOML table
    limit: bool = False              # a ConnectionLimits field
    flag_name: str = ""              # the flag when it is not `name` with dashes (a repeatable one is singular)
    in_file: bool = True             # False: a command-line switch only

    @property
    def flag(self) -> str:
        """The command-line flag, without its leading dashes."""
        return self.flag_name or self.name.replace("_", "-")

    @property
    def live(self) -> bool:
        """Changed without a restart (the API, and SIGHUP): the network settings."""
        return self.section == "network"

    @property
    def restart_key(self) -> str:
        """The Settings field a change of it shows in (the connection limits are one field)."""
        return "limits" if self.limit else self.name

    def parse(self, value: Any) -> Any:
        """The checked value (ConfigError naming the setting when it is not one of its values)."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(self.name, "must be true or false")
            return value
        if self.choices:
            if value not in self.choices:
                raise ConfigError(self.name, f"must be one of {', '.join(self.choices)}")
            return value
        if self.kind is str:
            return _string(value, self.name)
        if self.kind is Path:
            return Path(_string(value, self.name))
        if self.kind == FILE:
            return _readable_file(value, self.name)
        if self.kind in (int, float):
            return _number(value, self.name, self.low, self.high, integer=self.kind is int)
        return self.kind(value, self.name)


SETTINGS = (
    Setting("data_dir", "State directory: database, CA keys, CRL files (default ./uptrakit-data).", Path),
    Setting("https_listen", f"Twisted endpoint string for HTTPS; TLS is applied by uptrakitd (default "
                           f"{DEFAULT_HTTPS_LISTEN}; e.g. systemd:domain=INET6:index=0 or haproxy:tcp:8443)."),
    Setting("pki_http", "'listener': also serve the PKI routes over plain HTTP on the --pki-addr host/port (or "
                       "--pki-listen); 'external': something else serves them. Requires --pki-addr.",
           choices=PKI_HTTP_MODES),
    Setting("pki_listen", "Endpoint string for the plain-HTTP PKI listener (default from --pki-addr)."),
    Setting("database", "PostgreSQL URL (postgresql://user@host/dbname) instead of the embedded SQLite in --data-dir; "
                       "needs uptrakitd[postgresql] and --ca-key-encryption-key-file (or the CA keys in a token: "
                       "--ca-key-uri). Several controllers may share one database "
                       "(docs/deployment/high-availability.md).", lambda value, name: _database_url(value)),
    Setting("ca_key_encryption_key_file", "File of base64 AES-256 keys, one per line (head -c 32 /dev/urandom | "
                                         "base64), mode 0600: the first seals the CA keys kept in the database (no "
                                         "clear key file), the others only open older ones. Required with "
                                         "--database; with SQLite, an existing data dir is sealed first with "
                                         "`uptrakitd-keys seal`.", Path),
    Setting("ca_key_uri", "RFC 7512 URI of a PKCS#11 token (pkcs11:token=LABEL): new CA keys are generated and used "
                         "inside it, never in the clear; with object=NAME or id=…, that existing key is the next "
                         "one. Needs --pkcs11-module and the PIN (docs/deployment/ca-keys.md).", section="pki"),
    Setting("pkcs11_module", "The token's PKCS#11 library (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so).", FILE,
           section="pki"),
    Setting("pkcs11_pin_file", "File (mode 0600) whose first line is the token's user PIN; or set "
                              "UPTRAKIT_PKCS11_PIN. Never on the command line.", FILE, section="pki"),
    Setting("ca_cert", "External CA certificate (PEM); with --ca-key. Rotation is then refused.", FILE, section="pki"),
    Setting("ca_key", "External CA private key (PEM, unencrypted); with --ca-cert.", FILE, section="pki"),
    Setting("trust_domain", "SPIFFE trust domain in issued certificates (default uptrakit.local).",
           lambda value, name: _trust_domain(value), section="pki"),
    Setting("audit_retention_days", "Days the audit trail keeps entries (default 0: forever). Only whole segments "
                                   "up to a signed checkpoint are pruned, keeping the entry it vouches for, so an "
                                   "export still verifies (docs/audit.md).", int, 0, 36500),
    Setting("certificate_retention_days", "Days a certificate's row is kept after it expired (default 90; 0: "
                                         "forever; at least 2, since a revoked certificate stays on the CRL a day "
                                         "after it expires). Spent enrollment tokens go 30 days after their last "
                                         "use, expiry or deletion. Deleted daily in batches, on the leader.",
           lambda value, name: _retention_days(value, name)),
    Setting("ocsp_signer", "Who signs OCSP answers: 'ca' (the issuing CA; the default unless the CA key is in a "
                          "token) or 'delegated' (a two-day P-256 "
                          "responder certificate that CA issues, its key only in memory, embedded in each answer: a "
                          "tenth of the CPU per signed answer).", choices=OCSP_SIGNERS, section="pki"),
    Setting("ocsp_nonce_rate", "OCSP answers signed per request (a nonce, or a serial never issued) each client address "
                              "(IPv6: /64) may ask for per second, with bursts of twice that (default 100; 0: no "
                              "limit); beyond it, tryLater.", int, 0, 1_000_000, section="pki"),
    Setting("ocsp_signing_share", "Share of one core (0-1, default 0.5) that OCSP answers signed per request may take, "
                                 "all clients together; beyond it they get tryLater. 0: no limit.", float, 0, 1,
           section="pki"),
    Setting("cluster_max_staleness", "With --database: seconds this controller may go without confirming it applied "
                                    "the other controllers' changes before OCSP answers tryLater and new identities "
                                    "are refused (default 10).", float, 1, 3600),
    Setting("log_format", "'text' (default) or 'json' (one JSON object per line: time, level, logger, message and "
                         "the event's fields).", choices=LOG_FORMATS),
    Setting("log_level", "Least severe level logged: debug, info (default), warn or error.", choices=LOG_LEVELS),
    Setting("access_log", "Log requests: off (default), sampled (1 in 100) or all. /metrics, /healthz and /readyz "
                         "only with 'all'.", choices=ACCESS_LOG_MODES),
    Setting("max_connections", "Open connections per listener, all peers together (default 4096); past it new "
                              "connections are refused and logged.", int, 1, 1_000_000, limit=True),
    Setting("max_connections_per_ip", "Connections one source address may hold before it authenticates with a "
                                     "client certificate (default 64); trusted proxies are exempt.", int, 1,
           1_000_000, limit=True),
    Setting("listen_backlog", "Accept queue of TCP listeners whose endpoint string sets no backlog= (default 1024; "
                             "Twisted's own is 50, which overflows when a fleet reconnects at once).", int, 1, 65535,
           limit=True),
    Setting("rotation_renewal_rate", "Renewals per second a CA rotation asks of this controller's connected services, "
                                    "and the pace at which it admits renewals (default 100): they renew at random "
                                    "moments over services/rate seconds (docs/performance.md).", int, 1, 10_000),
    Setting("request_head_timeout", "Seconds a connection has to send a complete request head (default 10; the TLS "
                                   "handshake counts).", float, 0.1, 3600, limit=True),
    Setting("close_grace", "Seconds a connection the daemon closes may take to go before it is cut (default 2): a "
                          "WebSocket after its close, HTTP after a refusal, TLS waiting for the peer's close_notify.",
           float, 0.1, 60, limit=True),
    Setting("san", "Extra DNS name or IP address for the server certificate; repeatable.", list),
    Setting("proxy_protocol_senders", "IP or CIDR allowed to send PROXY-protocol headers to a haproxy:... listener; "
                                      "repeatable, required there.", list, flag_name="proxy-protocol-sender"),
    Setting("proxy_protocol_trust_headers", "On a PROXY-protocol listener, still honour client-certificate headers "
                                            "from --trusted-proxy addresses (off: only mTLS counts).", bool),
    Setting("metrics_require_auth", "Serve /metrics only with an admin (or read) token.", bool),
    Setting("force_settings_override", "Flags and config file overwrite the stored runtime settings.", bool,
            in_file=False),
    # the network settings (SPEC §7): also changed at runtime (PUT /api/v1/settings/network), stored in the database
    Setting("trusted_proxies", "IP or CIDR (v4 or v6) of a reverse proxy whose forwarded headers are trusted; "
                               "repeatable.", list, section="network", flag_name="trusted-proxy"),
    Setting("real_ip_header", "Header with the client address, read only from trusted proxies (default "
                              "X-Forwarded-For; also Forwarded, X-Real-IP, ...).", section="network"),
    Setting("forwarded_client_cert_info_header", "Structured client-cert info header from a trusted proxy (e.g. "
                                                 "X-Forwarded-Client-Cert-Info, X-Forwarded-Client-Cert for Envoy, "
                                                 "X-Forwarded-Tls-Client-Cert-Info for Traefik).", section="network"),
    Setting("forwarded_client_cert_pem_header", "Header carrying the client certificate itself (URL-encoded PEM, "
                                                "base64 DER or RFC 9440).", section="network"),
    Setting("forwarded_client_cert_info_format", "How the info header is written: auto (default), kv, xfcc (Envoy) "
                                                 "or traefik.", section="network"),
    Setting("forwarded_client_verify_header", "Header in which a trusted proxy reports its own client-certificate "
                                              "check (nginx: X-SSL-Client-Verify = $ssl_client_verify); anything but "
                                              "SUCCESS then means no identity.", section="network"),
    Setting("pki_addr", "Base URL embedded in certificates (AIA OCSP + caIssuers, CDP); http:// or https://. "
                        "Changing it needs a CA rotation.", section="network"),
)
BY_NAME = {setting.name: setting for setting in SETTINGS}
_TOP_KEYS = {"network", "pki", *(s.name for s in SETTINGS if not s.section and s.in_file)}
_PKI_KEYS = {s.name for s in SETTINGS if s.section == "pki"}
NetworkSettings.FIELDS = tuple(s.name for s in SETTINGS if s.section == "network")


def read_config_file(path: Path) -> dict[str, Any]:
    """Read and flatten the TOML file into flag names; unknown keys are errors (typos matter)."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError("config", f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("config", f"{path} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in _TOP_KEYS:
            raise ConfigError(key, f"unknown key in {path}")
        if key == "network":
            if not isinstance(value, dict):
                raise ConfigError("network", "must be a table")
            for nkey, nvalue in value.items():
                if nkey not in NetworkSettings.FIELDS:
                    raise ConfigError(f"network.{nkey}", f"unknown key in {path}")
                flat[f"network.{nkey}"] = nvalue
        elif key == "pki":
            if not isinstance(value, dict):
                raise ConfigError("pki", "must be a table")
            for pkey, pvalue in value.items():
                if pkey not in _PKI_KEYS:
                    raise ConfigError(f"pki.{pkey}", f"unknown key in {path}")
                flat[pkey] = pvalue
        else:
            flat[key] = value
    return flat


def _readable_file(value: Any, name: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(name, "must be a file path")
    path = Path(value)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ConfigError(name, f"cannot read {path}: {e.strerror}") from None
    return path


def _number(value: Any, name: str, low: float, high: float, integer: bool) -> Any:
    """A number from a flag (string) or the TOML file, within [low, high]."""
    try:
        number = (int(value) if integer else float(value)) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not low <= number <= high:
        kind = "a whole number" if integer else "a number"
        raise ConfigError(name, f"must be {kind} from {low:g} to {high:g}, got {value!r}")
    return number


def _retention_days(value: Any, name: str) -> int:
    days = _number(value, name, 0, 36500, True)
    if days == 1:
        raise ConfigError(name, "must be 0 (forever) or at least 2: a revoked certificate stays on the CRL a day "
                                "after it expires")
    return int(days)


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(name, "must be a non-empty string")
    return value


def _san(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not isinstance(value, str) or not _DNS_NAME.match(value):
        raise ConfigError("san", f"not a DNS name or IP address: {value!r}")
    return value.lower()


def is_proxy_protocol(endpoint: str) -> bool:
    """True for an endpoint string that expects a PROXY-protocol header first (`haproxy:...`)."""
    return endpoint.startswith("haproxy:")


def _proxy_protocol(merged: Mapping[str, Any], kw: dict[str, Any]) -> None:
    senders = merged.get("proxy_protocol_senders", [])
    if not isinstance(senders, list):
        senders = [senders]
    kw["proxy_protocol_senders"] = tuple(dict.fromkeys(parse_network(s, "proxy_protocol_senders") for s in senders))
    trust = kw.get("proxy_protocol_trust_headers", False)
    listener = kw.get("https_listen", DEFAULT_HTTPS_LISTEN)
    if is_proxy_protocol(listener) and not kw["proxy_protocol_senders"]:
        raise ConfigError("proxy_protocol_senders", "a PROXY-protocol listener (haproxy:...) needs "
                          "--proxy-protocol-sender: the proxy addresses allowed to send PROXY headers (anyone "
                          "else could claim any client address)")
    if not is_proxy_protocol(listener) and (kw["proxy_protocol_senders"] or trust):
        raise ConfigError("proxy_protocol_senders", "--proxy-protocol-sender and --proxy-protocol-trust-headers "
                          "only make sense with a haproxy:... --https-listen")


def _trust_domain(value: Any) -> str:
    td = _string(value, "trust_domain").lower()
    if not _DNS_NAME.match(td) or td.startswith("*"):
        raise ConfigError("trust_domain", f"not a valid SPIFFE trust domain: {td!r}")
    return td


def _token(kw: dict[str, Any]) -> None:
    """--ca-key-uri with --pkcs11-module and (--pkcs11-pin-file or UPTRAKIT_PKCS11_PIN)."""
    from uptrakitd.pki.pkcs11 import PIN_ENVIRONMENT, Pkcs11Uri, pin_taken_from_environment
    if "ca_key_uri" not in kw:
        for name in ("pkcs11_module", "pkcs11_pin_file"):
            if name in kw:
                raise ConfigError(name, f"--{name.replace('_', '-')} only makes sense with --ca-key-uri")
        return
    try:
        Pkcs11Uri.parse(kw["ca_key_uri"])
    except ValueError as e:
        raise ConfigError("ca_key_uri", str(e)) from None
    if "ca_cert" in kw:
        raise ConfigError("ca_key_uri", "--ca-key-uri and --ca-cert/--ca-key are two different CAs: give one")
    if "pkcs11_module" not in kw:
        raise ConfigError("pkcs11_module", "--ca-key-uri needs --pkcs11-module, the token's PKCS#11 library "
                                           "(SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)")
    if "pkcs11_pin_file" not in kw and not os.environ.get(PIN_ENVIRONMENT) and not pin_taken_from_environment():
        raise ConfigError("pkcs11_pin_file", f"--ca-key-uri needs the token's user PIN: --pkcs11-pin-file FILE "
                                             f"(mode 0600) or the environment variable {PIN_ENVIRONMENT}")


def url_has_password(url: str) -> bool:
    """A database URL with a password in it (user:password@ or ?password=)."""
    from urllib.parse import parse_qs
    parts = urlsplit(url)
    return parts.password is not None or "password" in parse_qs(parts.query)


def _database_url(value: Any) -> str:
    """A PostgreSQL connection URL (postgresql://user@host:port/dbname?...); the password may be in it."""
    url = _string(value, "database")
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError("database", "must be a postgresql:// URL (leave it unset for the embedded SQLite)")
    return url


def build_settings(flags: Mapping[str, Any], config_path: str | None = None) -> Settings:
    """Merge flags over the config file over defaults, validating everything (flag > file)."""
    merged: dict[str, Any] = {}
    if isinstance(flags.get("database"), str) and url_has_password(flags["database"]):
        raise ConfigError("database", "the URL on the command line carries a password, which every user of the host "
                                      "reads (ps, /proc/PID/cmdline): put it in a passfile (?passfile=FILE or "
                                      "PGPASSFILE, mode 0600), in PGPASSWORD, or in the config file")
    if config_path:
        merged.update(read_config_file(Path(config_path)))
    for key, value in flags.items():
        if value is None or value == [] or value is False:
            continue
        setting = BY_NAME.get(key)
        value = list(value) if setting is not None and setting.kind is list else value
        merged[f"network.{key}" if setting is not None and setting.live else key] = value

    network_changes = {k.split(".", 1)[1]: v for k, v in merged.items() if k.startswith("network.")}
    network = NetworkSettings().updated(network_changes)
    kw: dict[str, Any] = {"network": network, "network_given": frozenset(network_changes)}
    if ("ca_cert" in merged) != ("ca_key" in merged):
        raise ConfigError("ca_cert", "--ca-cert and --ca-key must be given together (both or neither)")
    limits: dict[str, Any] = {}
    for setting in SETTINGS:   # one value each (lists, and the network table, are read below)
        if setting.name in merged and setting.kind is not list and not setting.live:
            (limits if setting.limit else kw)[setting.name] = setting.parse(merged[setting.name])
    if limits:
        kw["limits"] = ConnectionLimits(**limits)
    _token(kw)
    if kw.get("database") and "ca_key_encryption_key_file" not in kw and "ca_key_uri" not in kw:
        raise ConfigError("database", "--database needs --ca-key-encryption-key-file: the CA keys are kept in the "
                                      "database, sealed with it (create one: head -c 32 /dev/urandom | base64 > FILE; "
                                      "chmod 600 FILE), or in a PKCS#11 token (--ca-key-uri)")
    if "ca_key_uri" in kw:
        if "ocsp_signer" not in kw:
            kw["ocsp_signer"] = "delegated"   # the CA key is not in memory: it signs only the responder's certificate
        elif kw["ocsp_signer"] == "ca":
            raise ConfigError("ocsp_signer", "with --ca-key-uri OCSP answers are signed by the delegated responder "
                                             "(the CA key in the token signs its certificate): leave --ocsp-signer "
                                             "unset or 'delegated'")
    if "san" in merged:
        sans = merged["san"] if isinstance(merged["san"], list) else [merged["san"]]
        kw["san"] = tuple(dict.fromkeys(_san(s) for s in sans))
    if kw.get("pki_http") and network.pki_addr is None:
        raise ConfigError("pki_http", "--pki-http requires --pki-addr")
    if kw.get("pki_listen") and kw.get("pki_http") != "listener":
        raise ConfigError("pki_listen", "--pki-listen only makes sense with --pki-http listener")
    _proxy_protocol(merged, kw)
    kw["config_path"] = Path(config_path) if config_path else None
    return Settings(**kw)
