"""docs/deployment/nginx.md followed as written, with Debian's nginx in its package layout.

The controller starts from the guide's TOML, nginx from the package's own /etc/nginx/nginx.conf with
the guide's snippet in conf.d/, the agent from the guide's command line; the check, the token and
the refresh script are the guide's shell blocks. Only placeholders and absolute paths are changed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from uptrakitd.pki.serials import format_serial

from ..helpers import new_leaf, request_json, require_program, wait_until
from .guides import (follow_to_a_connected_agent, let_back_in, nginx_package_layout, nginx_snippet,
                     revoke_as_written, rotate_then_refresh, standard_paths, verify_refresh_units, walk)
from .harness import RunningProxy


class NginxGuideTests(TestCase):
    timeout = 180

    @inlineCallbacks
    def follow_guide(self, crl: bool) -> Any:
        """Steps 1–7 of the guide; fires with (guide, controller, agent host dir, agent process, service id)."""
        nginx = require_program("nginx", "apt-get install nginx-light")
        require_program("curl", "apt-get install curl")
        require_program("openssl", "apt-get install openssl")
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        prefix = work / "nginx"
        conf = nginx_package_layout(prefix)
        paths = dict(standard_paths(work), **{"/etc/nginx/uptrakit": work / "etc-nginx-uptrakit"})
        guide = walk("nginx", "NGINX_ADDR", paths, {"nginx": f'exec {nginx} -c {conf} "$@"'}, work, SERIAL="(step 9)")
        values = guide.values

        @inlineCallbacks
        def start_nginx() -> Any:
            (prefix / "conf.d" / "uptrakit.conf").write_text(nginx_snippet(guide, crl))
            yield RunningProxy(self, "nginx", [str(guide.bin / "nginx"), "-g", "daemon off;"],
                               values["PROXY_PORT"]).start()
        c, host, agent, service_id = yield follow_to_a_connected_agent(self, guide, "/etc/nginx/uptrakit", start_nginx)
        return guide, c, host, agent, service_id

    @inlineCallbacks
    def test_ocsp_setup_rotation_and_revocation_as_written(self):
        guide, c, host, agent, service_id = yield self.follow_guide(crl=False)
        # 8. a rotation before the proxy has the new ca.crt: the agent says what to do, the refresh does it
        yield rotate_then_refresh(self, guide, c, agent, service_id, host)
        # 9. revocation: nginx asks OCSP at the handshake, so the check fails at once
        yield revoke_as_written(guide, c, service_id, host)
        code, out = yield guide.run("check", host, ok=False)
        self.assertEqual(code, 22, "curl -f: nginx answers 400 for the revoked certificate")
        # the agent stops for good; forgetting its identity and step 6's command let the host back
        yield let_back_in(self, guide, c, agent, service_id, host)

    @inlineCallbacks
    def test_crl_variant_and_the_timer_units(self):
        guide, c, host, agent, service_id = yield self.follow_guide(crl=True)
        yield revoke_as_written(guide, c, service_id, host)
        yield wait_until(lambda: c.crls.current[1].entries >= 1, timeout=5)
        code, out = yield guide.run("check", host, ok=False)
        self.assertEqual(code, 0, "before the refresh nginx still has the old CRL (the controller says no identity)")
        self.assertIsNone(json.loads(out)["identity"])
        yield guide.run("refresh", as_root=True)   # what the timer runs
        for _ in range(50):   # `nginx -s reload` returns before the new workers run
            code, out = yield guide.run("check", host, ok=False)
            if code == 22:
                break
            yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(code, 22, "curl -f: nginx refuses the certificate listed in the refreshed CRL")
        # a refresh whose result nginx -t refuses leaves nginx's copies as they were, and nothing else behind
        copies = Path(guide.paths["/etc/nginx/uptrakit"])
        before = {f.name: f.read_bytes() for f in copies.iterdir()}
        leaf, _, _ = yield new_leaf(c)
        yield request_json(c, "POST", f"/api/v1/certificates/{format_serial(leaf.serial)}/revoke", {})
        yield wait_until(lambda: c.crls.current[1].entries >= 2, timeout=5)   # the CRL to download is a new one
        broken = Path(guide.paths["/etc/nginx/uptrakit"]).parent / "nginx" / "conf.d" / "broken.conf"
        broken.write_text("this is not nginx;\n")
        code, out = yield guide.run("refresh", as_root=True, ok=False)
        broken.unlink()
        self.assertEqual(code, 1, out)
        self.assertEqual({f.name: f.read_bytes() for f in copies.iterdir()}, before)
        # the guide's timer and service units are valid systemd units (with the script where they expect it)
        yield verify_refresh_units(self, guide)
