"""`twistd -n uptrakit` as operators run it: --help, one-line errors, restarts, kill -9, SIGHUP, SIGTERM."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.process.tap import Options

from .channel_helpers import next_event
from .helpers import WatchedProcess, env, free_port, require_program, run, spawn

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


def workdir(testcase: TestCase) -> tuple[str, int]:
    """(a fresh directory to run twistd in, a free port for its HTTPS listener)."""
    cwd = os.path.abspath(testcase.mktemp())
    Path(cwd).mkdir()
    return cwd, free_port()


def start_daemon(testcase: TestCase, *args: str, cwd: str) -> WatchedProcess:
    proto = spawn([TWISTD, "--pidfile=", "-n", "uptrakit", *args], env=env(), cwd=cwd)

    def cleanup():
        if not proto.ended.called:
            proto.transport.signalProcess("KILL")
            return proto.ended
    testcase.addCleanup(cleanup)
    return proto


class OptionsTests(TestCase):
    def test_help_documents_every_flag(self):
        text = str(Options())
        for flag in ["--config", "--data-dir", "--https-listen", "--trusted-proxy", "--real-ip-header",
                     "--forwarded-client-cert-info-header", "--forwarded-client-cert-pem-header", "--pki-addr",
                     "--forwarded-client-cert-info-format", "--forwarded-client-verify-header",
                     "--pki-http", "--pki-listen", "--ca-cert", "--ca-key", "--san", "--trust-domain",
                     "--force-settings-override", "--log-format"]:
            self.assertIn(flag, text)

    def test_the_readme_lists_every_flag(self):
        import re
        options = Options()
        flags = {"--" + p[0] for p in options.optParameters} | {"--" + f[0] for f in options.optFlags} | {
            "--" + name[len("opt_"):].replace("_", "-") for name in dir(options) if name.startswith("opt_")}
        flags -= {"--help", "--version"}
        table = [line.split("|")[1] for line in (ROOT / "README.md").read_text().splitlines()
                 if line.startswith("| `--")]
        listed = {flag for cell in table for flag in re.findall(r"`(--[a-z0-9-]+)`", cell)}
        self.assertEqual(sorted(flags - listed), [], "flags the README's table does not list")
        self.assertEqual(sorted(listed - flags), [], "README rows for flags that do not exist")

    def test_every_network_setting_has_a_flag(self):
        from uptrakitd.config import NetworkSettings
        text = str(Options())
        for key in NetworkSettings.FIELDS:
            flag = "--trusted-proxy" if key == "trusted_proxies" else "--" + key.replace("_", "-")
            self.assertIn(flag + "=", text, f"network setting {key} (a TOML key) has no flag")

    def test_every_flag_reaches_the_settings(self):
        import ipaddress
        from uptrakitd.config import build_settings
        from uptrakitd.process.tap import flags_from_options
        tmp = Path(self.mktemp())
        tmp.mkdir()
        (tmp / "ca.pem").write_text("x")
        (tmp / "ca.key").write_text("x")
        (tmp / "c.toml").write_text('log_format = "text"\n')
        cases = [
            (["--data-dir", str(tmp / "d")], lambda s: s.data_dir, tmp / "d"),
            (["--https-listen", "tcp:9443"], lambda s: s.https_listen, "tcp:9443"),
            (["--trusted-proxy", "10.0.0.1", "--trusted-proxy", "fd00::/8"], lambda s: s.network.trusted_proxies,
             (ipaddress.ip_network("10.0.0.1/32"), ipaddress.ip_network("fd00::/8"))),
            (["--real-ip-header", "X-Real-IP"], lambda s: s.network.real_ip_header, "X-Real-IP"),
            (["--forwarded-client-cert-info-header", "X-Info"],
             lambda s: s.network.forwarded_client_cert_info_header, "X-Info"),
            (["--forwarded-client-cert-pem-header", "X-Cert"],
             lambda s: s.network.forwarded_client_cert_pem_header, "X-Cert"),
            (["--forwarded-client-cert-info-format", "xfcc"],
             lambda s: s.network.forwarded_client_cert_info_format, "xfcc"),
            (["--forwarded-client-verify-header", "X-SSL-Client-Verify"],
             lambda s: s.network.forwarded_client_verify_header, "X-SSL-Client-Verify"),
            (["--pki-addr", "http://pki.example:8080/"], lambda s: s.network.pki_addr, "http://pki.example:8080"),
            (["--pki-addr", "http://p.example", "--pki-http", "external"], lambda s: s.pki_http, "external"),
            (["--pki-addr", "http://p.example", "--pki-http", "listener", "--pki-listen", "tcp:8081"],
             lambda s: s.pki_listen_endpoint(), "tcp:8081"),
            (["--ca-cert", str(tmp / "ca.pem"), "--ca-key", str(tmp / "ca.key")],
             lambda s: (s.ca_cert, s.ca_key), (tmp / "ca.pem", tmp / "ca.key")),
            (["--san", "a.example", "--san", "10.1.2.3"], lambda s: s.san, ("a.example", "10.1.2.3")),
            (["--trust-domain", "Corp.Example"], lambda s: s.trust_domain, "corp.example"),
            (["--ocsp-signer", "delegated"], lambda s: s.ocsp_signer, "delegated"),
            (["--ocsp-nonce-rate", "0"], lambda s: s.ocsp_nonce_rate, 0),
            (["--ocsp-signing-share", "0.25"], lambda s: s.ocsp_signing_share, 0.25),
            (["--cluster-max-staleness", "4.5"], lambda s: s.cluster_max_staleness, 4.5),
            (["--rotation-renewal-rate", "40"], lambda s: s.rotation_renewal_rate, 40),
            (["--audit-retention-days", "400"], lambda s: s.audit_retention_days, 400),
            (["--certificate-retention-days", "30"], lambda s: s.certificate_retention_days, 30),
            (["--force-settings-override"], lambda s: s.force_settings_override, True),
            (["--log-format", "json"], lambda s: s.log_format, "json"),
            (["--database", "postgresql://uptrakit@db.example/uptrakit", "--ca-key-encryption-key-file",
              str(tmp / "kek")], lambda s: (s.database, s.ca_key_encryption_key_file),
             ("postgresql://uptrakit@db.example/uptrakit", tmp / "kek")),
            (["--log-level", "warn", "--access-log", "sampled", "--metrics-require-auth"],
             lambda s: (s.log_level, s.access_log, s.metrics_require_auth), ("warn", "sampled", True)),
            (["--config", str(tmp / "c.toml")], lambda s: s.config_path, tmp / "c.toml"),
            (["--ca-key-uri", "pkcs11:token=ca%20box;object=g1", "--pkcs11-module", str(tmp / "ca.pem"),
              "--pkcs11-pin-file", str(tmp / "ca.key")],
             lambda s: (s.ca_key_uri, s.pkcs11_module, s.pkcs11_pin_file, s.ocsp_signer),
             ("pkcs11:token=ca%20box;object=g1", tmp / "ca.pem", tmp / "ca.key", "delegated")),
            (["--https-listen", "haproxy:tcp:8443", "--proxy-protocol-sender", "10.0.0.5",
              "--proxy-protocol-trust-headers"],
             lambda s: (s.proxy_protocol_senders, s.proxy_protocol_trust_headers),
             ((ipaddress.ip_network("10.0.0.5/32"),), True)),
            (["--max-connections", "100", "--max-connections-per-ip", "7", "--request-head-timeout", "2.5",
              "--listen-backlog", "4096", "--close-grace", "0.5"],
             lambda s: (s.limits.max_connections, s.limits.max_connections_per_ip, s.limits.request_head_timeout,
                        s.limits.listen_backlog, s.limits.close_grace), (100, 7, 2.5, 4096, 0.5)),
        ]
        covered = set()
        for argv, get, expected in cases:
            options = Options()
            options.parseOptions(argv)
            settings = build_settings(flags_from_options(options), options.get("config"))
            self.assertEqual(get(settings), expected, argv)
            covered |= {a for a in argv if a.startswith("--")}
        documented = {f"--{name}" for name, *_ in Options.optParameters + Options.optFlags}
        documented |= {"--trusted-proxy", "--san", "--proxy-protocol-sender"}
        self.assertEqual(covered, documented, "a flag without a round-trip case")

    def test_repeatable_flags(self):
        o = Options()
        o.parseOptions(["--trusted-proxy", "10.0.0.1", "--trusted-proxy", "::1", "--san", "a.example"])
        self.assertEqual(o["trusted_proxies"], ["10.0.0.1", "::1"])
        self.assertEqual(o["san"], ["a.example"])


class TwistdTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def assertRefusedAtStart(self, *args: str, fragment: str):
        cwd = os.path.abspath(self.mktemp())
        Path(cwd).mkdir()
        out, err, code = yield run(TWISTD, "--pidfile=", "-n", "uptrakit", *args, env=env())
        lines = [l for l in err.decode().splitlines() if l.strip()]
        self.assertNotEqual(code, 0)
        self.assertEqual(len(lines), 1, err)
        self.assertIn("uptrakitd: error:", lines[0])
        self.assertIn(fragment, lines[0])

    @inlineCallbacks
    def test_misconfigurations_are_one_line_and_nonzero(self):
        d = self.mktemp()
        yield self.assertRefusedAtStart("--data-dir", d, "--trusted-proxy", "10.0.0.0/40", fragment="10.0.0.0/40")
        yield self.assertRefusedAtStart("--data-dir", d, "--pki-addr", "ftp://x", fragment="http:// or https://")
        yield self.assertRefusedAtStart("--data-dir", d, "--pki-http", "listener", fragment="requires --pki-addr")
        yield self.assertRefusedAtStart("--data-dir", d, "--ca-cert", "/etc/hostname", fragment="together")
        yield self.assertRefusedAtStart("--data-dir", d, "--ca-cert", "/nope", "--ca-key", "/nope",
                                        fragment="cannot read")
        yield self.assertRefusedAtStart("--config", "/nonexistent.toml", fragment="cannot read")

    @inlineCallbacks
    def test_serves_restarts_with_same_ca_and_stops_cleanly_on_sigterm(self):
        cwd, port = workdir(self)
        daemon = start_daemon(self, "--https-listen", f"tcp:{port}:interface=127.0.0.1", "--log-format", "json",
                              cwd=cwd)
        yield daemon.wait_for(b"listening on")
        ca = Path(cwd) / "uptrakit-data" / "pki" / "ca.crt"
        out, err, code = yield run(require_program("curl", "apt-get install curl"), "-sS", "--cacert", str(ca), f"https://localhost:{port}/healthz")
        self.assertEqual(out, b"ok")
        # the real process runs its own full garbage collections (uptrakitd.process.gcpolicy); test processes do not
        out, err, code = yield run("curl", "-sS", "--cacert", str(ca), f"https://localhost:{port}/metrics")
        self.assertIn(b'uptrakit_gc_full_collections_total{trigger="memory"}', out)
        first_line = daemon.output.splitlines()[0]
        self.assertIsInstance(json.loads(first_line), dict)
        self.assertNotIn((Path(cwd) / "uptrakit-data" / "admin.token").read_text().strip().encode(), daemon.output)
        fingerprint = ca.read_bytes()
        daemon.transport.signalProcess("TERM")
        code = yield daemon.ended
        self.assertEqual(code, 0)
        again = start_daemon(self, "--https-listen", f"tcp:{port}:interface=127.0.0.1", cwd=cwd)
        yield again.wait_for(b"listening on")
        self.assertEqual(ca.read_bytes(), fingerprint)
        again.transport.signalProcess("TERM")
        yield again.ended

    @inlineCallbacks
    def test_a_low_open_file_limit_is_said_at_start_and_a_descriptor_flood_is_a_few_log_lines(self):
        """At a hard limit of 200 descriptors the caps (4,096 connections) cannot hold: the start says so with
        the numbers. 600 connections from 10 addresses then exhaust the descriptors: Twisted's accept errors
        reach the log at most once per 10 s, and the daemon answers again once the flood is gone."""
        import socket
        from twisted.internet.threads import deferToThread
        cwd, port = workdir(self)
        proto = spawn([require_program("prlimit", "apt-get install util-linux"), "--nofile=200:200", TWISTD,
                       "--pidfile=", "-n", "uptrakit", "--https-listen", f"tcp:{port}:interface=127.0.0.1"],
                      env=env(), cwd=cwd)
        self.addCleanup(lambda: None if proto.ended.called else (proto.transport.signalProcess("KILL"), proto.ended)[1])
        yield proto.wait_for(b"listening on")
        self.assertIn(b"the open-file limit (200, hard 200) cannot hold the 4096 connections", proto.output)
        self.assertIn(b"lower --max-connections to 72", proto.output)

        def flood():
            held = []
            for source in range(20, 30):
                for _ in range(60):
                    try:
                        held.append(socket.create_connection(("127.0.0.1", port), timeout=5,
                                                             source_address=(f"127.0.0.{source}", 0)))
                    except OSError:
                        pass
            return held
        held = yield deferToThread(flood)
        yield deferToThread(time.sleep, 1)
        for s in held:
            s.close()
        ca = Path(cwd) / "uptrakit-data" / "pki" / "ca.crt"
        for _ in range(50):
            out, _, _ = yield run("curl", "-sS", "--max-time", "2", "--cacert", str(ca), f"https://localhost:{port}/healthz")
            if out == b"ok":
                break
        self.assertEqual(out, b"ok", "the daemon answers again once the flood is gone")
        noise = [line for line in proto.output.splitlines() if b"[twisted.internet.tcp.Port#" in line]
        self.assertGreater(len(held), 180, "the flood did reach the limit")
        self.assertLessEqual(len(noise), 2, noise[:5])
        proto.transport.signalProcess("TERM")
        yield proto.ended

    @inlineCallbacks
    def test_kill_9_right_after_the_ca_is_created_never_breaks_the_next_start(self):
        # Every step of first start is covered in-process (test_boot.CrashPointTests); this is the
        # real signal once, at a point we know the process reached: the CA exists, nothing after it.
        cwd, port = workdir(self)
        daemon = start_daemon(self, "--https-listen", f"tcp:{port}:interface=127.0.0.1", cwd=cwd)
        yield daemon.wait_for(b"created managed CA generation 1")
        daemon.transport.signalProcess("KILL")
        self.assertEqual((yield daemon.ended), -9)
        daemon = start_daemon(self, "--https-listen", f"tcp:{port}:interface=127.0.0.1", cwd=cwd)
        yield daemon.wait_for(b"listening on")
        ca = Path(cwd) / "uptrakit-data" / "pki" / "ca.crt"
        out, _, _ = yield run(require_program("curl", "apt-get install curl"), "-sS", "--cacert", str(ca), f"https://localhost:{port}/healthz")
        self.assertEqual(out, b"ok")
        daemon.transport.signalProcess("TERM")
        yield daemon.ended

    @inlineCallbacks
    def test_a_first_start_whose_pki_listener_cannot_bind_creates_nothing(self):
        import socket
        cwd = os.path.abspath(self.mktemp())
        Path(cwd).mkdir()
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        taken = busy.getsockname()[1]
        https = f"tcp:{free_port()}:interface=127.0.0.1"
        out, err, code = yield run(TWISTD, "--pidfile=", "-n", "uptrakit", "--https-listen", https,
                                   "--pki-addr", f"http://127.0.0.1:{taken}", "--pki-http", "listener",
                                   env=env(), cwd=cwd)
        lines = [line for line in err.decode().splitlines() if line.strip()]
        self.assertEqual(code, 2)
        self.assertEqual(len(lines), 1, err)
        self.assertIn("cannot listen for plain-HTTP PKI", lines[0])
        self.assertIn("nothing was created or changed", lines[0])
        self.assertFalse((Path(cwd) / "uptrakit-data").exists())
        port = free_port()
        daemon = start_daemon(self, "--https-listen", https, "--pki-addr", f"http://127.0.0.1:{port}",
                              "--pki-http", "listener", cwd=cwd)
        yield daemon.wait_for(b"plain-HTTP PKI listening on")
        daemon.transport.signalProcess("TERM")
        self.assertEqual((yield daemon.ended), 0)

    @inlineCallbacks
    def test_both_listeners_busy_on_a_later_start_is_one_line_and_exit_2(self):
        import socket
        cwd = os.path.abspath(self.mktemp())
        Path(cwd).mkdir()
        https_port, pki_port = free_port(), free_port()
        args = ("--https-listen", f"tcp:{https_port}:interface=127.0.0.1", "--pki-addr",
                f"http://127.0.0.1:{pki_port}", "--pki-http", "listener")
        daemon = start_daemon(self, *args, cwd=cwd)
        yield daemon.wait_for(b"plain-HTTP PKI listening on")
        daemon.transport.signalProcess("TERM")
        yield daemon.ended
        holders = []
        for port in (https_port, pki_port):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(1)
            self.addCleanup(s.close)
            holders.append(s)
        out, err, code = yield run(TWISTD, "--pidfile=", "-n", "uptrakit", *args, env=env(), cwd=cwd)
        lines = [line for line in err.decode().splitlines() if line.strip()]
        self.assertEqual(code, 2)
        self.assertEqual(len(lines), 1, err)
        self.assertIn("uptrakitd: error: cannot listen for HTTPS", lines[0])
        self.assertNotIn(b"Traceback", out + err)
        self.assertNotIn(b"ReactorNotRunning", out + err)

    @inlineCallbacks
    def test_an_endpoint_that_cannot_be_listened_on_is_one_line_exit_2_and_creates_nothing(self):
        cwd = os.path.abspath(self.mktemp())
        Path(cwd).mkdir()
        for endpoint, why in (("tcp:99999", "port 99999 is not a TCP port (0-65535)"), ("unix:/nonexistent/dir/sock", "/nonexistent/dir does not exist"),
                              (r"tcp:0:interface=\:\:1x", "'::1x' is not an address of this host"), ("tcp:abc", "not a valid endpoint string"),
                              ("nope:1", "Unknown endpoint type")):
            for flag in ("--https-listen", "--pki-listen"):
                args = (flag, endpoint) if flag == "--https-listen" else (
                    "--https-listen", f"tcp:{free_port()}:interface=127.0.0.1", "--pki-addr", "http://127.0.0.1:9",
                    "--pki-http", "listener", flag, endpoint)
                out, err, code = yield run(TWISTD, "--pidfile=", "-n", "uptrakit", *args, env=env(), cwd=cwd)
                lines = [line for line in err.decode().splitlines() if line.strip()]
                self.assertEqual(code, 2, (endpoint, flag, err))
                self.assertEqual(len(lines), 1, err)
                self.assertIn(why, lines[0])
                self.assertTrue(lines[0].startswith("uptrakitd: error: cannot listen for "), lines[0])
                self.assertEqual(os.listdir(cwd), [], "nothing created in the working directory")

    @inlineCallbacks
    def test_every_json_log_line_is_a_record_a_pipeline_can_ingest(self):
        import re
        cwd, port = workdir(self)
        daemon = start_daemon(self, "--https-listen", f"tcp:{port}:interface=127.0.0.1", "--log-format", "json",
                              "--log-level", "debug", "--access-log", "all", cwd=cwd)
        yield daemon.wait_for(b"admin token file")
        ca = str(Path(cwd) / "uptrakit-data" / "pki" / "ca.crt")
        token = (Path(cwd) / "uptrakit-data" / "admin.token").read_text().strip()
        curl = require_program("curl", "apt-get install curl")
        base = f"https://localhost:{port}"
        for args in (["/healthz"], ["/metrics"], ["-X", "POST", "-H", f"Authorization: Bearer {token}", "-d",
                                                   '{"name": "x", "role": "read"}', "/api/v1/admin-tokens"],
                     ["-X", "POST", "-H", f"Authorization: Bearer {token}", "/api/v1/certificates/ABCD/revoke"],
                     ["-X", "POST", "-H", f"Authorization: Bearer {token}", "/api/v1/settings/rotate-ca"]):
            yield run(curl, "-sS", "--cacert", ca, *args[:-1], base + args[-1])
        yield run(curl, "-sS", "--cacert", ca, f"http://localhost:{port}/healthz")   # plain HTTP to TLS: a failure
        daemon.transport.signalProcess("HUP")
        yield daemon.wait_for(b"SIGHUP")
        daemon.transport.signalProcess("TERM")
        self.assertEqual((yield daemon.ended), 0)
        lines = b"".join(daemon.out).decode().splitlines()
        self.assertGreater(len(lines), 20)
        records = []
        for line in lines:
            record = json.loads(line)
            self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", line)
            self.assertIn(record["level"], ("debug", "info", "warn", "error", "critical"), line)
            self.assertIsInstance(record["logger"], str)
            self.assertTrue(record["message"], line)
            self.assertFalse([k for k in record if k.startswith("log_") or "__class_uuid__" in json.dumps(record[k])],
                             line)
            records.append(record)
        access = [r for r in records if r.get("route") == "/healthz"]
        self.assertEqual((access[0]["status"], access[0]["method"]), (200, "GET"))
        self.assertTrue(any(r.get("route") == "/api/v1/settings/rotate-ca" and r["status"] == 200 for r in records))
        self.assertTrue(any("rotated the CA" in r["message"] and r.get("generation") == 2 for r in records))
        self.assertNotIn(token, "\n".join(lines))
        self.assertFalse(re.search(r"upt_admin_[A-Za-z0-9_-]{20,}", "\n".join(lines)))

    @inlineCallbacks
    def test_info_level_and_default_access_log_keep_probes_out(self):
        cwd, port = workdir(self)
        daemon = start_daemon(self, "--https-listen", f"tcp:{port}:interface=127.0.0.1", "--log-format", "json",
                              cwd=cwd)
        yield daemon.wait_for(b"admin token file")
        ca = str(Path(cwd) / "uptrakit-data" / "pki" / "ca.crt")
        curl = require_program("curl", "apt-get install curl")
        for path in ("/healthz", "/metrics", "/readyz", "/api/v1/whoami"):
            yield run(curl, "-sS", "--cacert", ca, f"https://localhost:{port}{path}")
        daemon.transport.signalProcess("TERM")
        yield daemon.ended
        records = [json.loads(line) for line in b"".join(daemon.out).decode().splitlines()]
        self.assertEqual([r for r in records if r["level"] == "debug"], [])
        self.assertEqual([r for r in records if "route" in r], [], "access log is off by default")

    @inlineCallbacks
    def test_sighup_keeps_stored_settings_unless_the_file_is_authoritative(self):
        # the same rule as at start: the stored runtime setting wins unless --force-settings-override
        cwd, port = workdir(self)
        config = Path(cwd) / "uptrakit.toml"
        config.write_text('[network]\nreal_ip_header = "X-Real-IP"\n')
        daemon = start_daemon(self, "--config", str(config), "--https-listen", f"tcp:{port}:interface=127.0.0.1",
                              cwd=cwd)
        yield daemon.wait_for(b"listening on")
        config.write_text('log_level = "warn"\nhttps_listen = "tcp:1"\n[network]\nreal_ip_header = "Forwarded"\n')
        daemon.transport.signalProcess("HUP")
        yield daemon.wait_for(b"but the stored runtime setting stays ('X-Real-IP')")
        yield daemon.wait_for(b"https_listen changed in the config file, but --https-listen on the command line "
                              b"overrides it")
        yield daemon.wait_for(b"log_level changed in the config file; it takes effect after a restart")
        token = (Path(cwd) / "uptrakit-data" / "admin.token").read_text().strip()
        ca = Path(cwd) / "uptrakit-data" / "pki" / "ca.crt"
        out, _, _ = yield run(require_program("curl", "apt-get install curl"), "-sS", "--cacert", str(ca), "-H",
                              f"Authorization: Bearer {token}", f"https://localhost:{port}/api/v1/settings/network")
        self.assertEqual(json.loads(out)["real_ip_header"], "X-Real-IP")
        daemon.transport.signalProcess("TERM")
        self.assertEqual((yield daemon.ended), 0)
        # restarted: the stored value still wins over the file, and the start says so
        again = start_daemon(self, "--config", str(config), "--https-listen", f"tcp:{port}:interface=127.0.0.1",
                             cwd=cwd)
        yield again.wait_for(b"the stored one is used")
        again.transport.signalProcess("TERM")
        yield again.ended

    @inlineCallbacks
    def test_sighup_applies_valid_config_and_rejects_invalid_whole(self):
        cwd, port = workdir(self)
        config = Path(cwd) / "uptrakit.toml"
        config.write_text('[network]\nreal_ip_header = "X-Real-IP"\n')
        daemon = start_daemon(self, "--config", str(config), "--https-listen", f"tcp:{port}:interface=127.0.0.1",
                              "--force-settings-override", cwd=cwd)
        yield daemon.wait_for(b"listening on")
        config.write_text('[network]\nreal_ip_header = "Forwarded"\ntrusted_proxies = ["bogus"]\n')
        daemon.transport.signalProcess("HUP")
        yield daemon.wait_for(b"config file rejected, nothing changed")
        config.write_text('[network]\nreal_ip_header = "Forwarded"\n')
        daemon.transport.signalProcess("HUP")
        yield daemon.wait_for(b"SIGHUP: applied real_ip_header")
        token = (Path(cwd) / "uptrakit-data" / "admin.token").read_text().strip()
        ca = Path(cwd) / "uptrakit-data" / "pki" / "ca.crt"
        out, _, _ = yield run(require_program("curl", "apt-get install curl"), "-sS", "--cacert", str(ca), "-H", f"Authorization: Bearer {token}",
                              f"https://localhost:{port}/api/v1/settings/network")
        self.assertEqual(json.loads(out)["real_ip_header"], "Forwarded")
        daemon.transport.signalProcess("TERM")
        code = yield daemon.ended
        self.assertEqual(code, 0)


class DurabilityTests(TestCase):
    """Nothing acknowledged is lost on kill -9."""

    timeout = 90

    @inlineCallbacks
    def test_acknowledged_revocation_survives_kill_9(self):
        from cryptography import x509 as _x509

        from uptrakitd.agent.client import ServiceAgent
        from uptrakitd.pki.serials import format_serial
        curl = require_program("curl", "apt-get install curl")
        cwd, port = workdir(self)
        args = ("--https-listen", f"tcp:{port}:interface=127.0.0.1")
        daemon = start_daemon(self, *args, cwd=cwd)
        yield daemon.wait_for(b"listening on")
        data = Path(cwd) / "uptrakit-data"
        token = (data / "admin.token").read_text().strip()
        ca = str(data / "pki" / "ca.crt")

        def api(method, path, body=None):
            argv = [curl, "-sS", "--cacert", ca, "-X", method, "-H", f"Authorization: Bearer {token}"]
            if body is not None:
                argv += ["-d", json.dumps(body)]
            return run(*argv, f"https://localhost:{port}{path}").addCallback(lambda r: json.loads(r[0]))
        created = yield api("POST", "/api/v1/enrollment-tokens", {"name": "durability", "auto_approve": True})
        agent = ServiceAgent(reactor, f"wss://localhost:{port}", os.path.join(cwd, "agent"),
                             enrollment_token=created["token"], ca_cert=Path(ca).read_bytes(), backoff=(30, 60))
        agent.startService()
        self.addCleanup(lambda: agent.stopService() if agent.running else None)
        yield next_event(agent, "service_settings", timeout=30)
        serial = format_serial(agent.state.certificate().serial_number)
        yield agent.stopService()
        answer = yield api("POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"})
        self.assertTrue(answer["revoked"])
        daemon.transport.signalProcess("KILL")   # right after the acknowledgement
        yield daemon.ended
        again = start_daemon(self, *args, cwd=cwd)
        yield again.wait_for(b"listening on")
        listed = yield api("GET", f"/api/v1/certificates?service_id={agent.service_id}")
        mine = [c_ for c_ in listed["certificates"] if c_["serial"] == serial]
        self.assertEqual((mine[0]["status"], mine[0]["revocation_reason"]), ("revoked", "keyCompromise"))
        crl_blocks = (data / "pki" / "ca.crl").read_bytes()
        crl = _x509.load_pem_x509_crl(crl_blocks)
        self.assertIsNotNone(crl.get_revoked_certificate_by_serial_number(int(serial, 16)))
        again.transport.signalProcess("TERM")
        yield again.ended
