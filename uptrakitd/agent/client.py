"""The reference service client: enroll, get a certificate, connect with mTLS, renew, follow rotations."""
from __future__ import annotations

import datetime
import hashlib
import random
import re
import socket
from typing import Any, Callable, cast
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet import endpoints, ssl
from twisted.internet.defer import Deferred, DeferredList, fail, inlineCallbacks, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import Agent as HttpAgent, readBody
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from ..channel import wire
from ..channel.timers import cancel_autobahn_timers, use_plain_timers
from .state import AgentState, new_key_and_csr
from ..pki.serials import format_serial

log = Logger()
STOP_REASONS = {wire.CERT_REVOKED, wire.SERVICE_DEACTIVATED}


class AgentError(Exception):
    """The agent cannot go on (nothing to authenticate with, revoked, ...)."""


def _trust(pems: list[bytes]) -> Any:
    certs = []
    for pem in pems:
        for cert in x509.load_pem_x509_certificates(pem):
            certs.append(ssl.Certificate.loadPEM(cert.public_bytes(serialization.Encoding.PEM)))
    if not certs:
        raise AgentError("no CA certificate to verify the controller with (give --ca-cert)")
    return ssl.trustRootFromCertificates(certs)


@implementer(IStreamClientEndpoint)
class _Attempts:
    """The endpoint ClientService connects through: each attempt is the agent's `attempt`."""

    def __init__(self, agent: ServiceAgent) -> None:
        self.agent = agent

    def connect(self, factory: Any) -> Deferred:
        return self.agent.attempt(factory)


@implementer(IPolicyForHTTPS)
class _Policy:
    def __init__(self, options: Any) -> None:
        self.options = options

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self.options


class AgentProtocol(WebSocketClientProtocol):
    """Frames for the agent; all decisions are in ServiceAgent."""

    agent: "ServiceAgent"

    lost_reason: str | None = None   # why the transport went away (a TLS alert, say), for the diagnosis
    was_open = False

    def connectionLost(self, reason: Any = None) -> None:
        if reason is not None:
            self.lost_reason = reason.getErrorMessage()
        try:
            super().connectionLost(reason)
        finally:
            cancel_autobahn_timers(self)

    def onOpen(self) -> None:
        self.was_open = True
        self.in_seq = 1
        self.out_seq = 1
        self.agent.opened(self)

    def send(self, kind: str, **payload: Any) -> bool:
        if self.state != self.STATE_OPEN:
            log.debug("not sending {kind}: the connection is closing", kind=kind)
            return False
        self.sendMessage(wire.encode(kind, self.out_seq, **payload), isBinary=False)
        self.out_seq += 1
        return True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            message = wire.decode(payload, self.in_seq)
        except wire.ProtocolViolation as e:
            log.error("controller sent a bad frame ({reason}); reconnecting", reason=str(e))
            self.sendClose(1002)
            return
        self.in_seq += 1
        self.agent.received(self, message)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.agent.closed(self, code, reason)


