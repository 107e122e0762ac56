"""`uptrakitctl`: everything the web UI does, from a terminal, through the HTTPS API; and the local commands
that need the data dir itself (backup, restore). Built on click: the CLI library operators meet in most Python
tools, with nested commands, prompts, environment defaults and bash/zsh completion built in."""
from __future__ import annotations

import sys
from pathlib import Path
from functools import wraps
from typing import Any, Callable
from urllib.parse import quote, urlencode

import click

from .backup import backup, restore
from .client import DEFAULT_URL, REFUSED, USAGE, Api, Connection, CtlError
from .output import Column, emit, pairs, table

REASONS = ["unspecified", "keyCompromise", "cACompromise", "affiliationChanged", "superseded",
           "cessationOfOperation", "certificateHold", "privilegeWithdrawn", "aACompromise"]
OUTPUT = click.option("-o", "--output", type=click.Choice(["table", "json"]), default=None,
                      help="table for people (sized to the terminal), json for scripts [default: uptrakitctl's "
                           "--output]")
YES = click.option("-y", "--yes", is_flag=True, help="do not ask for confirmation")


def confirm(yes: bool, question: str) -> None:
    """Ask before a destructive change; without a terminal to ask on, --yes is required."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise CtlError(f"{question} Not asked without a terminal: add --yes", USAGE)
    if not click.confirm(question, default=False):
        raise CtlError("nothing changed", REFUSED)


def with_api(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A command that talks to the controller: --output, and the Api as its first argument."""
    @OUTPUT
    @click.pass_context
    @wraps(fn)
    def command(ctx: click.Context, *args: Any, output: str | None, **kw: Any) -> Any:
        return fn(ctx.obj["api"], *args, output=output or ctx.obj["output"], **kw)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--url", envvar="UPTRAKIT_URL", default=DEFAULT_URL, show_default=True, metavar="URL",
              help="the controller's HTTPS API (env UPTRAKIT_URL)")
@click.option("--token-file", envvar="UPTRAKIT_TOKEN_FILE", metavar="FILE",
              help="file holding an admin or read token (env UPTRAKIT_TOKEN_FILE; a new controller's bootstrap "
                   "token is DATA_DIR/admin.token)")
@click.option("--ca-file", envvar="UPTRAKIT_CA_FILE", metavar="FILE",
              help="CA bundle that verifies the controller (env UPTRAKIT_CA_FILE; DATA_DIR/pki/ca.crt, or "
                   "GET /api/v1/pki/ca.crt on its PKI port); default: the system's trust store")
@click.option("--timeout", type=click.FloatRange(0.5, 600), default=15.0, show_default=True,
              help="seconds to wait for each answer")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
              envvar="UPTRAKIT_OUTPUT", help="table for people (sized to the terminal), json for scripts (stable: "
                                             "the API's fields, keys sorted); env UPTRAKIT_OUTPUT")
@click.version_option(package_name="uptrakitd", prog_name="uptrakitctl")
@click.pass_context
def cli(ctx: click.Context, url: str, token_file: str | None, ca_file: str | None, timeout: float,
        output: str) -> None:
    """Operate an uptrakitd controller: status, services, certificates, CA rotation, tokens, network settings,
    the proxy doctor; backup and restore of a data dir. The connection options (--url, --token-file, --ca-file,
    --timeout) may also follow the command.

    \b
    Exit status: 0 done; 1 refused by the controller or a check failed; 2 bad usage or an unreadable local file;
    3 the controller could not be reached or its certificate not verified; 4 the token was refused (401, or 403
    for a read token asked to change something).
    """
    ctx.ensure_object(dict)
    ctx.obj["connection"] = connection = Connection(url, token_file, ca_file, timeout)
    ctx.obj["output"] = output
    if ctx.invoked_subcommand not in ("backup", "restore", "completion"):
        ctx.obj["api"] = Api(connection)


# -- status ----------------------------------------------------------------------------------------


