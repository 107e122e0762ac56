"""Shared pieces of the benchmarks: a real `twistd -n uptrakit` subprocess, its CPU time, TLS clients."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """`twistd -n uptrakit` in a temp dir on 127.0.0.1; stopped by stop()."""

    def __init__(self, *args: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="uptrakit-bench-")
        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        twistd = str(Path(sys.executable).with_name("twistd"))
        self.proc = subprocess.Popen([twistd, "--pidfile=", "-n", "uptrakit", "--https-listen",
                                      f"tcp:{self.port}:interface=127.0.0.1", *args], cwd=self.dir, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ca = os.path.join(self.dir, "uptrakit-data", "pki", "ca.crt")
        for _ in range(200):
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        token = Path(self.dir, "uptrakit-data", "admin.token")   # only the first controller on a database has one
        self.token = token.read_text().strip() if token.exists() else None

    def cpu_seconds(self) -> float:
        """User + system CPU the daemon has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def tls(self, source: str = "127.0.0.1", cert: str | None = None) -> ssl.SSLSocket:
        ctx = ssl.create_default_context(cafile=self.ca)
        if cert:
            ctx.load_cert_chain(cert)
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10, source_address=(source, 0))
        return ctx.wrap_socket(raw, server_hostname="localhost")

    def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        """(status, parsed JSON or raw bytes) of one request; `body`: bytes as they are, else JSON."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
        with self.tls() as s:
            head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {len(data)}\r\n"
            if token:
                head += f"Authorization: Bearer {token}\r\n"
            s.sendall(head.encode() + b"\r\n" + data)
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        head, _, payload = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def keepalive_get(sock: ssl.SSLSocket, path: str, headers: dict[str, str] | None = None) -> int:
    """One GET on an open keep-alive connection; returns the status (the test suite's helper)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.helpers import blocking_get
    return blocking_get(sock, path, headers)[0]


def enrolled_certificate(daemon: Daemon, path: str) -> str:
    """Enroll one agent over the channel (websockets library) and write its key+certificate PEM to `path`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from websockets.asyncio.client import connect
    status, token = daemon.request("POST", "/api/v1/enrollment-tokens",
                                   {"name": "bench", "auto_approve": True, "max_uses": None}, daemon.token)
    ctx = ssl.create_default_context(cafile=daemon.ca)
    key = ec.generate_private_key(ec.SECP256R1())

    # the asyncio client, not websockets.sync: see tests/channel_helpers.BlockingWebSocket for why
    async def enroll() -> str:
        async with connect(f"wss://localhost:{daemon.port}/api/v1/ws/agent", ssl=ctx) as ws:
            await ws.send(json.dumps({"protocol_version": 1, "seq": 1, "type": "enroll", "hostname": "bench",
                                      "enrollment_token": token["token"]}))
            service_id = json.loads(await asyncio.wait_for(ws.recv(), 10))["service_id"]
            csr = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service_id)]))
                   .sign(key, hashes.SHA256()))
            await ws.send(json.dumps({"protocol_version": 1, "seq": 2, "type": "request_certificate",
                                      "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode()}))
            return str(json.loads(await asyncio.wait_for(ws.recv(), 10))["cert_pem"])
    cert_pem = asyncio.run(enroll())
    Path(path).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()) + cert_pem.encode())
    return cert_pem


def softhsm_token(label: str) -> tuple[str, Path]:
    """A SoftHSM2 token `label` (user PIN 1234) in a temp dir, SOFTHSM2_CONF set for this process and the
    daemons it starts; (the module's path, a 0600 file holding the PIN)."""
    work = Path(tempfile.mkdtemp(prefix="uptrakit-bench-hsm-"))
    (work / "tokens").mkdir()
    conf = work / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {work / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", "1234", "--so-pin", "5678"],
                   check=True, capture_output=True)
    (work / "pin").write_text("1234\n")
    (work / "pin").chmod(0o600)
    module = next(m for m in ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
                  if os.path.exists(m))
    return module, work / "pin"

