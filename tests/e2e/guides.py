"""Run a deployment guide as written: its `test=NAME` fenced blocks, its placeholder table, its paths.

A guide marks the blocks the tests use with `test=NAME` in the fence's info string (```nginx
test=snippet). The tests fill the placeholders listed in the guide's table (every one must be given,
none may be left) and move the guide's absolute paths into a temporary directory; nothing else of a
block is changed. Shell blocks run with `sh -e` and a PATH where the proxy's own program is pointed
at the test's copy of the package layout.

A guide walked `as_user` runs its blocks as that unprivileged user (as a person with sudo rights
would), with a `sudo` that becomes root (or `-u USER`) only for the command it prefixes, and names
looked up in a private /etc/hosts (its own mount namespace): a block that reads a root-only file
without sudo, writes where its user may not, or works only because a name is `localhost` fails.
Without `as_user`, `sudo` simply runs the command. Everything a test substitutes (placeholders,
paths, programs) must be named in the guide's "How this guide is tested" paragraph.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks

from ..helpers import env, missing, run, spawn

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
                 workdir: Path, as_user: str | None = None, hosts: dict[str, str] | None = None) -> None:
        self.path = DOCS / f"{name}.md"
        text = self.path.read_text()
        self.blocks = {m.group(2): m.group(3) for m in _FENCE.finditer(text)}
        self.placeholders = set(_ROW.findall(text))
        unfilled = self.placeholders - set(values)
        assert not unfilled, f"{self.path.name}: the test gives no value for {sorted(unfilled)}"
        unknown = set(values) - self.placeholders
        assert not unknown, f"{self.path.name}: {sorted(unknown)} not in the guide's placeholder table"
        self.values = {k: str(v) for k, v in values.items()}
        self.paths = {k: str(v) for k, v in paths.items()}
        _check_substitutions_named(self.path, text, paths, shims)
        self.workdir = workdir
        self.bin = workdir / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        if as_user and os.geteuid() != 0:
            missing(f"walking {self.path.name} as the user {as_user} (setpriv, unshare) needs root")
        self.user = pwd.getpwnam(as_user) if as_user else None
        self.home = workdir / "home"   # where the user stands: their own directory
        self.home.mkdir(exist_ok=True)
        self.hosts: Path | None = None
        if hosts:
            self.hosts = workdir / "hosts"
            self.hosts.write_text("127.0.0.1 localhost\n::1 localhost\n"
                                  + "".join(f"{addr} {host}\n" for host, addr in hosts.items()))
        sudo = 'exec "$@"'
        if self.user is not None:
            self.give(self.home)
            _let_pass(workdir, self.user.pw_name)
            # the user holds CAP_SETUID/SETGID only to let this `sudo` switch; after the switch the command
            # runs with exactly what root (or USER) has
            sudo = ('if [ "$1" = -u ]; then u=$2; shift 2\n'
                    '  exec setpriv --reuid="$u" --regid="$(id -g "$u")" --init-groups --inh-caps=-all '
                    'env HOME="$(getent passwd "$u" | cut -d: -f6)" "$@"\nfi\n'
                    'exec setpriv --reuid=0 --regid=0 --init-groups env HOME=/root "$@"')
        for name, body in dict(shims, sudo=sudo).items():
            self.shim(name, body)

    def give(self, *paths: Path) -> None:
        """Hand files or directories (not their contents) to the guide's user, as `scp` would have made them."""
        if self.user is not None:
            for path in paths:
                os.chown(path, self.user.pw_uid, self.user.pw_gid)

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

    def environ(self, as_root: bool = True) -> dict[str, str]:
        e = env()
        e["PATH"] = os.pathsep.join([str(self.bin), str(Path(sys.executable).parent), e.get("PATH", "")])
        if self.user is not None and not as_root:
            e.update(HOME=str(self.home), USER=self.user.pw_name, LOGNAME=self.user.pw_name)
        return e

    def argv(self, script: str, as_root: bool, sudo: bool = True) -> list[str]:
        """How `script` is started: as the guide's user (allowed to `sudo` if `sudo`), in the private hosts view."""
        argv = ["/bin/sh", "-ec", script]
        if self.user is not None and not as_root:
            caps = ["--inh-caps=+setuid,+setgid", "--ambient-caps=+setuid,+setgid"] if sudo else ["--inh-caps=-all"]
            argv = [_program("setpriv"), f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}",
                    "--clear-groups", *caps, *argv]
        if self.hosts is not None:
            argv = [_program("unshare"), "--mount", "--", "/bin/sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
                    str(self.hosts), *argv]
        return argv

    def run(self, name: str, cwd: Path | None = None, ok: bool = True, as_root: bool = False) -> Any:
        """Run shell block `name` with sh -e (as the guide's user unless `as_root`); fires with (exit code,
        stdout text); asserts success if `ok`."""
        return self.run_command(self.block(name), cwd, ok, f"test={name}", as_root)

    @inlineCallbacks
    def run_command(self, script: str, cwd: Path | None = None, ok: bool = True, what: str = "",
                    as_root: bool = False) -> Any:
        """Run `script` with sh -e in the blocks' environment; fires with (exit code, stdout text)."""
        argv = self.argv(script, as_root)
        where = cwd or (self.workdir if self.user is None or as_root else self.home)
        out, err, code = yield run(*argv, env=self.environ(as_root), cwd=str(where))
        text = out.decode(errors="replace")
        if ok:
            assert code == 0, f"{self.path.name} {what or script} failed ({code}):\n{text}\n{err.decode(errors='replace')}"
        return code, text

    def spawn(self, name: str, cwd: Path) -> Any:
        """Start shell block `name` (a long-running command, run as the guide's user without sudo) in the
        background; a WatchedProcess."""
        argv = self.argv("exec env " + self.block(name).strip(), as_root=False, sudo=False)
        return spawn(argv, env=self.environ(as_root=False), cwd=str(cwd))


