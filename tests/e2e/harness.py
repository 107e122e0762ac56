"""Run a real proxy from the shipped config in etc/proxies/, and the checks every proxy must pass."""
from __future__ import annotations

import base64
import json
import socket
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from uptrakitd.pki.serials import format_serial

from ..channel_helpers import next_event, agent_identity, enrollment_token, service_json, start_agent
from ..helpers import (WatchedProcess, blocking_get, blocking_tls_socket, ca_pem, free_port, https_port,
                       request_json, spawn, start_controller, wait_until)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "etc" / "proxies"
AGENT_ADDR = "127.0.0.5"      # where agents and clients connect from
OUTSIDER = "127.0.0.9"        # an untrusted address talking to the controller directly
PROXY_ADDR = "127.0.0.1"      # the proxies reach the controller from here: the trusted proxy


def render(template: Path, values: dict[str, Any]) -> str:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", str(value))
    assert "@@" not in text, f"unfilled placeholder in {template}"
    return text


class RunningProxy:
    """A proxy process started from a rendered config; stopped at test cleanup."""

    def __init__(self, testcase: Any, name: str, argv: list[str], port: int, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.testcase, self.name, self.argv, self.port = testcase, name, argv, port
        self.env, self.cwd = env, cwd
        self.output: WatchedProcess | None = None

    @inlineCallbacks
    def start(self, timeout: float = 20) -> Any:
        self.output = spawn(self.argv, env=self.env, cwd=self.cwd)
        self.testcase.addCleanup(self.stop)
        deadline = reactor.seconds() + timeout
        while True:
            ok = yield deferToThread(_accepts, self.port)
            if ok:
                return self
            if self.output.ended.called or reactor.seconds() > deadline:
                raise AssertionError(f"{self.name} did not start:\n{self.output.output.decode(errors='replace')[-3000:]}")
            yield deferLater(reactor, 0.1, lambda: None)

    def signal(self, name: str) -> None:
        self.output.transport.signalProcess(name)

    def stop(self) -> Any:
        proc = self.output
        if proc is not None and not proc.ended.called:
            proc.transport.signalProcess("TERM")
            later = reactor.callLater(5, lambda: None if proc.ended.called else proc.transport.signalProcess("KILL"))
            return proc.ended.addBoth(lambda r: later.cancel() if later.active() else None)
        return None

    @inlineCallbacks
    def restart(self) -> Any:
        yield self.stop()
        yield self.start()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def write_pki_files(c: Any, directory: Path) -> dict[str, str]:
    """The files a proxy needs: CA bundle, server cert/key (the controller's own), CRL bundle."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = c.settings.data_dir / "pki"
    files = {
        "CA_BUNDLE": directory / "ca.crt",
        "SERVER_CERT": directory / "server.crt",
        "SERVER_KEY": directory / "server.key",
        "SERVER_PEM": directory / "server.pem",
        "CRL_FILE": directory / "ca.crl",
    }
    files["CA_BUNDLE"].write_bytes(ca_pem(c))
    files["SERVER_CERT"].write_bytes((pki / "server.crt").read_bytes())
    files["SERVER_KEY"].write_bytes((pki / "server.key").read_bytes())
    files["SERVER_PEM"].write_bytes((pki / "server.crt").read_bytes() + (pki / "server.key").read_bytes())
    files["CRL_FILE"].write_bytes((pki / "ca.crl").read_bytes())
    return {k: str(v) for k, v in files.items()}


def refresh_pki_files(c: Any, files: dict[str, str]) -> None:
    """What the guides' cron/systemd timer does: fetch ca.crt and ca.crl again."""
    Path(files["CA_BUNDLE"]).write_bytes(ca_pem(c))
    Path(files["CRL_FILE"]).write_bytes((c.settings.data_dir / "pki" / "ca.crl").read_bytes())


def connected_with_generation(c: Any, agent: Any, generation: int) -> bool:
    """True once the controller holds the agent's socket authenticated with a certificate of `generation`."""
    proto = c.channel.connected.get(agent.service_id)
    identity = proto.context.identity if proto is not None and proto.context is not None else None
    return identity is not None and identity.ca_generation == generation and not proto.closing


def whoami(port: int, ca: bytes, source: str, cert: bytes | None = None, key: bytes | None = None,
           headers: dict[str, str] | None = None) -> Deferred:
    """GET /api/v1/whoami over TLS from `source` (blocking client in a thread)."""
    def go() -> Any:
        with blocking_tls_socket(port, ca, cert, key, source=source) as s:
            status, body = blocking_get(s, "/api/v1/whoami", headers)
            return json.loads(body)
    return deferToThread(go)


@inlineCallbacks
def check_proxy(testcase: Any, c: Any, proxy_port: int, expected_source: str) -> Any:
    """The acceptance every proxy must pass; returns the connected agent."""
    token = yield enrollment_token(c)
    agent = start_agent(testcase, c, token, bind_address=AGENT_ADDR, port=proxy_port)
    yield next_event(agent, "service_settings", timeout=40)
    body = yield service_json(c, agent.service_id)
    testcase.assertEqual((body["identity_source"], body["ip_address"], body["proxy_ip"], body["connected"]),
                         (expected_source, AGENT_ADDR, PROXY_ADDR, True))
    cert, key = agent_identity(agent)
    answer = yield whoami(proxy_port, ca_pem(c), AGENT_ADDR, cert, key)
    testcase.assertEqual(answer["identity"]["service_id"], agent.service_id, answer)
    testcase.assertEqual(answer["identity_source"], expected_source)
    # a client that forges identity headers at the proxy gets nothing: the proxy overwrites or strips them
    der = x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
    forged = forged_headers(cert, der)
    answer = yield whoami(proxy_port, ca_pem(c), AGENT_ADDR, headers=forged)
    testcase.assertIsNone(answer["identity"], answer)
    testcase.assertEqual(answer["client_ip"], AGENT_ADDR)
    # and the same headers sent straight to the controller from an untrusted address are stripped
    answer = yield whoami(https_port(c), ca_pem(c), OUTSIDER, headers=forged)
    testcase.assertIsNone(answer["identity"])
    testcase.assertIn("not a trusted proxy", answer["rejected"] or "")
    return agent


def forged_headers(cert_pem: bytes, der: bytes) -> dict[str, str]:
    from urllib.parse import quote
    b64 = base64.b64encode(der).decode()
    return {"X-SSL-Client-Cert": quote(cert_pem.decode(), safe="-_.~"), "X-SSL-Client-Verify": "SUCCESS",
            "X-Forwarded-Client-Cert": f'Hash=1;Cert="{quote(cert_pem.decode(), safe="-_.~")}"',
            "X-Forwarded-Tls-Client-Cert": b64, "Client-Cert": f":{b64}:", "X-Forwarded-For": "6.6.6.6"}


def status_with_cert(port: int, ca: bytes, cert: bytes, key: bytes) -> Deferred:
    """HTTP status of GET /healthz through the proxy with this client certificate; 0 when the proxy
    refuses it with a TLS alert (or closes right after the handshake). A proxy that is not
    listening raises instead, so it cannot pass for a refusal."""
    import ssl

    def go() -> int:
        try:
            with blocking_tls_socket(port, ca, cert, key, source=AGENT_ADDR) as s:
                return blocking_get(s, "/healthz")[0]
        except ssl.SSLError as e:
            if "alert" in str(e).lower() or "eof" in str(e).lower():
                return 0
            raise
        except ConnectionResetError:
            return 0  # refused after a TLS 1.3 handshake that the client thought complete
    return deferToThread(go)


@inlineCallbacks
def rotate_and_follow(testcase: Any, c: Any, agent: Any, proxy_port: int, files: dict[str, str],
                      documented_steps: Any) -> Any:
    """Rotate the CA, apply the guide's proxy steps, and check the agent renews and keeps working."""
    status, body = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
    testcase.assertEqual(status, 200, body)
    refresh_pki_files(c, files)
    yield documented_steps()
    yield wait_until(lambda: connected_with_generation(c, agent, 2), timeout=90)
    cert, key = agent_identity(agent)
    status = yield status_with_cert(proxy_port, ca_pem(c), cert, key)
    testcase.assertEqual(status, 200)
    answer = yield whoami(proxy_port, ca_pem(c), AGENT_ADDR, cert, key)
    testcase.assertEqual(answer["identity"]["ca_generation"], 2)


def proxy_prefix(testcase: Any, c: Any) -> tuple[Path, dict[str, str], int]:
    """(directory, PKI files, listen port) for a proxy under test."""
    prefix = Path(testcase.mktemp()).resolve()
    prefix.mkdir(parents=True)
    return prefix, write_pki_files(c, prefix / "pki"), free_port()


@inlineCallbacks
def check_controller_side_revocation(testcase: Any, c: Any, agent: Any, proxy_port: int) -> Any:
    """For proxies without CRL/OCSP: revoke, then the controller closes the agent and refuses the serial."""
    cert, key = agent_identity(agent)
    stopped = next_event(agent, "stopped", timeout=10)
    serial = format_serial(agent.state.certificate().serial_number)
    yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"})
    testcase.assertEqual((yield stopped), "certificate revoked")
    answer = yield whoami(proxy_port, ca_pem(c), AGENT_ADDR, cert, key)
    testcase.assertIsNone(answer["identity"])
    testcase.assertIn("certificate revoked", answer["rejected"])


@inlineCallbacks
def controller_for_nginx(testcase: Any, **extra: Any) -> Any:
    """A controller trusting the proxy address, nginx's headers, and a plain-HTTP PKI listener for ssl_ocsp."""
    pki_port = free_port()
    c = yield start_controller(testcase, trusted_proxies=[PROXY_ADDR], forwarded_client_cert_pem_header="X-SSL-Client-Cert",
                               pki_addr=f"http://127.0.0.1:{pki_port}", pki_http="listener", **extra)
    yield request_json(c, "PUT", "/api/v1/settings/network",
                       {"forwarded_client_verify_header": "X-SSL-Client-Verify"})
    return c