@cli.command()
@with_api
def status(api: Api, output: str) -> None:
    """Readiness, CA generations and custody, CRL numbers and age, counts, controllers."""
    code, ready = api.exchange("GET", "/readyz")
    overview = api.get("/api/v1/overview")
    pki = api.get("/api/v1/settings/pki")
    controllers = api.get("/api/v1/controllers")["controllers"]
    data = {"ready": ready, "overview": overview, "pki": pki, "controllers": controllers}

    def human(_: Any) -> str:
        lines = [f"controller   {api.connection.url}  {ready.get('status', '?')}"
                 + (f"  (version {ready['version']})" if ready.get("version") else "")]
        failing = {k: v for k, v in (ready.get("checks") or {}).items() if v != "ok"}
        if failing:
            lines += [f"  not ready: {k}: {v}" for k, v in failing.items()]
        for label, ca in (("active CA", pki.get("active_ca")), ("previous CA", pki.get("previous_ca"))):
            if ca:
                lines.append(f"{label:<12} generation {ca['generation']}  {ca['cn']}  key: {ca.get('custody', '?')}"
                             f"  until {ca['not_after'][:10]}  CRL #{ca.get('crl_number')} "
                             f"({ca.get('crl_entries')} entries, {ca.get('crl_age_seconds')} s old)")
        s, c = overview["services"], overview["certificates"]
        lines.append(f"services     {s['total']} ({s['connected']} connected, {s['pending']} pending)")
        lines.append(f"certificates {c['valid']} valid, {c['revoked_last_24h']} revoked in 24 h, "
                     f"{c['expiring_in_window']} in the renewal window")
        rotation = overview.get("rotation") or {}
        if rotation.get("in_progress"):
            lines.append(f"rotation     to generation {rotation.get('generation')} in progress")
        for b in overview.get("banners", []):
            lines.append(f"{b['severity'].upper():<12} {b['text']} ({b['code']})")
        lines.append("")
        lines.append(table(controllers, [Column("controller", lambda r: r.get("id") or "(single)"),
                                         Column("host", lambda r: r["hostname"], cut=True),
                                         Column("leader", lambda r: r["leader"]),
                                         Column("services", lambda r: r["services"]),
                                         Column("CA gen", lambda r: r.get("ca_generation")),
                                         Column("seen", lambda r: r.get("seen_at")),
                                         Column("this", lambda r: r.get("this"))]))
        return "\n".join(lines)
    emit(output, data, human)
    if code != 200:
        raise CtlError(f"the controller is not ready ({ready.get('status') if isinstance(ready, dict) else code})",
                       REFUSED)


# -- services --------------------------------------------------------------------------------------

SERVICE_COLUMNS = [Column("id", lambda s: s["id"]), Column("kind", lambda s: s["kind"]),
                   Column("name", lambda s: s.get("friendly_name") or s.get("hostname"), cut=True),
                   Column("status", lambda s: s["status"]), Column("online", lambda s: s["connected"]),
                   Column("address", lambda s: s.get("ip_address"), cut=True),
                   Column("cert until", lambda s: (s.get("certificate") or {}).get("not_after"))]


def describe_service(s: dict[str, Any]) -> str:
    cert = s.get("certificate") or {}
    return pairs([("id", s["id"]), ("kind", s["kind"]), ("hostname", s["hostname"]),
                  ("friendly name", s.get("friendly_name")), ("status", s["status"]),
                  ("connected", s["connected"]), ("controller", s.get("controller")),
                  ("address", s.get("ip_address")), ("via proxy", s.get("proxy_ip")),
                  ("identity from", s.get("identity_source")), ("last seen", s.get("last_seen_at")),
                  ("enrolled", s.get("created_at")), ("capabilities", s.get("capabilities")),
                  ("certificate", cert.get("serial")), ("  until", cert.get("not_after")),
                  ("  CA generation", cert.get("ca_generation")),
                  ("certificate lifetime", f"{s['cert_lifetime_hours']} h" if s.get("cert_lifetime_hours")
                   else "the default")])


@cli.group()
def services() -> None:
    """Enrolled agents and MQTT services."""


@services.command("list")
@click.option("--status", type=click.Choice(["pending", "approved", "rejected", "deactivated"]))
@click.option("--kind", type=click.Choice(["agent", "mqtt"]))
@click.option("--connected/--disconnected", default=None, help="only those holding a socket (or not)")
@with_api
def services_list(api: Api, output: str, status: str | None, kind: str | None, connected: bool | None) -> None:
    """Services, oldest enrollment first."""
    query = {k: v for k, v in (("status", status), ("kind", kind),
                               ("connected", None if connected is None else str(connected).lower())) if v}
    rows = api.get("/api/v1/services" + ("?" + urlencode(query) if query else ""))["services"]
    emit(output, rows, lambda rows: table(rows, SERVICE_COLUMNS) if rows else "no service matches")


