"""docs/deployment/nginx-proxy-manager.md followed as written, on nginx in NPM's generated layout.

The layout is tests/data/npm/ (NPM's proxy_host.conf template with the Advanced snippet included where
NPM includes it, and NPM's proxy.conf); `docker exec npm nginx -s reload` reloads that nginx. Only
placeholders and absolute paths are changed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ..helpers import DATA, require_program, run
from .guides import (follow_to_a_connected_agent, revoke_current, rotate_then_refresh, standard_paths, walk)
from .harness import RunningProxy, render


class NpmGuideTests(TestCase):
    timeout = 180

    @inlineCallbacks
    def test_setup_rotation_and_ocsp_revocation_as_written(self):
        nginx = require_program("nginx", "apt-get install nginx-light")
        openssl = require_program("openssl", "apt-get install openssl")
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        prefix, data = work / "npm-nginx", work / "npm-data"
        (prefix / "conf.d" / "include").mkdir(parents=True)
        paths = dict(standard_paths(work), **{"/data": data})

        conf = prefix / "nginx.conf"
        guide = walk("nginx-proxy-manager", "NPM_ADDR", paths,
                     {"nginx": f'exec {nginx} -p {prefix} -c {conf} "$@"',
                      "docker": '[ "$1 $2" = "exec npm" ] || { echo "unexpected: docker $*" >&2; exit 1; }\n'
                                'shift 2\nexec "$@"'}, work, NPM_DATA=data)
        values = guide.values

        @inlineCallbacks
        def start_npm() -> Any:
            # step 4's SSL tab: a custom certificate for PROXY_HOST, where the test keeps NPM's certificates
            certs = data / "custom_ssl" / "uptrakit"
            out, err, code = yield run(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                                       "-nodes", "-days", "30", "-subj", f"/CN={values['PROXY_HOST']}",
                                       "-addext", f"subjectAltName=DNS:{values['PROXY_HOST']}",
                                       "-keyout", str(certs / "server.key"), "-out", str(certs / "server.crt"))
            self.assertEqual(code, 0, err)
            advanced = prefix / "advanced.conf"
            advanced.write_text(guide.block("snippet"))
            (prefix / "conf.d" / "include" / "proxy.conf").write_text((DATA / "npm" / "proxy.conf").read_text())
            conf.write_text(render(DATA / "npm" / "nginx.conf", {
                "PREFIX": prefix, "UPSTREAM_HOST": values["CONTROLLER_HOST"], "UPSTREAM_PORT": values["CONTROLLER_PORT"],
                "LISTEN_ADDR": "0.0.0.0", "LISTEN_PORT": values["PROXY_PORT"], "SERVER_CERT": certs / "server.crt",
                "SERVER_KEY": certs / "server.key", "ADVANCED": advanced}))
            yield RunningProxy(self, "nginx (NPM layout)", [str(guide.bin / "nginx")], values["PROXY_PORT"]).start()
        c, host, agent, service_id = yield follow_to_a_connected_agent(self, guide, "/data/custom_ssl/uptrakit",
                                                                       start_npm)
        yield rotate_then_refresh(self, guide, c, agent, service_id, host)   # refresh: docker exec npm nginx -s reload
        yield revoke_current(c, service_id)
        code, out = yield guide.run("check", host, ok=False)
        self.assertEqual(code, 22, "curl -f: NPM's nginx answers 400 for the revoked certificate (OCSP)")
