"""Listener endpoints: the accept queue is sized for a fleet that reconnects at once."""
from __future__ import annotations

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.listen.endpoint import with_backlog

from .helpers import https_port, require_program, run, start_controller


class BacklogTests(TestCase):
    def test_backlog_is_added_only_to_tcp_strings_without_one(self):
        self.assertEqual(with_backlog(r"tcp:8443:interface=\:\:", 1024), r"tcp:8443:interface=\:\::backlog=1024")
        self.assertEqual(with_backlog("haproxy:tcp:8443", 1024), "haproxy:tcp:8443:backlog=1024")
        self.assertEqual(with_backlog("tcp:0:backlog=5", 1024), "tcp:0:backlog=5")
        self.assertEqual(with_backlog("systemd:domain=INET6:index=0", 1024), "systemd:domain=INET6:index=0")

    @inlineCallbacks
    def test_the_kernel_sees_the_configured_backlog(self):
        ss = require_program("ss", "apt-get install iproute2")
        c = yield start_controller(self, listen_backlog=777)
        out, err, code = yield run(ss, "-ltnH", f"sport = :{https_port(c)}")
        self.assertEqual(code, 0, err)
        self.assertEqual(out.split()[2], b"777", out)   # Send-Q of a listening socket is its backlog