@services.command("show")
@click.argument("service_id")
@with_api
def services_show(api: Api, output: str, service_id: str) -> None:
    """One service."""
    emit(output, api.get(f"/api/v1/services/{quote(service_id)}"), describe_service)


def _decide(verb: str, past: str, destructive: bool) -> None:
    @services.command(verb, help=f"{verb.capitalize()} a service" + (" (asks first)." if destructive else "."))
    @click.argument("service_id")
    @YES
    @with_api
    def command(api: Api, output: str, service_id: str, yes: bool) -> None:
        if destructive:
            what = "Deactivate" if verb == "deactivate" else "Reject"
            confirm(yes, f"{what} service {service_id}"
                    + (" and revoke every certificate it holds?" if verb == "deactivate" else "?"))
        path = f"/api/v1/services/{quote(service_id)}" + ("" if verb == "deactivate" else f"/{verb}")
        answer = api.request("DELETE" if verb == "deactivate" else "POST", path)
        emit(output, answer, lambda s: f"service {s['id']} ({s.get('hostname')}) is {past}")


_decide("approve", "approved", False)
_decide("reject", "rejected", True)
_decide("deactivate", "deactivated", True)


# -- certificates ----------------------------------------------------------------------------------

CERT_COLUMNS = [Column("serial", lambda c: c["serial"]), Column("service", lambda c: c.get("service_id")),
                Column("purpose", lambda c: c["purpose"]), Column("gen", lambda c: c["ca_generation"]),
                Column("not after", lambda c: c["not_after"]),
                Column("status", lambda c: c["status"] + (f" ({c['revocation_reason']})"
                                                          if c.get("revocation_reason") else ""))]


@cli.group()
def certs() -> None:
    """Certificates the CA issued."""


@certs.command("list")
@click.option("--status", type=click.Choice(["valid", "revoked", "expired", "untrusted"]),
              help="untrusted: its CA generation left the trust bundle")
@click.option("--service", "service_id", metavar="ID", help="only this service's")
@click.option("--search", metavar="TEXT", help="serial (or part of it)")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@with_api
def certs_list(api: Api, output: str, status: str | None, service_id: str | None, search: str | None,
               limit: int) -> None:
    """Certificates in issue order; with more than --limit, the newest."""
    query = {k: v for k, v in (("status", status), ("service_id", service_id), ("q", search),
                               ("limit", str(limit))) if v}
    answer = api.get("/api/v1/certificates?" + urlencode(query))

    def human(a: dict[str, Any]) -> str:
        shown = a["certificates"]
        more = f"\n({len(shown)} of {a['total']}; --limit shows more)" if a.get("total", 0) > len(shown) else ""
        return (table(shown, CERT_COLUMNS) if shown else "no certificate matches") + more
    emit(output, answer, human)


@certs.command("show")
@click.argument("serial")
@click.option("--pem", is_flag=True, help="print only the certificate (PEM)")
@with_api
def certs_show(api: Api, output: str, serial: str, pem: bool) -> None:
    """One certificate: what it says, its issuer's custody, its revocation."""
    c = api.get(f"/api/v1/certificates/{quote(serial)}")
    if pem:
        click.echo(c["pem"].rstrip())
        return
    emit(output, c, lambda c: pairs([
        ("serial", c["serial"]), ("status", c["status"]), ("subject", c.get("subject")),
        ("names", c.get("sans")), ("SPIFFE ID", c.get("spiffe_id")), ("service", c.get("service_id")),
        ("purpose", c["purpose"]), ("issuer", c.get("issuer")), ("CA generation", c["ca_generation"]),
        ("issuer key", c.get("issuer_custody")), ("not before", c.get("not_before")),
        ("not after", c.get("not_after")), ("revoked", c.get("revoked_at")),
        ("reason", c.get("revocation_reason"))]))


@certs.command("revoke")
@click.argument("serial")
@click.option("--reason", type=click.Choice(REASONS), default="unspecified", show_default=True)
@YES
@with_api
def certs_revoke(api: Api, output: str, serial: str, reason: str, yes: bool) -> None:
    """Revoke a certificate (asks first): OCSP, the CRL and the TLS handshake refuse it at once."""
    confirm(yes, f"Revoke certificate {serial} ({reason})? This cannot be undone.")
    answer = api.request("POST", f"/api/v1/certificates/{quote(serial)}/revoke", {"reason": reason})
    emit(output, answer, lambda a: f"certificate {a['serial']} revoked ({a['reason']}) at {a['revoked_at']}")


# -- the CA ----------------------------------------------------------------------------------------


