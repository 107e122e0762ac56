"""The systemd unit as systemd judges it, and the notify protocol as a Type=notify unit sees it."""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from .helpers import ROOT, env, free_port, require_program, run, spawn, wait_until

UNIT = ROOT / "etc" / "systemd" / "uptrakitd.service"


class UnitTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_security_exposure_is_at_most_1_5(self):
        analyze = require_program("systemd-analyze", "apt-get install systemd")
        out, err, code = yield run(analyze, "security", "--offline=yes", "--threshold=15", str(UNIT))
        self.assertEqual(code, 0, (out + err)[-2000:])
        level = float(out.decode().rsplit("Overall exposure level for uptrakitd.service:", 1)[1].split()[0])
        self.assertLessEqual(level, 1.5)

    @inlineCallbacks
    def test_verify_accepts_the_unit(self):
        analyze = require_program("systemd-analyze", "apt-get install systemd")
        venv = str(Path(sys.executable).parent.parent)
        unit = Path(self.mktemp()) / "uptrakitd.service"
        unit.parent.mkdir()
        unit.write_text(UNIT.read_text().replace("/opt/uptrakitd/venv", venv))
        out, err, code = yield run(analyze, "verify", str(unit))
        self.assertEqual((code, err.decode().strip()), (0, ""), out)


class Collector(DatagramProtocol):
    def __init__(self):
        self.messages = []

    def datagramReceived(self, data, addr):
        self.messages.append(data.decode())


class NotifyTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_ready_after_listening_watchdog_while_running_stopping_on_term(self):
        cwd = Path(self.mktemp()).resolve()
        cwd.mkdir()
        collector = Collector()
        sock_dir = Path(tempfile.mkdtemp(prefix="uptrakit-"))   # AF_UNIX paths are short: not under _trial_temp
        self.addCleanup(shutil.rmtree, sock_dir, True)
        sock = str(sock_dir / "notify.sock")
        port = reactor.listenUNIXDatagram(sock, collector)
        self.addCleanup(port.stopListening)
        twistd = str(Path(sys.executable).with_name("twistd"))
        daemon = spawn([twistd, "--pidfile=", "-n", "uptrakit", "--https-listen",
                        f"tcp:{free_port()}:interface=127.0.0.1"],
                       env=dict(env(), NOTIFY_SOCKET=sock, WATCHDOG_USEC="1000000"),
                       cwd=str(cwd))
        self.addCleanup(lambda: None if daemon.ended.called else (daemon.transport.signalProcess("KILL"),
                                                                  daemon.ended)[1])
        yield wait_until(lambda: collector.messages.count("WATCHDOG=1") >= 3, timeout=20)
        self.assertIn(b"HTTPS listening on", daemon.output, "READY=1 came before the listener")
        self.assertEqual(collector.messages[0], "READY=1\nSTATUS=serving")
        daemon.transport.signalProcess("TERM")
        self.assertEqual((yield daemon.ended), 0)
        self.assertEqual(collector.messages[-1], "STOPPING=1")
