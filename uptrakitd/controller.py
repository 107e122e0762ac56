"""The running daemon: wires store, PKI, identity and the listeners; start/stop/reload as a service."""
from __future__ import annotations

import datetime
import signal
from dataclasses import replace
import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import endpoints
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger, jsonFileLogObserver
from twisted.protocols.tls import TLSMemoryBIOFactory

from . import store as store_mod
from .boot import Booted, ServiceCertSettings, put_setting
from .tokens import token_hash
from .channel.registry import ChannelHub
from .config import ConfigError, NetworkSettings, build_settings
from .metrics import Metrics
from .pki.crl import CrlPublisher
from .pki.issue import renewal_window
from .pki.ocsp import OcspResponder
from .pki.issue import load_csr
from .pki.service import PkiService
from .services import ServiceRecord, insert_service
from .trust.identity import IdentityResolver
from .trust.tls import SwappableServerContext
from .web.root import build_sites

log = Logger()


class Controller(MultiService):
    """uptrakitd as a Twisted service."""

    def __init__(self, booted: Booted, reactor: Any, flags: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.booted = booted
        self.settings = booted.settings
        self.flags = dict(flags or {})
        self.network: NetworkSettings = booted.network
        self.service_certs: ServiceCertSettings = booted.service_certs
        self.admin_tokens = dict(booted.admin_tokens)
        self.service_records: dict[str, ServiceRecord] = {s.id: s for s in booted.services}
        self.metrics = Metrics()
        self.store = store_mod.Store(self.settings.data_dir / "uptrakit.sqlite3", reactor)
        self.ports: list[Any] = []
        self._timers: list[LoopingCall] = []
        now = datetime.datetime.fromtimestamp(reactor.seconds(), datetime.timezone.utc)

        crls = CrlPublisher(booted.authority, self.store, self.settings.data_dir, reactor, self.to_thread)
        crls.publish_sync(crls.build_sync(booted.crl_numbers, now))
        ocsp = OcspResponder(booted.authority, reactor)
        ocsp.observers.append(lambda answer: self.metrics.ocsp_responses.labels(answer.status).inc())
        self.tls = SwappableServerContext()
        self.pki = PkiService(booted.authority, self.store, reactor, self.to_thread, crls, ocsp, self.tls,
                              self.settings.data_dir, booted.server_cert, booted.server_key,
                              lambda: self.network.pki_addr, booted.hostname, self.settings.san,
                              self.settings.trust_domain)
        self.pki.tls_installed.append(self.metrics.tls_context_installs.inc)
        self.pki.install_tls()
        self.metrics.ca_generation.set_function(lambda: self.pki.authority.active().generation)
        self.resolve_request = IdentityResolver(lambda: self.network, booted.authority, self.service_records,
                                                self.settings.trust_domain, reactor, self.metrics)
        self.hub = ChannelHub(self, reactor)
        self.metrics.services_connected.set_function(lambda: len(self.hub.connected))
        self.https_site, self.pki_site = build_sites(self)

    def setServiceParent(self, parent: Any) -> Any:
        # twistd asks the application for an ILogObserver before installing its own text observer
        if self.settings.log_format == "json" and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, jsonFileLogObserver(sys.stdout, recordSeparator=""))
        return super().setServiceParent(parent)

    def to_thread(self, fn: Any, *args: Any, **kw: Any) -> Any:
        """Run CPU-heavy or blocking work in the reactor's thread pool."""
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args, **kw)

    # -- decisions used by the web layer -------------------------------------------------------

    def check_admin(self, token: str, method: str = "GET") -> bool | None:
        """True: allowed; False: a known token without the permission; None: unknown token.

        `admin` may do everything; `read` may use the admin GET routes.
        """
        perms = self.admin_tokens.get(token_hash(token))
        if perms is None:
            return None
        return "admin" in perms or ("read" in perms and method in ("GET", "HEAD"))

    @inlineCallbacks
    def create_service(self, kind: str, hostname: str, status: str = "approved", **kw: Any) -> Any:
        """Create and remember a service; fires with its ServiceRecord."""
        record = yield self.store.run(insert_service, kind, hostname, status, **kw)
        self.service_records[record.id] = record
        return record

    @inlineCallbacks
    def issue_certificate(self, service_id: str, csr_pem: str | bytes) -> Any:
        """Check the CSR and sign it for an approved service; fires with Issued (CsrRejected/NotFound else)."""
        from .errors import Forbidden, NotFound
        service = self.service_records.get(service_id)
        if service is None:
            raise NotFound("unknown service", "service_not_found")
        if service.status != "approved":
            raise Forbidden(f"service is {service.status}, not approved", "service_not_approved")
        csr = load_csr(csr_pem)
        hours = service.cert_lifetime_hours or self.service_certs.lifetime_hours
        issued = yield self.pki.issue_for_service(csr, service_id, service.kind, datetime.timedelta(hours=hours))
        return issued

    def renewal_window_hours(self) -> int:
        sc = self.service_certs
        window = renewal_window(datetime.timedelta(hours=sc.lifetime_hours), sc.renewal_window_hours)
        return max(1, int(window.total_seconds() // 3600))

    @inlineCallbacks
    def update_service_certs(self, changes: dict[str, Any]) -> Any:
        """Store then apply new service-certificate settings."""
        new = ServiceCertSettings(changes.get("lifetime_hours", self.service_certs.lifetime_hours),
                                  changes.get("renewal_window_hours", self.service_certs.renewal_window_hours))
        yield self.store.run(put_setting, "service_certificates",
                             {"lifetime_hours": new.lifetime_hours, "renewal_window_hours": new.renewal_window_hours})
        self.service_certs = new

    def update_network(self, changes: dict[str, Any]) -> Any:
        """Validate (ConfigError naming the field), store, then apply network settings (SPEC §7)."""
        return self.store_network(self.network.updated(changes))

    @inlineCallbacks
    def store_network(self, new: NetworkSettings) -> Any:
        """Store validated network settings, then use them from the next request on."""
        yield self.store.run(put_setting, "network", new.to_json())
        self.apply_network(new)
        return new

    def apply_network(self, new: NetworkSettings) -> None:
        """Use `new` from the next request on."""
        if new.trusts_everything():
            log.warn("network.trusted_proxies trusts every address: ANY client can claim any identity "
                     "through forwarded headers")
        self.network = new

    @inlineCallbacks
    def readiness(self) -> Any:
        """The /readyz checks: the store answers a query, the active CA is usable, CRLs are fresh."""
        try:
            yield self.store.run(lambda conn: conn.execute("SELECT COUNT(*) FROM ca_generations").fetchone()
                                 ).addTimeout(2, self.reactor)
            database = "ok"
        except Exception as e:
            database = f"unavailable ({type(e).__name__})"
        now = self.pki.now()
        active = self.pki.authority.active()
        ca = "ok" if not active.expired(now) and active.key is not None else "active CA unusable"
        crl = "ok"
        for generation in (c.generation for c in self.pki.authority.served(now)):
            published = self.pki.crls.current.get(generation)
            if published is None or now > published.this_update + self.pki.crls.validity:
                crl = f"CRL of generation {generation} missing or stale"
        return {"database": database, "ca": ca, "crl": crl}

    # -- lifecycle --------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if hasattr(signal, "SIGHUP"):
            # before listening: whoever sees the "listening" line may send SIGHUP at once
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        self.store.start()
        self.hub.start()
        self._listen(self.settings.https_listen, TLSMemoryBIOFactory(self.tls, False, self.https_site), "HTTPS")
        pki_endpoint = self.settings.pki_listen_endpoint()
        if pki_endpoint:
            self._listen(pki_endpoint, self.pki_site, "plain-HTTP PKI")
        self._every(3600, self._hourly_crl, "hourly CRL rebuild", now=False)
        self.reactor.callWhenRunning(
            lambda: self.pki.crls.warm().addErrback(lambda f: log.failure("CRL worker warm-up failed", f)))
        self._every(86400, self.pki.check_daily, "daily CA/server certificate check", now=True)
        self._warn_about_setup()

    def _warn_about_setup(self) -> None:
        net = self.network
        if net.trusts_everything():
            log.warn("network.trusted_proxies contains 0.0.0.0/0 or ::/0: ANY client can claim any identity "
                     "through forwarded headers")
        if net.pki_addr and net.pki_addr.startswith("http://") and self.settings.pki_http is None:
            log.warn("pki_addr {addr} is http:// but --pki-http is unset: nothing here serves the PKI over "
                     "plain HTTP (use --pki-http listener, or --pki-http external if something else does)",
                     addr=net.pki_addr)
        log.info("admin token file: {path}", path=str(self.booted.admin_token_path.resolve()))

    def _every(self, seconds: float, fn: Any, what: str, now: bool) -> None:
        def run() -> Any:
            d = fn()
            if d is not None:
                d.addErrback(lambda f: log.failure("{what} failed", f, what=what))
        loop = LoopingCall(run)
        loop.clock = self.reactor
        loop.start(seconds, now=now)
        self._timers.append(loop)

    def _hourly_crl(self) -> Any:
        return self.pki.crls.rebuild()

    def _listen(self, description: str, factory: Any, what: str) -> None:
        try:
            endpoint = endpoints.serverFromString(self.reactor, description)
        except (ValueError, TypeError, KeyError) as e:
            self._fatal(f"invalid {what} endpoint {description!r}: {e}")
            return
        d = endpoint.listen(factory)

        def listening(port: Any) -> None:
            self.ports.append(port)
            log.info("{what} listening on {address}", what=what, address=str(port.getHost()))

        d.addCallbacks(listening, lambda f: self._fatal(f"cannot listen for {what} on {description}: "
                                                         f"{f.getErrorMessage()}"))

    def _fatal(self, message: str) -> None:
        log.critical("{message}", message=message)
        sys.stderr.write(f"uptrakitd: error: {message}\n")
        self.exit_status = 1
        import os
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    @inlineCallbacks
    def stopService(self) -> Any:
        if not self.running:
            return
        # twistd re-raises SIGTERM after a clean shutdown (exit 143); the contract is exit 0 for a
        # SIGTERM we handled completely, so forget the captured signal.
        if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.reactor._exitSignal = None
        for loop in self._timers:
            if loop.running:
                loop.stop()
        yield self.hub.stop()
        yield DeferredList([port.stopListening() for port in self.ports])
        running = self.pki.crls.stop()
        if running is not None:
            yield running
        yield super().stopService()
        self.store.close()
        log.info("uptrakitd stopped")

    def reload(self) -> None:
        """SIGHUP: re-read the config file; apply changed runtime settings, or reject the whole file."""
        if self.settings.config_path is None:
            log.info("SIGHUP: no --config file to re-read")
            return
        try:
            fresh = build_settings(self.flags, str(self.settings.config_path))
        except ConfigError as e:
            log.error("SIGHUP: config file rejected, nothing changed: {error}", error=str(e))
            return
        changed = {k: getattr(fresh.network, k) for k in fresh.network_given
                   if getattr(fresh.network, k) != getattr(self.settings.network, k)}
        restart = [k for k in ("https_listen", "data_dir", "pki_http", "pki_listen", "ca_cert", "ca_key", "san",
                               "trust_domain", "log_format") if getattr(fresh, k) != getattr(self.settings, k)]
        for key in restart:
            log.warn("SIGHUP: {key} changed in the config file; it takes effect after a restart", key=key)
        self.settings = fresh
        if not changed:
            log.info("SIGHUP: config re-read, no runtime setting changed")
            return
        d = self.store_network(replace(self.network, **changed))
        d.addCallbacks(lambda _: log.info("SIGHUP: applied {keys}", keys=", ".join(sorted(changed))),
                       lambda f: log.failure("SIGHUP: could not apply settings", f))
