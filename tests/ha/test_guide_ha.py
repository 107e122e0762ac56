"""docs/deployment/high-availability.md's walk followed as written: a Debian-style PostgreSQL with a password,
two controllers from the guide's TOML, HAProxy from the filled haproxy-ha.cfg, an agent that survives the
loss of the controller holding it.

The blocks run as an unprivileged user with sudo (tests/e2e/guides.py); the guide's "How this guide is
tested" paragraph lists everything the test changes.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tomllib
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ..e2e.guides import WALK_USER, Guide, guide_values, stop_process, system_venv
from ..e2e.harness import RunningProxy
from ..helpers import ROOT, free_port, require_program, start_controller, wait_until
from .postgres import PostgresCluster

HAPROXY_PACKAGE_CONF = Path("/etc/haproxy/haproxy.cfg")
_APT = 'case "$*" in "install -y postgresql"|"install -y haproxy") exec dpkg -s "$3" >/dev/null;; esac\n' \
       'echo "unexpected: apt-get $*" >&2; exit 1'


class HighAvailabilityGuideTests(TestCase):
    timeout = 240

    @inlineCallbacks
    def test_the_walk_as_written_survives_a_controller_stop(self) -> Any:
        haproxy = require_program("haproxy", "apt-get install haproxy")
        require_program("curl", "apt-get install curl")
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        pg = PostgresCluster(debian_port=free_port())
        self.addCleanup(pg.destroy)
        etc_haproxy = work / "etc-haproxy"
        etc_haproxy.mkdir()
        shutil.copy(HAPROXY_PACKAGE_CONF, etc_haproxy / "haproxy.cfg")   # what the package installs
        paths = {"/etc/postgresql/15/main": pg.data, "/etc/uptrakitd": work / "etc-uptrakitd",
                 "/etc/haproxy": etc_haproxy, "/var/lib/uptrakitd": work / "controller-a",
                 "/var/lib/uptrakit-agent": work / "agent-state", "/usr/local/sbin": work / "sbin",
                 "/opt/uptrakitd/venv/bin": system_venv(work / "venv") / "bin"}
        restart = " ".join(f"'{a}'" for a in pg.pg_ctl("restart"))
        systemctl = ('case "$*" in\n'
                     f'  "restart postgresql") exec setpriv --reuid={pg.user} --regid={pg.user} --init-groups {restart};;\n'
                     '  "restart haproxy") exit 0;;   # the test starts HAProxy from the file\n'
                     'esac\necho "unexpected: systemctl $*" >&2; exit 1')
        values = {k: v for k, v in guide_values("LB_ADDR").items() if k in ("ENROLLMENT_TOKEN",)}
        values.update(DB_HOST="127.0.0.20", DB_PORT=pg.debian_port, A_ADDR="127.0.0.11", B_ADDR="127.0.0.12",
                      THIS_HOST="127.0.0.11", CONTROLLER_PORT=free_port(), PKI_PORT=free_port(), LB_ADDR="127.0.0.1",
                      LB_HOST="uptrakit-lb.test", LB_PORT=free_port(), LB_PKI_PORT=free_port())
        guide = Guide("high-availability", values, paths,
                      {"systemctl": systemctl, "apt-get": _APT, "chown": "exit 0"}, work,
                      as_user=WALK_USER, hosts={"uptrakit-lb.test": "127.0.0.1"})
        guide.environ = _with_pg(guide.environ, pg)   # `sudo -u postgres psql` finds the cluster's socket

        # 1-2. the database, its role and password, the controllers let in over TCP with scram-sha-256
        yield guide.run("db")
        yield guide.run("db-network")
        socket.create_connection(("127.0.0.20", pg.debian_port), timeout=5).close()   # listen_addresses took
        # 3. the shared secrets
        yield guide.run("secrets")
        etc = paths["/etc/uptrakitd"]
        self.assertEqual([oct(os.stat(etc / f).st_mode & 0o777) for f in ("kek", "pgpass")], ["0o600", "0o600"])
        self.assertFalse((guide.home / "uptrakitd.pgpass").exists())
        # 4. the controllers: A first, then B, each from the guide's TOML with its own address
        controllers = []
        for name, address in (("a", values["A_ADDR"]), ("b", values["B_ADDR"])):
            guide.values["THIS_HOST"] = address
            toml = work / f"uptrakit-{name}.toml"
            toml.write_text(guide.block("controller"))
            listen = tomllib.loads(toml.read_text())["https_listen"]
            c = yield start_controller(self, str(work / f"run-{name}"), config=str(toml), https_listen=listen,
                                       data_dir=str(work / f"controller-{name}"))
            controllers.append(c)
        a, b = controllers
        self.assertIsNotNone(a.cluster.controller_id)
        # 5. HAProxy from the filled haproxy-ha.cfg (the checkout as uptrakitd/ where the user stands)
        (guide.home / "uptrakitd").symlink_to(ROOT)
        yield guide.run("lb-config")
        conf = (etc_haproxy / "haproxy.cfg").read_text()
        self.assertNotIn("@@", conf)
        self.assertNotIn("controller-c", conf)
        lb = yield RunningProxy(self, "haproxy", [haproxy, "-W", "-db", "-f", str(etc_haproxy / "haproxy.cfg")],
                           values["LB_PORT"]).start()
        # 6. an agent through HAProxy
        code, out = yield guide.run("token")
        guide.values["ENROLLMENT_TOKEN"] = json.loads(out)["token"]
        host = work / "agent-host"
        host.mkdir()
        shutil.copy(guide.home / "uptrakit-ca.crt", host / "ca.crt")
        guide.give(host, host / "ca.crt")
        yield guide.run("agent-dirs", host)
        agent = guide.spawn("agent", host)
        self.addCleanup(stop_process, agent)
        try:
            yield wait_until(lambda: len(a.channel.connected) + len(b.channel.connected) == 1, timeout=60)
        except AssertionError:
            raise AssertionError("the agent did not connect:\n" + agent.output.decode(errors="replace")[-3000:]) from None
        # 7. the checks
        code, out = yield guide.run("check", host, ok=False)
        self.assertEqual(code, 0, out + lb.output.output.decode())
        answer = json.loads(out)
        service_id = answer["identity"]["service_id"]
        self.assertEqual(answer["identity_source"], "mtls")
        code, out = yield guide.run("controllers")
        self.assertEqual(len(json.loads(out)["controllers"]), 2)
        code, out = yield guide.run("one-controller")
        self.assertEqual(json.loads(out)["status"], "ready", out)
        # the controller holding the agent stops: the agent lands on the other, with the same identity
        holder, other = (a, b) if service_id in a.channel.connected else (b, a)
        yield holder.stopService()
        yield wait_until(lambda: service_id in other.channel.connected, timeout=60)
        code, out = yield guide.run("check", host)
        self.assertEqual(json.loads(out)["identity"]["service_id"], service_id)


def _with_pg(environ: Any, pg: PostgresCluster) -> Any:
    def wrapped(as_root: bool = True) -> dict[str, str]:
        e = environ(as_root)
        e.update(PGHOST=str(pg.dir), PGPORT=str(pg.debian_port))
        return e
    return wrapped