class ServiceAgent(Service):
    """A Twisted service that keeps one service connected to the controller.

    The connection is Twisted's `ClientService`: it connects, notices the loss and connects again, waiting as
    `_next_delay` says. What it connects with is decided at each attempt (`attempt`): the TLS client
    certificate and the headers follow what the agent holds by then (nothing, an enrollment secret, a
    certificate, or the previous certificate after a restore). The delay is the agent's own: a close the
    controller asks to be followed at once (a new certificate, a rotation) is retried at once, and the backoff
    keeps growing across connections that TCP accepts but the controller refuses, which ClientService's own
    count (reset by every connection made) would not."""

    def __init__(self, reactor: Any, controller: str, state_dir: Any, kind: str = "agent",
                 enrollment_token: str | None = None, ca_cert: bytes | None = None, hostname: str | None = None,
                 friendly_name: str | None = None, server_ca: bytes | None = None,
                 bind_address: str | None = None, extra_headers: dict[str, str] | None = None,
                 backoff: tuple[float, float] = (1.0, 60.0),
                 on_stop: Callable[[str], Any] | None = None) -> None:
        parts = urlsplit(controller)
        if parts.scheme not in ("wss", "https") or not parts.hostname:
            raise AgentError("--controller must be wss://host[:port] (or https://)")
        self.reactor = reactor
        self.host, self.port = parts.hostname, parts.port or 443
        self.kind = kind
        self.state = AgentState(state_dir)
        self.enrollment_token = enrollment_token
        self.on_stop = on_stop  # called once with the reason when the agent gives up for good
        self.initial_ca = ca_cert
        self.server_ca = server_ca
        self.hostname = hostname or socket.gethostname()
        self.friendly_name = friendly_name
        self.bind_address = bind_address
        self.extra_headers = dict(extra_headers or {})
        self.backoff = backoff
        self.failures = 0
        self.proto: AgentProtocol | None = None
        self.pending_key: bytes | None = None
        self.settings: dict[str, Any] = {}
        self.stopped_reason: str | None = None
        self.observers: list[Callable[[str, Any], None]] = []
        self._reconnect_now = False   # the next attempt at once (ClientService asks _next_delay)
        self.client: ClientService | None = None
        self._renew_when_settled = False   # connected with the previous certificate: renew once settled
        self._fell_back = False   # the current identity is the previous one, the newer one put aside
        self._fall_back_tried = False
        self._renewal_timer: Any = None
        self._ping: LoopingCall | None = None
        self._connecting: Deferred | None = None
        self._diagnoses: dict[str, int] = {}

    # -- helpers for operators' logs and tests ---------------------------------------------------

    def event(self, name: str, detail: Any = None) -> None:
        """Tell observers (tests, embedding programs) what happened; nothing is kept."""
        for observer in list(self.observers):
            observer(name, detail)

    @property
    def service_id(self) -> str | None:
        return self.state.service().get("service_id")

    # -- connecting ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        factory = WebSocketClientFactory(f"wss://{self.host}:{self.port}/api/v1/ws/{self.kind}")
        factory.protocol = AgentProtocol
        factory.setProtocolOptions(autoPingInterval=30, autoPingTimeout=60, perMessageCompressionOffers=[])
        use_plain_timers(factory, self.reactor)
        agent = self

        def build(addr: Any) -> AgentProtocol:
            proto = cast(AgentProtocol, WebSocketClientFactory.buildProtocol(factory, addr))
            proto.agent = agent
            return proto
        factory.buildProtocol = build  # type: ignore[method-assign]
        self.ws_factory = factory
        self.client = ClientService(_Attempts(self), factory, retryPolicy=self._next_delay, clock=self.reactor)
        self.client.startService()

    def stopService(self) -> Any:
        super().stopService()
        if self._renewal_timer is not None and self._renewal_timer.active():
            self._renewal_timer.cancel()
        self._stop_ping()
        closing: Deferred | None = None
        if self.proto is not None and self.proto.transport is not None:
            closing = Deferred()

            def gone(event: str, detail: Any) -> None:
                if event == "disconnected" and not closing.called:
                    closing.callback(None)
            self.observers.append(gone)
            self.proto.sendClose(1000)   # a closing handshake first: ClientService would only drop the TCP
            proto = self.proto

            def abort(*_: Any) -> None:   # no closing handshake within 5 s: drop it (and Autobahn's timers)
                abort_connection = getattr(proto.transport, "abortConnection", None)
                if abort_connection is not None:
                    abort_connection()
            closing.addTimeout(5, self.reactor, onTimeoutCancel=abort)
        stopping = self._stop_client()
        if closing is None:
            return stopping
        return DeferredList([closing, stopping], consumeErrors=True)

    def _stop_client(self) -> Deferred:
        client, self.client = self.client, None
        if client is None or not client.running:
            return succeed(None)
        return client.stopService()

    def mode(self) -> str:
        if self.state.identity_pem() and self.state.certificate() is not None:
            return "mtls"
        if self.state.service().get("enrollment_secret"):
            return "bearer"
        if self.enrollment_token:
            return "anonymous"
        raise AgentError("not enrolled and no --enrollment-token given")

    def tls_options(self, with_client_cert: bool) -> Any:
        roots = [p for p in (self.state.bundle() or self.initial_ca, self.server_ca) if p]
        client = None
        if with_client_cert:
            client = ssl.PrivateCertificate.loadPEM(self.state.identity_pem())
        return ssl.optionsForClientTLS(self.host, trustRoot=_trust(roots), clientCertificate=client)

    def attempt(self, factory: Any) -> Deferred:
        """One connection attempt (ClientService's endpoint), with what the agent holds now."""
        if self.stopped_reason:
            return fail(AgentError(self.stopped_reason))
        try:
            mode = self.mode()
            options = self.tls_options(mode == "mtls")
        except (AgentError, ValueError) as e:
            log.critical("agent cannot connect: {error}", error=str(e))
            self._give_up(str(e))
            return fail(e)
        headers = dict(self.extra_headers)
        if mode == "bearer":
            headers["Authorization"] = f"Bearer {self.state.service()['enrollment_secret']}"
        self.ws_factory.headers = headers   # read by the opening handshake of the protocol it builds
        tcp = endpoints.TCP4ClientEndpoint(self.reactor, self.host, self.port, timeout=10,
                                           bindAddress=(self.bind_address, 0) if self.bind_address else None)
        self.mode_in_use = mode
        self.event("connecting", mode)
        d = endpoints.wrapClientTLS(options, tcp).connect(factory)
        d.addErrback(self._connect_failed)
        return d

    def _connect_failed(self, failure: Any) -> Any:
        log.info("could not reach the controller: {error}", error=failure.getErrorMessage())
        self.event("connect_failed", failure.getErrorMessage())
        return failure   # ClientService tries again after _next_delay

    def _next_delay(self, attempt: int) -> float:
        """ClientService's retry policy: at once when a close asked for it, else a backoff that keeps growing
        until the controller sends this service its settings (a working session)."""
        if self._reconnect_now:
            self._reconnect_now = False
            return 0.05
        base, cap = self.backoff
        delay = min(cap, base * 2 ** min(self.failures, 10)) * random.uniform(0.5, 1.5)
        self.failures += 1
        return delay

    # -- session -------------------------------------------------------------------------------

    def opened(self, proto: AgentProtocol) -> None:
        self.proto = proto
        self.event("open", self.mode_in_use)
        if self.mode_in_use == "anonymous":
            proto.send("enroll", hostname=self.hostname, friendly_name=self.friendly_name,
                       enrollment_token=self.enrollment_token, capabilities=[])
        elif self.mode_in_use == "bearer":
            self._request_certificate(proto)

    def _request_certificate(self, proto: AgentProtocol) -> None:
        self.pending_key, csr = new_key_and_csr(self.service_id or "", self.settings.get("trust_domain"))
        proto.send("request_certificate", csr_pem=csr.decode())

    def renew(self, reason: str = "") -> None:
        """Send a CSR for a fresh key; the controller answers `certificate` and closes the socket."""
        if self.proto is None or self.mode_in_use != "mtls" or self.pending_key is not None:
            return  # one renewal at a time: the controller closes the socket once it answers
        self._renew_when_settled = False
        self.pending_key, csr = new_key_and_csr(self.service_id or "", self.settings.get("trust_domain"))
        log.info("renewing the certificate ({reason})", reason=reason or "requested")
        self.proto.send("renew_certificate", csr_pem=csr.decode())

    def received(self, proto: AgentProtocol, message: dict[str, Any]) -> None:
        kind = message["type"]
        handler = getattr(self, f"_on_{kind}", None)
        self.event(kind, message)
        if handler is not None:
            try:
                handler(proto, message)
            except Exception:
                log.failure("agent could not handle {kind}", kind=kind)

    def _on_enrolled(self, proto: AgentProtocol, m: dict[str, Any]) -> None:
        self.state.save_service(service_id=m["service_id"], enrollment_secret=m["enrollment_secret"],
                                kind=self.kind)
        log.info("enrolled as {service} (status {status})", service=m["service_id"], status=m["status"])
        self.enrollment_token = None  # used: the enrollment secret in the state dir replaces it
        if m["status"] == "approved":
            self.mode_in_use = "bearer"
            self._request_certificate(proto)
        else:
            # Waiting for an operator: the controller says `service_approved` on this socket when it happens;
            # if the socket drops meanwhile, come back (with backoff) and ask again with the enrollment secret.
            log.info("waiting for an operator to approve service {service}", service=m["service_id"])

    def _on_service_approved(self, proto: AgentProtocol, m: dict[str, Any]) -> None:
        log.info("service approved: requesting the first certificate")
        self.mode_in_use = "bearer"
        self._request_certificate(proto)

    def _on_certificate(self, proto: AgentProtocol, m: dict[str, Any]) -> None:
        if self.pending_key is None:
            log.error("unexpected certificate (no CSR outstanding)")
            return
        cert = x509.load_pem_x509_certificate(m["cert_pem"].encode())
        key = serialization.load_pem_private_key(self.pending_key, password=None)
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(serialization.Encoding.DER, spki) != \
                key.public_key().public_bytes(serialization.Encoding.DER, spki):
            log.error("the certificate received is not for the key we generated; ignored")
            return
        self.state.save_identity(self.pending_key, m["cert_pem"].encode())
        self._fell_back = self._fall_back_tried = False
        self.state.save_bundle(m["ca_bundle_pem"].encode())
        self.pending_key = None
        self.state.save_service(enrollment_secret=None)
        log.info("stored a new certificate valid until {when}",
                 when=datetime.datetime.fromtimestamp(m["not_after"] / 1000, datetime.timezone.utc).isoformat())
        if self.mode_in_use != "mtls":
            proto.sendClose(1000)  # reconnect with the certificate

    @inlineCallbacks
    def _on_service_settings(self, proto: AgentProtocol, m: dict[str, Any]) -> Any:
        self.settings = m
        self.failures = 0
        cert = self.state.certificate()
        log.info("connected to the controller as service {service} (certificate {serial}, {mode})",
                 service=self.service_id, serial=format_serial(cert.serial_number) if cert is not None else "-",
                 mode=self.mode_in_use)
        self._start_ping(proto, m.get("ping_interval", 30))
        if m.get("ca_bundle_hash") != self.state.bundle_hash():
            log.info("CA bundle changed while we were away: fetching it")
            try:
                yield self.fetch_bundle(m["ca_bundle_hash"])
            except Exception as e:
                log.error("could not fetch the CA bundle: {error}", error=str(e))
                return
            active = x509.load_pem_x509_certificates(self.state.bundle() or b"")[0]
            cert = self.state.certificate()
            if cert is not None and cert.issuer != active.subject:
                self.renew("ca_rotation")
                return
        cert = self.state.certificate()
        window = datetime.timedelta(hours=m.get("renewal_window_hours", 24))
        if self._renew_when_settled:
            self.renew("the controller knew only our previous certificate")
        elif cert is not None and cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc) <= window:
            self.renew("expiring")

    @inlineCallbacks
    def fetch_bundle(self, expected_hash: str) -> Any:
        """GET /api/v1/pki/ca.crt with the trust we hold; stored only when it hashes as announced."""
        http = HttpAgent(self.reactor, contextFactory=_Policy(self.tls_options(False)))
        response = yield http.request(b"GET", f"https://{self.host}:{self.port}/api/v1/pki/ca.crt".encode())
        body = yield readBody(response)
        if response.code != 200 or hashlib.sha256(body).hexdigest() != expected_hash:
            raise AgentError("fetched CA bundle does not match the announced hash")
        self.state.save_bundle(body)
        self.event("bundle_fetched", expected_hash)

    def _on_ca_bundle_updated(self, proto: AgentProtocol, m: dict[str, Any]) -> None:
        pem = m["ca_bundle_pem"].encode()
        if hashlib.sha256(pem).hexdigest() != m["ca_bundle_hash"]:
            log.error("ca_bundle_updated: the bundle does not match its hash; ignored")
            return
        self.state.save_bundle(pem)
        log.info("stored the new CA bundle {hash}", hash=m["ca_bundle_hash"][:16])

    def _on_request_cert_renewal(self, proto: AgentProtocol, m: dict[str, Any]) -> None:
        within = m.get("within_seconds")
        if isinstance(within, (int, float)) and not isinstance(within, bool) and within > 0:
            # the controller paces a fleet's renewals: come at a random moment inside its window
            delay = random.uniform(0, min(float(within), 3600.0))
            self._renewal_timer = self.reactor.callLater(delay, self.renew, m.get("reason", ""))
            return
        self.renew(m.get("reason", ""))

    def _on_error(self, proto: AgentProtocol, m: dict[str, Any]) -> None:
        wait = m.get("retry_after_seconds")
        if m.get("code") == "renewal_deferred" and isinstance(wait, (int, float)) and not isinstance(wait, bool):
            # the controller admits renewals at its own pace: the same renewal, a little later
            self.pending_key = None
            delay = min(max(float(wait), 0.1), 3600.0)
            log.info("renewal deferred by the controller: again in {delay:g} s", delay=delay)
            self._renewal_timer = self.reactor.callLater(delay, self.renew, "deferred")
            return
        if m.get("code") in ("renewal_not_due", "issue_in_progress"):
            # nothing is signed for this CSR: the key is dropped; the next request (or the window) renews
            self.pending_key = None
            log.warn("renewal refused by the controller: {message}", message=m.get("message"))
            return
        if m.get("code") == "enrollment_refused":
            # a token that is expired, used up, revoked or unknown will not start working: say so and stop
            reason = f"{m.get('message')}: ask the operator for a new enrollment token"
            log.critical("enrollment refused: {reason}", reason=reason)
            self._give_up(f"enrollment refused: {reason}")
            proto.sendClose(1000)
            return
        log.error("controller error {code}: {message}", code=m.get("code"), message=m.get("message"))

    def _start_ping(self, proto: AgentProtocol, interval: float) -> None:
        self._stop_ping()

        def ping() -> None:
            if self.proto is proto and proto.transport is not None:
                proto.send("ping", service_ts=int(self.reactor.seconds() * 1000))
        self._ping = LoopingCall(ping)
        self._ping.clock = self.reactor
        self._ping.start(max(1, interval), now=False)

    def _diagnose(self, diagnosis: str) -> None:
        """One log line naming the likely cause and the fix; repeats of the same one only every 10th time."""
        count = self._diagnoses.get(diagnosis, 0)
        self._diagnoses[diagnosis] = count + 1
        self.event("diagnosis", diagnosis)
        if count % 10 == 0:
            log.error("{diagnosis}", diagnosis=diagnosis + (f" (seen {count + 1} times)" if count else ""))

    def _give_up(self, reason: str) -> None:
        self.stopped_reason = reason
        self.event("stopped", reason)
        self.reactor.callLater(0, self._stop_client)   # no more attempts (not from inside ClientService's own call)
        if self.on_stop is not None:
            self.on_stop(reason)

    def _fall_back(self) -> bool:
        """The controller does not know our certificate: restored from a backup taken before our last renewal,
        it knows the one before. Connect with that one (if still valid) and renew at once; True if so."""
        previous = self.state.previous_certificate()
        if self._fall_back_tried or previous is None or \
                previous.not_valid_after_utc <= datetime.datetime.now(datetime.timezone.utc):
            return False
        self._fall_back_tried = True   # once per identity (and per start): the two are not swapped back and forth
        log.warn("the controller does not recognize our certificate (was it restored from a backup?): connecting "
                 "with the previous one, serial {serial}, to renew", serial=format_serial(previous.serial_number))
        self.state.swap_identities()
        self._fell_back = self._renew_when_settled = True
        self.event("fell_back", previous.serial_number)
        return True

    def _stop_ping(self) -> None:
        if self._ping is not None and self._ping.running:
            self._ping.stop()
        self._ping = None

    def closed(self, proto: AgentProtocol, code: int | None, reason: str | None) -> None:
        diagnosis = explain_refusal(getattr(self, "mode_in_use", ""), proto.was_open, reason, proto.lost_reason)
        if diagnosis is not None:
            self._diagnose(diagnosis)
        self.pending_key = None
        if self.proto is proto:
            self.proto = None
            self._stop_ping()
        self.event("disconnected", (code, reason))
        if self._fell_back and reason in (wire.CERT_NOT_RECOGNIZED, wire.CERT_REVOKED):
            # the previous certificate is refused as well: back to the newer one, and to retrying with backoff
            log.error("the previous certificate is refused too ({reason}): re-enroll this agent if the controller "
                      "keeps refusing its certificate", reason=reason)
            self.state.swap_identities()
            self._fell_back = self._renew_when_settled = False
            return   # ClientService connects again, after the backoff
        if reason == wire.CERT_NOT_RECOGNIZED and self.mode_in_use == "mtls" and self._fall_back():
            self._reconnect_now = True
            return
        if reason in STOP_REASONS:
            log.critical("the controller closed the connection: {reason}; stopping", reason=reason)
            self._give_up(reason)
            return
        try:
            have_certificate = self.mode() == "mtls"
        except AgentError:
            have_certificate = False
        if reason == wire.SUPERSEDED:
            # another process holds this identity: come back slowly rather than fight over the socket
            log.error("another connection with this service's certificate replaced ours")
            self.failures = max(self.failures, 10)
        # ClientService connects again once this connection is gone: at once, or after the backoff
        self._reconnect_now = reason == wire.CERT_ROTATED or (code == 1000 and have_certificate)


