"""Run a deployment guide as written: its `test=NAME` fenced blocks, its placeholder table, its paths.

A guide marks the blocks the tests use with `test=NAME` in the fence's info string (```nginx
test=snippet). The tests fill the placeholders listed in the guide's table (every one must be given,
none may be left) and move the guide's absolute paths into a temporary directory; nothing else of a
block is changed. Shell blocks run with `sh -e` and a PATH where `sudo` simply runs the command and
the proxy's own program is pointed at the test's copy of the package layout.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks

from ..helpers import env, run, spawn

DOCS = Path(__file__).resolve().parents[2] / "docs" / "deployment"
_FENCE = re.compile(r"^```(\w+)[^\n]*\btest=([\w-]+)[^\n]*\n(.*?)^```", re.S | re.M)
_ROW = re.compile(r"^\|\s*`([A-Z][A-Z0-9_]+)`\s*\|", re.M)


# curl's exit codes when the proxy refuses the client certificate in the TLS handshake: 35 (handshake),
# or, under TLS 1.3 where the alert comes after the client's last handshake message, 55 (send) or 56 (recv)
CURL_TLS_REFUSED = (35, 55, 56)


def standard_paths(work: Path) -> dict[str, Path]:
    """Where the test puts what every guide names by absolute path (the proxy's own directory aside)."""
    return {"/var/lib/uptrakitd": work / "controller", "/var/lib/uptrakit-agent": work / "agent-state",
            "/opt/uptrakitd/venv/bin": Path(sys.executable).parent, "/usr/local/sbin": work / "sbin"}


class Guide:
    """One guide's tested blocks and placeholders, filled for one test run."""

    def __init__(self, name: str, values: dict[str, Any], paths: dict[str, Path], shims: dict[str, str],
                 workdir: Path) -> None:
        self.path = DOCS / f"{name}.md"
        text = self.path.read_text()
        self.blocks = {m.group(2): m.group(3) for m in _FENCE.finditer(text)}
        self.placeholders = set(_ROW.findall(text))
        missing = self.placeholders - set(values)
        assert not missing, f"{self.path.name}: the test gives no value for {sorted(missing)}"
        unknown = set(values) - self.placeholders
        assert not unknown, f"{self.path.name}: {sorted(unknown)} not in the guide's placeholder table"
        self.values = {k: str(v) for k, v in values.items()}
        self.paths = {k: str(v) for k, v in paths.items()}
        self.workdir = workdir
        self.bin = workdir / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        for name, body in dict(shims, sudo='exec "$@"').items():
            self.shim(name, body)

    def shim(self, name: str, body: str) -> None:
        """A program `name` first on the blocks' PATH, running the shell `body`."""
        shim = self.bin / name
        shim.write_text(f"#!/bin/sh\n{body}\n")
        shim.chmod(0o755)

    def local(self, text: str) -> str:
        """`text` with the guide's absolute paths moved to where the test keeps them (one pass, longest first)."""
        if not self.paths:
            return text
        pattern = "|".join(re.escape(p) for p in sorted(self.paths, key=len, reverse=True))
        return re.sub(pattern, lambda m: self.paths[m.group(0)], text)

    def block(self, name: str) -> str:
        """Block `name` with the paths moved and the placeholders filled."""
        assert name in self.blocks, f"{self.path.name} has no block marked test={name}"
        text = self.local(self.blocks[name])
        for key in sorted(self.values, key=len, reverse=True):   # whole words: not UPTRAKIT_ENROLLMENT_TOKEN
            text = re.sub(rf"\b{key}\b", lambda m, v=self.values[key]: v, text)
        left = [p for p in self.placeholders if re.search(rf"\b{p}\b", text)]
        assert not left, f"{self.path.name} test={name}: placeholders left {left}"
        return text

    def environ(self) -> dict[str, str]:
        e = env()
        e["PATH"] = os.pathsep.join([str(self.bin), str(Path(sys.executable).parent), e.get("PATH", "")])
        return e

    def run(self, name: str, cwd: Path | None = None, ok: bool = True) -> Any:
        """Run shell block `name` with sh -e; fires with (exit code, stdout text); asserts success if `ok`."""
        return self.run_command(self.block(name), cwd, ok, f"test={name}")

    @inlineCallbacks
    def run_command(self, script: str, cwd: Path | None = None, ok: bool = True, what: str = "") -> Any:
        """Run `script` with sh -e in the blocks' environment; fires with (exit code, stdout text)."""
        out, err, code = yield run("/bin/sh", "-ec", script, env=self.environ(), cwd=str(cwd or self.workdir))
        text = out.decode(errors="replace")
        if ok:
            assert code == 0, f"{self.path.name} {what or script} failed ({code}):\n{text}\n{err.decode(errors='replace')}"
        return code, text

    def spawn(self, name: str, cwd: Path) -> Any:
        """Start shell block `name` (a long-running command) in the background; a WatchedProcess."""
        return spawn(["/bin/sh", "-ec", "exec env " + self.block(name).strip()], env=self.environ(), cwd=str(cwd))


@inlineCallbacks
def follow_to_a_connected_agent(testcase: Any, guide: Guide, pki_dir: str, start_proxy: Any) -> Any:
    """The steps every proxy guide shares: controller from its TOML, fetch, server certificate, the
    proxy (`start_proxy()`), an enrollment token, the agent from its command line, the check.

    Fires with (controller, agent host directory, agent process, service id).
    """
    import json
    import shutil

    from ..helpers import start_controller, wait_until
    toml = guide.workdir / "uptrakit.toml"
    toml.write_text(guide.block("controller"))
    c = yield start_controller(testcase, str(guide.workdir), config=str(toml),
                               data_dir=guide.paths["/var/lib/uptrakitd"],
                               https_listen=f"tcp:{guide.values['CONTROLLER_PORT']}:interface=127.0.0.1")
    yield guide.run("fetch")
    if "server-cert" in guide.blocks:   # (NPM makes its certificate in its UI: start_proxy does it)
        yield guide.run("server-cert")
    yield start_proxy()
    code, out = yield guide.run("token")
    guide.values["ENROLLMENT_TOKEN"] = json.loads(out)["token"]
    host = guide.workdir / "agent-host"
    host.mkdir()
    shutil.copy(Path(guide.local(pki_dir)) / "ca.crt", host / "ca.crt")
    shutil.copy(Path(guide.local(pki_dir)) / "server.crt", host / "proxy-server.crt")
    agent = guide.spawn("agent", host)
    testcase.addCleanup(_stop, agent)
    try:
        yield wait_until(lambda: len(c.channel.connected) == 1, timeout=60)
    except AssertionError:
        raise AssertionError(f"the agent started from {guide.path.name} did not connect:\n"
                             + agent.output.decode(errors="replace")[-3000:]) from None
    (service_id,) = list(c.channel.connected)
    code, out = yield guide.run("check", host)
    answer = json.loads(out)
    testcase.assertEqual((answer["identity_source"], answer["identity"]["service_id"], answer["proxy_ip"]),
                         ("proxy-cert", service_id, "127.0.0.1"))
    return c, host, agent, service_id


def guide_values(address_key: str, **known: Any) -> dict[str, Any]:
    """Placeholder values every guide has: this machine's names, free ports, the proxy's address key."""
    from ..helpers import free_port
    values: dict[str, Any] = {"CONTROLLER_HOST": "127.0.0.1", "CONTROLLER_NAME": "localhost",
                              "CONTROLLER_PORT": free_port(), "PKI_PORT": free_port(), address_key: "127.0.0.1",
                              "PROXY_HOST": "localhost", "PROXY_PORT": free_port(), "ENROLLMENT_TOKEN": "(step 6)"}
    values.update(known)
    return values


@inlineCallbacks
def rotate_then_refresh(testcase: Any, guide: Guide, c: Any, agent: Any, service_id: str, host: Path,
                        after_refresh: Any = None) -> Any:
    """A rotation before the proxy has the new ca.crt: the agent names the fix; the guide's refresh script
    applies it; the agent is back on generation 2 and the guide's check shows it."""
    import json

    from ..helpers import request_json, wait_until
    status, body = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
    testcase.assertEqual(status, 200, body)
    yield agent.wait_for(b"re-download ca.crt on the proxy", timeout=60)
    yield guide.run("refresh")
    if after_refresh is not None:
        yield after_refresh()
    yield wait_until(lambda: generation_of(c, service_id) == 2, timeout=60)
    code, out = yield guide.run("check", host)
    testcase.assertEqual(json.loads(out)["identity"]["ca_generation"], 2)


@inlineCallbacks
def revoke_current(c: Any, service_id: str) -> Any:
    """Revoke the certificate the service is connected with (keyCompromise)."""
    from uptrakitd.pki.serials import format_serial

    from ..helpers import request_json
    serial = format_serial(c.channel.connected[service_id].serial)
    status, body = yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"})
    assert status == 200, body


@inlineCallbacks
def check_refused_by_the_controller(testcase: Any, guide: Guide, host: Path) -> Any:
    """For proxies without CRL/OCSP: the guide's check still gets an answer, with no identity."""
    import json
    code, out = yield guide.run("check", host)
    answer = json.loads(out)
    testcase.assertEqual((answer["identity"], answer["rejected"]), (None, "certificate revoked"))


def generation_of(c: Any, service_id: str) -> int | None:
    """The CA generation of the certificate a connected service authenticated with (None: not connected)."""
    proto = c.channel.connected.get(service_id)
    identity = proto.context.identity if proto is not None and proto.context is not None else None
    return identity.ca_generation if identity is not None and not proto.closing else None


def _stop(process: Any) -> Any:
    if not process.ended.called:
        process.transport.signalProcess("TERM")
    return process.ended


@inlineCallbacks
def verify_refresh_units(testcase: Any, guide: Guide) -> Any:
    """The guide's refresh script installed where its service unit expects it, then `systemd-analyze verify`."""
    from ..helpers import require_program
    analyze = require_program("systemd-analyze", "apt-get install systemd")
    sbin = Path(guide.paths["/usr/local/sbin"])
    sbin.mkdir(exist_ok=True)
    script = sbin / "uptrakit-pki-refresh"
    script.write_text(guide.block("refresh"))
    script.chmod(0o755)
    units = guide.workdir / "units"
    units.mkdir()
    (units / "uptrakit-pki-refresh.service").write_text(guide.block("timer"))
    (units / "uptrakit-pki-refresh.timer").write_text(guide.block("timer-unit"))
    out, err, code = yield run(analyze, "verify", str(units / "uptrakit-pki-refresh.timer"),
                               str(units / "uptrakit-pki-refresh.service"))
    testcase.assertEqual((code, err.decode().strip()), (0, ""), out)


# -- nginx: the package's layout ------------------------------------------------------------------

NGINX_PACKAGE_CONF = Path("/etc/nginx/nginx.conf")


def nginx_package_layout(prefix: Path) -> Path:
    """A copy of the package's nginx.conf whose own paths point into `prefix` (conf.d/ is where the snippet goes).

    Changed: the pid file, log and include directories, and the `user` line (the test's files are
    not readable by www-data). sites-enabled/ is empty: the package's default site would take port 80.
    """
    assert NGINX_PACKAGE_CONF.exists(), f"{NGINX_PACKAGE_CONF} missing: apt-get install nginx-light"
    text = NGINX_PACKAGE_CONF.read_text()
    for path, new in (("/run/nginx.pid", prefix / "nginx.pid"), ("/var/log/nginx", prefix / "log"),
                      ("/etc/nginx/conf.d", prefix / "conf.d"), ("/etc/nginx/sites-enabled", prefix / "sites-enabled")):
        assert path in text, f"the package's nginx.conf no longer mentions {path}"
        text = text.replace(path, str(new))
    text = "\n".join(line for line in text.splitlines() if not line.strip().startswith("user "))
    for sub in ("conf.d", "sites-enabled", "log"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(text + "\n")
    return conf


def nginx_snippet(guide: Guide, crl: bool) -> str:
    """The guide's conf.d snippet; with `crl`, the edit its comment describes (ssl_crl instead of ssl_ocsp)."""
    snippet = guide.block("snippet")
    if crl:
        snippet = snippet.replace("    ssl_ocsp leaf;", "    # ssl_ocsp leaf;").replace(
            "    ssl_ocsp_responder", "    # ssl_ocsp_responder").replace("    # ssl_crl ", "    ssl_crl ")
        assert "\n    ssl_crl " in snippet and "\n    ssl_ocsp" not in snippet, snippet
    return snippet


# -- HAProxy: the package's layout ---------------------------------------------------------------

HAPROXY_PACKAGE_CONF = Path("/etc/haproxy/haproxy.cfg")


def haproxy_package_layout(work: Path, runtime_dir: Path, snippet: str) -> Path:
    """The package's haproxy.cfg with the runtime socket moved to `runtime_dir`, the guide's snippet appended."""
    assert HAPROXY_PACKAGE_CONF.exists(), f"{HAPROXY_PACKAGE_CONF} missing: apt-get install haproxy"
    text = HAPROXY_PACKAGE_CONF.read_text()
    assert "/run/haproxy/admin.sock" in text, "the package's haproxy.cfg no longer has the admin socket"
    text = text.replace("/run/haproxy/admin.sock", str(runtime_dir / "admin.sock"))
    conf = work / "haproxy.cfg"
    conf.write_text(text.rstrip("\n") + "\n\n" + snippet)
    return conf


# -- Caddy: a main Caddyfile importing the guide's site block ----------------------------------------

def caddy_main_config(caddy: str, work: Path, etc_caddy: Path) -> tuple[Path, list[str], dict[str, str], str]:
    """(main Caddyfile, argv, environment, the `systemctl` shim body for `reload caddy`).

    Global options are the test's own: the admin API on a free port (what `caddy reload` talks to),
    no persisted config, no HTTP->HTTPS redirect server on port 80.
    """
    from ..helpers import free_port
    etc_caddy.mkdir(parents=True, exist_ok=True)
    admin = f"localhost:{free_port()}"
    main = etc_caddy / "Caddyfile"
    main.write_text("{\n\tadmin " + admin + "\n\tpersist_config off\n\tauto_https disable_redirects\n}\n\n"
                    f"import {etc_caddy / 'uptrakit.caddy'}\n")
    environ = dict(os.environ, XDG_DATA_HOME=str(work / "caddy-data"), XDG_CONFIG_HOME=str(work / "caddy-config"),
                   HOME=str(work))
    argv = [caddy, "run", "--config", str(main), "--adapter", "caddyfile"]
    reload = (f'[ "$*" = "reload caddy" ] || {{ echo "unexpected: systemctl $*" >&2; exit 1; }}\n'
              f'export XDG_DATA_HOME={work / "caddy-data"} XDG_CONFIG_HOME={work / "caddy-config"} HOME={work}\n'
              f'exec {caddy} reload --config {main} --adapter caddyfile --address {admin} --force')
    return main, argv, environ, reload