def _let_pass(workdir: Path, user: str) -> None:
    """Let `user` pass through the directories above `workdir`: trial's own (its mkdtemp makes them 0700) are
    opened for passing (not listing); above _trial_temp nothing is changed, and a closed one is an error."""
    ours = True
    for parent in (workdir, *workdir.parents):
        mode = parent.stat().st_mode
        if ours and not mode & 0o001:
            parent.chmod(mode | 0o011)
        elif not mode & 0o001:
            raise AssertionError(f"{parent} (mode {oct(mode & 0o777)}) keeps the user {user} out of this checkout, "
                                 "so the guides cannot be walked as a user: run the tests from a checkout others "
                                 "may reach (.ci/run copies itself to one)")
        if parent.name.startswith("_trial_temp"):
            ours = False


def _program(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} missing: apt-get install util-linux"
    return found


_TESTED = re.compile(r"^\*\*How this guide is tested\.\*\*(.*?)(?:\n\n|\Z)", re.S | re.M)


def _check_substitutions_named(guide: Path, text: str, paths: dict[str, Path], shims: dict[str, str]) -> None:
    """Every path the test moves and every program it replaces is named in the guide's "How this guide is
    tested" paragraph: nothing else is changed."""
    found = _TESTED.search(text)
    assert found, f"{guide.name} has no 'How this guide is tested' paragraph"
    said = found.group(1)
    named = re.findall(r"`(/[\w./-]+)`", said)
    unsaid = {p for p in paths if not any(p == n or p.startswith(n + "/") for n in named)}
    assert not unsaid, f"{guide.name}: the test moves {sorted(unsaid)} without saying so"
    for program in shims:
        assert f"`{program}" in said, f"{guide.name}: the test replaces `{program}` without saying so"


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
    # the guide's https_listen binds every address: the test's binds CONTROLLER_HOST only
    c = yield start_controller(testcase, str(guide.workdir), config=str(toml),
                               data_dir=guide.paths["/var/lib/uptrakitd"],
                               https_listen=f"tcp:{guide.values['CONTROLLER_PORT']}:interface={guide.values['CONTROLLER_HOST']}")
    yield guide.run("fetch")
    if "server-cert" in guide.blocks:   # (NPM makes its certificate in its UI: start_proxy does it)
        yield guide.run("server-cert")
    yield start_proxy()
    code, out = yield guide.run("token")
    guide.values["ENROLLMENT_TOKEN"] = json.loads(out)["token"]
    host = guide.workdir / "agent-host"   # the agent user's directory on the agent host
    host.mkdir()
    # what the guide's scp lines do: the proxy's copy of ca.crt and its server certificate, owned by the user
    shutil.copy(Path(guide.local(pki_dir)) / "ca.crt", host / "ca.crt")
    shutil.copy(Path(guide.local(pki_dir)) / "server.crt", host / "proxy-server.crt")
    guide.give(host, host / "ca.crt", host / "proxy-server.crt")
    yield guide.run("agent-dirs", host)
    agent = guide.spawn("agent", host)
    testcase.addCleanup(stop_process, agent)
    try:
        yield wait_until(lambda: len(c.channel.connected) == 1, timeout=60)
    except AssertionError:
        raise AssertionError(f"the agent started from {guide.path.name} did not connect:\n"
                             + agent.output.decode(errors="replace")[-3000:]) from None
    (service_id,) = list(c.channel.connected)
    if guide.user is not None:   # the agent ran as the guide's user: its key is that user's, unreadable by others
        identity = (Path(guide.paths["/var/lib/uptrakit-agent"]) / "identity.pem").stat()
        testcase.assertEqual((identity.st_uid, identity.st_mode & 0o077), (guide.user.pw_uid, 0))
    code, out = yield guide.run("check", host)
    answer = json.loads(out)
    testcase.assertEqual((answer["identity_source"], answer["identity"]["service_id"], answer["proxy_ip"]),
                         ("proxy-cert", service_id, "127.0.0.1"))
    return c, host, agent, service_id