_UPGRADE_STATUS = re.compile(r"upgrade failed \[(\d{3})\]")


def explain_refusal(mode: str, was_open: bool, reason: str | None, tls_error: str | None) -> str | None:
    """The likely cause of a refused connection, and the fix, in one sentence (None: nothing to explain).

    Written for what proxies really do: nginx answers a certificate it cannot verify (unknown CA,
    revoked by OCSP/CRL) with an HTTP 400 (its internal 495/496) to the upgrade, HAProxy and others
    fail the TLS handshake with an alert, and a proxy that does not forward the certificate (or is
    not a trusted proxy of the controller) leaves the controller waiting for an enrollment.
    """
    tls = (tls_error or "").lower()
    text = reason or ""
    if "certificate verify failed" in tls:
        return ("TLS: this agent does not trust the server's certificate. Behind a proxy with its own server "
                "certificate, give its CA with --server-ca; the controller's own CA is --ca-cert.")
    if "unknown ca" in tls or "unknown_ca" in tls:
        return ("TLS alert 'unknown ca': the proxy does not trust this agent's certificate. If the CA was rotated, "
                "re-download ca.crt on the proxy (GET /api/v1/pki/ca.crt) and reload it.")
    if "bad certificate" in tls or "bad_certificate" in tls:   # Go's crypto/tls (Caddy, Traefik) for any refusal
        return ("TLS alert 'bad certificate': the proxy refused this agent's certificate. If the CA was rotated, "
                "re-download ca.crt on the proxy (GET /api/v1/pki/ca.crt) and reload it.")
    if "certificate revoked" in tls or "certificate_revoked" in tls:
        return ("TLS alert 'certificate revoked': the proxy says this agent's certificate is revoked. Ask the "
                "operator; a revoked service must be enrolled again with a new enrollment token.")
    if "certificate required" in tls and mode != "mtls":
        return ("TLS alert 'certificate required': the proxy demands a client certificate, but an agent enrolls "
                "before it has one. Make the proxy's client-certificate check optional (nginx: ssl_verify_client "
                "optional; HAProxy: verify optional).")
    match = _UPGRADE_STATUS.search(text)
    if match and not was_open:
        status = int(match.group(1))
        if status in (400, 495, 496) and mode == "mtls":
            return (f"the proxy refused the WebSocket upgrade with HTTP {status}: it did not accept this agent's "
                    "certificate. Right after a CA rotation the proxy most likely lacks the new CA: re-download "
                    "ca.crt on the proxy (GET /api/v1/pki/ca.crt) and reload it. Otherwise the certificate was "
                    "revoked (the proxy checks OCSP or the CRL): ask the operator.")
        if status in (502, 503, 504):
            return (f"the proxy answered HTTP {status}: it cannot reach the controller (check its upstream address "
                    "and that the controller runs).")
        if status == 400:
            return ("the proxy refused the WebSocket upgrade with HTTP 400: check that it passes WebSocket "
                    "upgrades (HTTP/1.1 with the Upgrade and Connection headers).")
    if reason == wire.ENROLLMENT_TIMEOUT and mode == "mtls":
        return ("the controller did not see this agent's certificate: the proxy in front does not forward it "
                "(a client-certificate header), or the controller does not list the proxy as a --trusted-proxy. "
                "The controller's Proxy doctor page shows which.")
    return None