@cli.group()
def ca() -> None:
    """The managed CA."""


@ca.command("rotate")
@click.option("--wait", is_flag=True, help="then show progress until every connected service has renewed")
@click.option("--wait-timeout", type=click.FloatRange(1, 86400), default=900, show_default=True,
              help="seconds --wait waits before giving up (exit 1)")
@YES
@with_api
def ca_rotate(api: Api, output: str, wait: bool, wait_timeout: float, yes: bool) -> None:
    """Make a new CA generation (asks first); the previous one stays trusted and every connected service is
    asked to renew."""
    confirm(yes, "Rotate the CA? Every connected service will be asked to renew its certificate.")
    answer = api.request("POST", "/api/v1/settings/rotate-ca")
    emit(output, answer, lambda a: f"generation {a.get('generation')} is active; {a.get('notified')} connected "
                                   "service(s) asked to renew")
    if wait:
        from .progress import wait_for_rotation
        wait_for_rotation(api, int(answer["generation"]), wait_timeout, json_lines=output == "json")


# -- tokens ----------------------------------------------------------------------------------------


@cli.group()
def tokens() -> None:
    """Enrollment tokens (for services) and admin tokens (for people and scripts)."""


@tokens.group("enroll")
def enroll_tokens() -> None:
    """Tokens a service enrolls with."""


ENROLL_COLUMNS = [Column("id", lambda t: t["id"]), Column("name", lambda t: t["name"], cut=True),
                  Column("kind", lambda t: t.get("kind") or "any"),
                  Column("uses", lambda t: f"{t.get('uses', 0)}/{t.get('max_uses') or '∞'}"),
                  Column("expires", lambda t: t.get("expires_at")),
                  Column("approval", lambda t: "auto" if t.get("auto_approve") else "manual"),
                  Column("revoked", lambda t: t.get("revoked_at"))]


@enroll_tokens.command("create")
@click.option("--name", required=True)
@click.option("--kind", type=click.Choice(["agent", "mqtt"]), help="only this kind may enroll (default: both)")
@click.option("--max-uses", type=click.IntRange(1, 1_000_000), default=1, show_default=True)
@click.option("--expires-in", type=click.IntRange(1, 10 * 365 * 86400), default=86400, show_default=True,
              metavar="SECONDS")
@click.option("--auto-approve/--manual-approval", default=False, show_default=True,
              help="services enrolled with it are approved at once, or wait for services approve")
@with_api
def enroll_create(api: Api, output: str, name: str, kind: str | None, max_uses: int, expires_in: int,
                  auto_approve: bool) -> None:
    """Make an enrollment token; it is shown once."""
    body: dict[str, Any] = {"name": name, "max_uses": max_uses, "expires_in_seconds": expires_in,
                            "auto_approve": auto_approve}
    if kind:
        body["kind"] = kind
    answer = api.request("POST", "/api/v1/enrollment-tokens", body)
    emit(output, answer, lambda t: f"{t['token']}\n(enrollment token {t['id']} '{t['name']}': shown once; "
                                   f"{max_uses} use(s), expires {t.get('expires_at')})")


@enroll_tokens.command("list")
@with_api
def enroll_list(api: Api, output: str) -> None:
    """Enrollment tokens (their secrets are never shown again)."""
    rows = api.get("/api/v1/enrollment-tokens")["tokens"]
    emit(output, rows, lambda rows: table(rows, ENROLL_COLUMNS) if rows else "no enrollment token")


@enroll_tokens.command("delete")
@click.argument("token_id")
@YES
@with_api
def enroll_delete(api: Api, output: str, token_id: str, yes: bool) -> None:
    """Delete an enrollment token (asks first); services it enrolled keep working."""
    confirm(yes, f"Delete enrollment token {token_id}?")
    answer = api.request("DELETE", f"/api/v1/enrollment-tokens/{quote(token_id)}")
    emit(output, answer, lambda a: f"enrollment token {a['id']} deleted")


@tokens.group("admin")
def admin_tokens() -> None:
    """Tokens for the API and the web UI."""


ADMIN_COLUMNS = [Column("id", lambda t: t["id"]), Column("name", lambda t: t["name"], cut=True),
                 Column("role", lambda t: "admin" if "admin" in t.get("permissions", []) else "read"),
                 Column("created", lambda t: t.get("created_at")), Column("revoked", lambda t: t.get("revoked_at"))]