# A guide walked as a person would: an unprivileged user with sudo, the controller on an address that is not
# 127.0.0.1 (so not in its server certificate unless the guide puts it there), names that are not localhost
WALK_USER = "nobody"
WALK_NAMES = {"CONTROLLER_HOST": "127.0.0.10", "CONTROLLER_NAME": "controller.uptrakit.test",
              "PROXY_HOST": "edge.uptrakit.test"}
WALK_HOSTS = {"controller.uptrakit.test": "127.0.0.10", "edge.uptrakit.test": "127.0.0.1"}


def walk(name: str, address_key: str, paths: dict[str, Path], shims: dict[str, str], work: Path,
         **known: Any) -> Guide:
    """Guide `name` filled for a walk as its reader: WALK_USER, WALK_NAMES resolved by a private /etc/hosts,
    `/opt/uptrakitd/venv` a venv of the system's python3 as install.md makes it."""
    values = guide_values(address_key, **WALK_NAMES)
    values.update(known)
    paths = dict(paths, **{"/opt/uptrakitd/venv/bin": system_venv(work / "venv") / "bin"})
    return Guide(name, values, paths, shims, work, as_user=WALK_USER, hosts=WALK_HOSTS)


SYSTEM_PYTHON = Path("/usr/bin/python3")


def system_venv(where: Path) -> Path:
    """A venv of the distribution's python3 (as install.md makes one) seeing this venv's packages.

    The test's own interpreter may live where an unprivileged user cannot reach it (pyenv under /root);
    the system's python3 of the same minor version runs the same installed wheels.
    """
    import subprocess
    import sysconfig
    version = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == str(sys.version_info[:2]), f"{SYSTEM_PYTHON} is {version}, the tests run {sys.version_info[:2]}"
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(where)], check=True)
    site = where / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    (site / "uptrakit-tests.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for script in ("twistd", "uptrakitctl"):
        body = (Path(sys.executable).parent / script).read_text().split("\n", 1)[1]
        (where / "bin" / script).write_text(f"#!{where / 'bin' / 'python3'}\n{body}")
        (where / "bin" / script).chmod(0o755)
    return where


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
    yield guide.run("refresh", as_root=True)   # as its timer's service runs it
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
def revoke_as_written(guide: Guide, c: Any, service_id: str, host: Path) -> Any:
    """The guide's step 9: the serial as openssl prints it on the agent host, revoked by the guide's block."""
    code, out = yield guide.run_command(guide.local("openssl x509 -in /var/lib/uptrakit-agent/identity.pem -noout -serial"),
                                        host)
    guide.values["SERIAL"] = out.strip().removeprefix("serial=")
    assert int(guide.values["SERIAL"], 16) == c.channel.connected[service_id].serial, out
    yield guide.run("revoke")


@inlineCallbacks
def let_back_in(testcase: Any, guide: Guide, c: Any, agent: Any, revoked_service: str, host: Path) -> Any:
    """After a revocation the agent stops for good; the guide's `forget` block and step 6's command bring
    the host back as a new service, which the guide's check shows. Fires with the new agent process."""
    import json

    from ..helpers import wait_until
    yield agent.wait_for(b"revoked", timeout=30)
    yield stop_process(agent)   # Ctrl+C, or systemctl stop
    yield guide.run("forget", host)
    again = guide.spawn("agent", host)
    testcase.addCleanup(stop_process, again)
    yield wait_until(lambda: set(c.channel.connected) - {revoked_service}, timeout=60)
    code, out = yield guide.run("check", host)
    testcase.assertNotEqual(json.loads(out)["identity"]["service_id"], revoked_service)
    return again


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


def stop_process(process: Any) -> Any:
    """TERM a spawned process (if it still runs); fires when it has ended."""
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