@admin_tokens.command("create")
@click.option("--name", required=True)
@click.option("--role", type=click.Choice(["admin", "read"]), default="admin", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="break-glass, without the API: write the token into this data dir's database (needs write "
                   "access; audited as a local actor; a running daemon knows it after a SIGHUP)")
@click.option("--database", metavar="URL", help="break-glass, without the API: into the controllers' PostgreSQL "
                                                "(every controller knows it within seconds)")
@with_api
def admin_create(api: Api, output: str, name: str, role: str, data_dir: Path | None, database: str | None) -> None:
    """Make an admin (or read-only) token; it is shown once. With --data-dir or --database it is written into
    the database directly, for when no admin token is left (after a restore: a backup leaves admin.token out)."""
    if data_dir is not None and database is not None:
        raise CtlError("give --data-dir or --database, not both", USAGE)
    if data_dir is not None or database is not None:
        from .local import create_admin_token
        answer = create_admin_token(data_dir, database, name, role)
        after = (" (a running daemon knows it after a SIGHUP: systemctl reload uptrakitd)"
                 if data_dir is not None else "")
    else:
        answer, after = api.request("POST", "/api/v1/admin-tokens", {"name": name, "permissions": [role]}), ""
    emit(output, answer,
         lambda t: f"{t['token']}\n(admin token {t['id']} '{t['name']}', role {role}: shown once){after}")


@admin_tokens.command("list")
@with_api
def admin_list(api: Api, output: str) -> None:
    """Admin tokens (their secrets are never shown again)."""
    rows = api.get("/api/v1/admin-tokens")["tokens"]
    emit(output, rows, lambda rows: table(rows, ADMIN_COLUMNS))


@admin_tokens.command("revoke")
@click.argument("token_id")
@YES
@with_api
def admin_revoke(api: Api, output: str, token_id: str, yes: bool) -> None:
    """Revoke an admin token (asks first); it stops working at once, on every controller."""
    confirm(yes, f"Revoke admin token {token_id}?")
    answer = api.request("DELETE", f"/api/v1/admin-tokens/{quote(token_id)}")
    emit(output, answer, lambda a: f"admin token {a['id']} revoked")


# -- network ---------------------------------------------------------------------------------------

NETWORK_FIELDS = [("trusted_proxies", "trusted proxies"), ("real_ip_header", "real client IP header"),
                  ("forwarded_client_cert_pem_header", "certificate header"),
                  ("forwarded_client_cert_info_header", "certificate info header"),
                  ("forwarded_client_cert_info_format", "info header format"),
                  ("forwarded_client_verify_header", "verify header"), ("pki_addr", "PKI address")]


def describe_network(n: dict[str, Any]) -> str:
    return pairs([(label, n.get(key)) for key, label in NETWORK_FIELDS])


@cli.group()
def network() -> None:
    """Trusted proxies, identity headers and the PKI address (changed live, on every controller)."""


@network.command("show")
@with_api
def network_show(api: Api, output: str) -> None:
    """The network settings in force."""
    emit(output, api.get("/api/v1/settings/network"), describe_network)


@network.command("set")
@click.option("--trusted-proxy", "trusted_proxies", multiple=True, metavar="CIDR",
              help="replaces the list; repeat for several; --no-trusted-proxies empties it")
@click.option("--no-trusted-proxies", is_flag=True, help="trust no proxy")
@click.option("--real-ip-header", metavar="NAME")
@click.option("--cert-header", "forwarded_client_cert_pem_header", metavar="NAME",
              help="header carrying the client certificate (empty string: none)")
@click.option("--cert-info-header", "forwarded_client_cert_info_header", metavar="NAME")
@click.option("--cert-info-format", "forwarded_client_cert_info_format", metavar="FORMAT")
@click.option("--verify-header", "forwarded_client_verify_header", metavar="NAME")
@click.option("--pki-addr", metavar="URL")
@with_api
def network_set(api: Api, output: str, trusted_proxies: tuple[str, ...], no_trusted_proxies: bool,
                **fields: str | None) -> None:
    """Change the given fields; the others stay as they are."""
    body: dict[str, Any] = {k: (v or None) for k, v in fields.items() if v is not None}
    if trusted_proxies and no_trusted_proxies:
        raise CtlError("--trusted-proxy and --no-trusted-proxies contradict each other", USAGE)
    if trusted_proxies or no_trusted_proxies:
        body["trusted_proxies"] = list(trusted_proxies)
    if not body:
        raise CtlError("nothing to change: give at least one option (uptrakitctl network set --help)", USAGE)
    emit(output, api.request("PUT", "/api/v1/settings/network", body), describe_network)


# -- the proxy doctor ------------------------------------------------------------------------------


@cli.command()
@click.option("--strict", is_flag=True, help="exit 1 when there is any finding, warnings included (without it: 1 "
                                             "only for an error)")
@with_api
def doctor(api: Api, output: str, strict: bool) -> None:
    """The proxy doctor: what each peer sent lately, what was decided, and advice; the overview's warnings.
    Exit status 0 when nothing is wrong or only warnings were found (a warning is worth reading, not an outage),
    1 when there is an error finding, or a warning with --strict (an `info` finding never changes it)."""
    d = api.get("/api/v1/diagnostics/identity")
    banners = api.get("/api/v1/overview").get("banners", [])
    data = dict(d, banners=banners)

    def human(_: Any) -> str:
        h = d["configured_headers"]
        lines = [pairs([("trusted proxies", d["trusted_proxies"] or "none"),
                        ("real client IP header", d["real_ip_header"]),
                        ("certificate header", h.get("forwarded_client_cert_pem_header") or "not set"),
                        ("info header", h.get("forwarded_client_cert_info_header") or "not set"),
                        ("verify header", h.get("forwarded_client_verify_header") or "not set")]), ""]
        findings = [(b["severity"], b["code"], b["text"]) for b in banners]
        findings += [(a["severity"], a["code"], f"{p['peer']}: {a['text']}") for p in d["peers"] for a in p["advice"]]
        if findings:
            lines += [f"{sev.upper():<8} {code}: {msg}" for sev, code, msg in findings]
        else:
            lines.append("no problem seen in recent requests" if d["peers"] else
                         "nothing recorded yet: no trusted proxy has sent a request, and no untrusted peer sent "
                         "client-certificate headers")
        if d["peers"]:
            lines += ["", table(d["peers"], [
                Column("peer", lambda p: p["peer"]), Column("trusted", lambda p: p["trusted"]),
                Column("requests", lambda p: p["count"]),
                Column("headers seen", lambda p: p["header_families"], cut=True),
                Column("decisions", lambda p: ", ".join(f"{k} {v}" for k, v in p["decisions"].items()), cut=True),
                Column("last seen", lambda p: p.get("last_seen"))])]
        return "\n".join(lines)
    emit(output, data, human)
    severities = [b.get("severity") for b in banners] + [a.get("severity") for p in d["peers"] for a in p["advice"]]
    if "error" in severities or (strict and "warning" in severities):
        raise click.exceptions.Exit(REFUSED)


# -- shell completion ------------------------------------------------------------------------------


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh"]))
def completion(shell: str) -> None:
    """Print the completion script: eval "$(uptrakitctl completion bash)" in ~/.bashrc (zsh: ~/.zshrc)."""
    from click.shell_completion import get_completion_class
    complete = get_completion_class(shell)
    assert complete is not None
    click.echo(complete(cli, {}, "uptrakitctl", "_UPTRAKITCTL_COMPLETE").source())


cli.add_command(backup)
cli.add_command(restore)


CONNECTION_OPTIONS = ("--url", "--token-file", "--ca-file", "--timeout")


def connection_options_first(argv: list[str]) -> list[str]:
    """The connection options moved before the command wherever they were given (`uptrakitctl status --ca-file
    F`, as vault, kubectl and step accept them); no command has options of these names. After `--` nothing
    moves."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            rest += argv[i:]
            break
        name = word.split("=", 1)[0]
        if name in CONNECTION_OPTIONS and rest:
            taken = 1 if "=" in word or i + 1 == len(argv) else 2
            front += argv[i:i + taken]
            i += taken
            continue
        rest.append(word)
        i += 1
    return front + rest


def main(argv: list[str] | None = None) -> int:
    argv = connection_options_first(list(sys.argv[1:] if argv is None else argv))
    try:
        # (without standalone mode click returns a raised Exit's status instead of raising it)
        returned = cli.main(args=argv, prog_name="uptrakitctl", standalone_mode=False)
    except CtlError as e:
        click.echo(f"uptrakitctl: error: {e}", err=True)
        return e.status
    except click.exceptions.Abort:
        click.echo("uptrakitctl: aborted", err=True)
        return REFUSED
    except click.ClickException as e:
        e.show()
        return USAGE
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    return returned if isinstance(returned, int) and not isinstance(returned, bool) else 0


def run() -> None:
    sys.exit(main())

