"""The composition root: builds every component once, wires them, and returns the service tree.

This module is wiring only. The tree's order is the start order (and, reversed, the stop order):

    signals -> data-dir lock -> store -> the cluster's (PostgreSQL: leadership check, rotation barrier,
    catch-up store, freshness, change feed, change-log pruning, session check) -> crl-worker -> hourly CRL,
    daily CA / server-certificate checks,
    daily record pruning -> channel (+ renewal check) -> readiness check -> HTTPS listener
    -> plain-HTTP PKI listener -> setup warnings -> systemd notifications (+ watchdog)

Event subscriptions are made here too, in the order their effects must happen (see events.py).
"""
from __future__ import annotations

import datetime
import os
import sys
from functools import partial
from typing import TYPE_CHECKING, Any, Mapping

from twisted.internet.defer import maybeDeferred
from twisted.logger import ILogObserver, Logger

from uptrakitd import __version__
from uptrakitd.registry.admin_tokens import AdminTokenRegistry
from uptrakitd.audit import ANCHOR_FILE, AuditTrail
from uptrakitd.cluster import Cluster, build_cluster
from uptrakitd.channel.hub import RENEWAL_CHECK_SECONDS, ChannelHub
from uptrakitd.config import Settings, is_proxy_protocol
from uptrakitd.registry.directory import ServiceDirectory
from uptrakitd.registry.enrollment import EnrollmentTokens
from uptrakitd.events import CaRotated, CertificateRevoked, EventBus, ServiceChanged
from uptrakitd.process.gcpolicy import FullCollections
from uptrakitd.process.lifecycle import Hooks, OrderedServices, PeriodicJob, SignalHandlers
from uptrakitd.listen.endpoint import ListenerService
from uptrakitd.listen.closing import ClosingTLSFactory
from uptrakitd.listen.guard import ConnectionGuard
from uptrakitd.listen.server_cert import ServerCertificate
from uptrakitd.listen.tls import SwappableServerContext
from uptrakitd.observability.logs import log_observer
from uptrakitd.observability.metrics import Metrics
from uptrakitd.process.offload import in_thread
from uptrakitd.pki.authority import CertificateAuthority
from uptrakitd.pki.crl import CrlPublisher
from uptrakitd.pki.files import PkiFiles
from uptrakitd.pki.ocsp import OcspResponder
from uptrakitd.pki.worker import PkiWorker
from uptrakitd.observability.readiness import Readiness
from uptrakitd.process.reload import ConfigReloader
from uptrakitd.registry.retention import Retention
from uptrakitd.registry.runtime_settings import RuntimeSettings
from uptrakitd.process.sdnotify import Notifier
from uptrakitd.observability.status_metrics import state_families
from uptrakitd.store import PostgresStore, SqliteStore, make_store
from uptrakitd.store.common import safe_url
from uptrakitd.trust.identity import IdentityResolver
from uptrakitd.trust.proxies import is_trusted
from uptrakitd.web.api.audit import AuditRoutes, unknown_token
from uptrakitd.web.api.cluster import ControllerRoutes
from uptrakitd.web.api.identity import NetworkSettingsRoutes
from uptrakitd.web.api.overview import DiagnosticsRoutes, OverviewRoutes, RotationProgress, SessionRoutes
from uptrakitd.web.api.pki_admin import CertificateRoutes, PkiSettingsRoutes
from uptrakitd.web.api.services import ServiceRoutes
from uptrakitd.web.api.status import StatusRoutes, healthz
from uptrakitd.web.api.tokens import TokenRoutes
from uptrakitd.web.ocsp_fast import OcspFastPath
from uptrakitd.web.pki import PkiRoutes
from uptrakitd.web.root import build_sites
from uptrakitd.web.router import route
from uptrakitd.web.ui_routes import UiRoutes

if TYPE_CHECKING:   # the composition root is handed the start-up's result; it never runs boot itself
    from uptrakitd.process.boot import Booted

log = Logger()
HOUR, DAY = 3600, 86400


class Daemon(OrderedServices):
    """uptrakitd as a Twisted service tree; its attributes name the components (for tests and tools)."""

    settings: Settings
    store: SqliteStore | PostgresStore
    bus: EventBus
    metrics: Metrics
    ca: CertificateAuthority
    crls: CrlPublisher
    pki_worker: PkiWorker
    ocsp: OcspResponder
    fast_ocsp: OcspFastPath
    server_cert: ServerCertificate
    audit: AuditTrail
    retention: Retention
    tls: SwappableServerContext
    runtime: RuntimeSettings
    directory: ServiceDirectory
    enrollment_tokens: EnrollmentTokens
    admin_tokens: AdminTokenRegistry
    channel: ChannelHub
    readiness: Readiness
    resolver: IdentityResolver
    reloader: ConfigReloader
    https: ListenerService
    pki_listener: ListenerService | None
    https_site: Any                 # its resource is the HTTPS router (docs/reference/http-api.md is made from it)
    cluster: Cluster              # the other controllers (SharedDatabase with PostgreSQL), or none
    full_collections: FullCollections   # the real daemon process only (gcpolicy)

    def setServiceParent(self, parent: Any) -> Any:
        # twistd asks the application for an ILogObserver before installing its own text observer
        if hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, log_observer(self.settings.log_format, self.settings.log_level,
                                                           sys.stdout))
        return super().setServiceParent(parent)

    def listening_ports(self) -> list[Any]:
        """The bound ports, HTTPS first (empty until the listeners started)."""
        return [s.port for s in (self.https, self.pki_listener) if s is not None and s.port is not None]


def build_daemon(booted: Booted, reactor: Any, flags: dict[str, Any] | None = None,
                 handle_sigterm: bool = False, environ: Mapping[str, str] | None = None,
                 manage_gc: bool = False) -> Daemon:
    """Wire every component for `booted` state on `reactor`; nothing runs until startService()."""
    settings, state = booted.settings, booted.state
    d = Daemon()
    d.settings = settings
    run_blocking = partial(in_thread, reactor)
    d.metrics = metrics = Metrics()
    d.bus = bus = EventBus(on_failure=lambda event: metrics.event_subscriber_failures.labels(event).inc())
    d.store = store = make_store(settings.data_dir, settings.database, reactor, booted.controller_id)
    d.cluster = cluster = build_cluster(settings, booted, store, reactor, metrics)
    # every security action, in the transaction of its change (audit.py); checkpoints signed by the active CA
    d.audit = audit = AuditTrail(store, cluster.controller_id, reactor, run_blocking,
                                 lambda: (state.active().generation, state.active().signer),
                                 settings.data_dir / ANCHOR_FILE, safe_url(settings.database or "sqlite"))
    d.runtime = runtime = RuntimeSettings(store, bus, booted.network, booted.service_certs, audit)
    files = PkiFiles(settings.data_dir)
    # CRL signatures, and issuing's CSR checks and signatures, in the PKI worker process, off the reactor
    d.pki_worker = pki_worker = PkiWorker(reactor)
    d.crls = crls = CrlPublisher(state, store, files, reactor, run_blocking, worker=pki_worker.submit)
    stale_crls = crls.publish_at_start(booted.crl_numbers,
                                       datetime.datetime.fromtimestamp(reactor.seconds(), datetime.timezone.utc))
    metrics.crl_lag.set_function(crls.lag_seconds)
    d.ocsp = ocsp = OcspResponder(state, reactor, metrics.ocsp_responses, signer=settings.ocsp_signer,
                                   log_answers=settings.log_level == "debug", nonce_rate=settings.ocsp_nonce_rate,
                                   signing_share=settings.ocsp_signing_share, stale=cluster.stale,
                                   run_blocking=run_blocking)
    ocsp.prepare()
    d.ca = ca = CertificateAuthority(state, store, bus, metrics, files, reactor, run_blocking, runtime.pki_addr,
                                     settings.trust_domain, booted.keys, worker=pki_worker.submit, audit=audit)
    d.tls = tls = SwappableServerContext()
    d.server_cert = server_cert = ServerCertificate(ca, files, tls, booted.server_cert, booted.server_key,
                                                    (booted.hostname, settings.san), run_blocking,
                                                    on_install=metrics.tls_context_installs.inc,
                                                    on_refused=lambda reason: metrics.client_certificates_refused
                                                    .labels(reason).inc())
    server_cert.install()
    metrics.ca_generation.set_function(lambda: state.active().generation)
    several = cluster.controller_id if cluster.shared else None
    d.directory = directory = ServiceDirectory(store, ca, runtime, bus, reactor, booted.services, controller_id=several,
                                               audit=audit)
    d.enrollment_tokens = EnrollmentTokens(store, audit)
    d.admin_tokens = AdminTokenRegistry(store, booted.admin_tokens, booted.admin_token_names, audit)
    d.channel = channel = ChannelHub(directory, ca, runtime, metrics, reactor, settings.trust_domain,
                                     renewals_per_second=settings.rotation_renewal_rate,
                                     close_grace=settings.limits.close_grace,
                                     barrier=cluster.barrier if cluster.shared else None)
    metrics.services_connected.set_function(lambda: len(channel.connected))
    d.readiness = readiness = Readiness(store, ca, crls, cluster.freshness)
    metrics.watch(lambda: state_families(ca, crls, server_cert, channel, readiness, reactor))
    d.reloader = ConfigReloader(flags or {}, settings, runtime)
    proxy_protocol = is_proxy_protocol(settings.https_listen)
    d.resolver = IdentityResolver(lambda: runtime.network, state, directory, settings.trust_domain, reactor,
                                  metrics, forwarded_headers=not proxy_protocol or settings.proxy_protocol_trust_headers,
                                  stale=cluster.stale)
    _subscribe(d, cluster)
    https_site, pki_site = _sites(d, booted, cluster, reactor)
    d.https_site = https_site
    _services(d, booted, cluster, reactor, run_blocking, https_site, pki_site, stale_crls, handle_sigterm,
              manage_gc, environ)
    return d


def _subscribe(d: Daemon, cluster: Cluster) -> None:
    """Who hears which event, in the order the effects must happen (events.py)."""
    bus = d.bus
    # effects of a revocation: OCSP, CRL, the socket that used the certificate, the checked-header cache
    for on_revoked in (d.ocsp.on_revoked, d.crls.on_revoked, d.channel.on_revoked, d.resolver.verified.on_revoked):
        bus.subscribe(CertificateRevoked, on_revoked)
    # effects of a rotation, in this order: OCSP cache, CRLs, TLS context, the other controllers, the services
    for on_rotated in (d.ocsp.on_ca_rotated, d.crls.on_ca_rotated, d.server_cert.on_ca_rotated):
        bus.subscribe(CaRotated, on_rotated)
    cluster.attach(d.ca, d.directory, d.runtime, d.admin_tokens, d.channel, bus)
    bus.subscribe(CaRotated, d.channel.on_ca_rotated)
    bus.subscribe(CaRotated, d.resolver.verified.on_ca_rotated)
    bus.subscribe(ServiceChanged, d.channel.on_service_changed)


def _sites(d: Daemon, booted: Booted, cluster: Cluster, reactor: Any) -> tuple[Any, Any]:
    """The HTTPS site (every route) and the plain-HTTP PKI site."""
    settings, ca, crls, channel, directory = d.settings, d.ca, d.crls, d.channel, d.directory
    d.fast_ocsp = fast_ocsp = OcspFastPath(d.ocsp, reactor, d.metrics.http_requests)
    pki_routes = PkiRoutes(ca, crls, d.ocsp, fast_ocsp).routes()
    rotation = RotationProgress(ca, directory, channel)
    status_routes = StatusRoutes(d.readiness, d.metrics, settings.metrics_require_auth, d.admin_tokens.check)
    https_routes = (status_routes.routes() + NetworkSettingsRoutes(d.runtime, booted.state).routes()
                    + PkiSettingsRoutes(ca, crls, d.runtime).routes() + CertificateRoutes(ca).routes()
                    + ServiceRoutes(directory, channel, ca).routes()
                    + TokenRoutes(d.enrollment_tokens, d.admin_tokens).routes()
                    + OverviewRoutes(ca, crls, d.runtime, directory, channel, d.server_cert, rotation).routes()
                    + rotation.routes() + DiagnosticsRoutes(d.resolver.doctor, d.runtime).routes()
                    + SessionRoutes(d.admin_tokens).routes() + AuditRoutes(d.store, partial(d.audit.checkpoint_if_due, force=True)).routes()
                    + ControllerRoutes(d.store, directory.controller_id, booted.hostname, reactor.seconds(),
                                       lambda: cluster.leader, lambda: len(channel.connected), reactor,
                                       cluster.describe if cluster.shared else None).routes()
                    + UiRoutes().routes() + pki_routes)
    # the plain-HTTP PKI listener answers readiness too: a load balancer in front of OCSP must see a
    # controller that cannot vouch for its answers (docs/high-availability.md)
    return build_sites(https_routes, [route("GET", r"/healthz", healthz),
                                      route("GET", r"/readyz", status_routes.readyz)] + pki_routes,
                       channel.resources, d.resolver, d.admin_tokens.check, settings.limits.request_head_timeout,
                       {"head_timeouts": d.metrics.http_head_timeouts, "bodies_refused": d.metrics.http_bodies_refused,
                        "http_requests": d.metrics.http_requests,
                        "tls_handshake_failures": d.metrics.tls_handshake_failures},
                       settings.access_log, fast_ocsp, settings.limits.close_grace,
                       catch_up=cluster.catch_up if cluster.shared else None, describe_admin=d.admin_tokens.describe,
                       on_unknown_token=unknown_token(d.audit))


def _services(d: Daemon, booted: Booted, cluster: Cluster, reactor: Any, run_blocking: Any, https_site: Any,
              pki_site: Any, stale_crls: bool, handle_sigterm: bool, manage_gc: bool,
              environ: Mapping[str, str] | None) -> None:
    """The service tree, in start order (stopped in reverse)."""
    settings, metrics, ca, crls, store = d.settings, d.metrics, d.ca, d.crls, d.store

    def guarded(factory: Any, what: str, wrap: bool = True) -> ConnectionGuard:
        guard = ConnectionGuard(factory, what, settings.limits,
                                lambda ip: is_trusted(ip, d.runtime.network.trusted_proxies),
                                metrics.connections_refused, reactor, wrap)
        metrics.connections_open.labels(what).set_function(lambda: guard.open)
        return guard

    SignalHandlers(reactor, partial(_reload, d), handle_term=handle_sigterm).setServiceParent(d)
    if manage_gc:   # process-wide: only the real daemon process (a test process runs several daemons)
        d.full_collections = collections = FullCollections(reactor, metrics.registry)
        Hooks("garbage collection", start=collections.start, stop=collections.stop).setServiceParent(d)
    Hooks("data-dir lock", stop=booted.lock.release).setServiceParent(d)
    Hooks("store", start=store.start, stop=store.close).setServiceParent(d)
    cluster.add_to(d, store, run_blocking)   # several controllers: leadership, change feed, barrier, catch-up
    me = {"kind": "controller", "id": cluster.controller_id}
    Hooks("audit", start=lambda: d.audit.record("controller.started", me, {"version": __version__}).addErrback(
              lambda f: log.warn("audit: the start could not be recorded ({error})", error=f.getErrorMessage())),
          stop=lambda: (d.audit.flush_sign_in_failures(), d.audit.record("controller.stopped", me))[1].addErrback(
              lambda f: log.warn("audit: the stop could not be recorded ({error})", error=f.getErrorMessage()))
          ).setServiceParent(d)
    PeriodicJob("audit checkpoint", 60, cluster.on_leader(d.audit.checkpoint_if_due), reactor).setServiceParent(d)
    if settings.audit_retention_days:
        PeriodicJob("daily audit pruning", DAY,
                    cluster.on_leader(lambda: d.audit.prune_by_age(settings.audit_retention_days)), reactor,
                    run_at_start=True).setServiceParent(d)
    Hooks("crl-worker", start=lambda: reactor.callWhenRunning(_warm, crls, stale_crls),
          stop=lambda: maybeDeferred(crls.stop).addBoth(d.pki_worker.retire)).setServiceParent(d)
    PeriodicJob("hourly CRL rebuild", HOUR, crls.rebuild, reactor).setServiceParent(d)
    PeriodicJob("daily CA check", DAY, cluster.on_leader(ca.check_expiry), reactor,
                run_at_start=True).setServiceParent(d)
    PeriodicJob("daily server certificate check", DAY, d.server_cert.check_due, reactor,
                run_at_start=True).setServiceParent(d)
    PeriodicJob("daily record pruning", DAY, ca.prune_expired_records, reactor, run_at_start=True).setServiceParent(d)
    d.retention = Retention(store, d.audit, reactor, settings.certificate_retention_days, d.metrics.pruned_rows)
    PeriodicJob("daily retention", DAY, cluster.on_leader(d.retention.run), reactor,
                run_at_start=True).setServiceParent(d)
    Hooks("channel", stop=d.channel.stop).setServiceParent(d)
    PeriodicJob("renewal check", RENEWAL_CHECK_SECONDS, d.channel.check_renewals, reactor).setServiceParent(d)
    PeriodicJob("readiness check", 30, d.readiness.check, reactor).setServiceParent(d)
    d.https = ListenerService(reactor, settings.https_listen,
                              guarded(ClosingTLSFactory(d.tls, False, https_site, reactor,
                                                        settings.limits.close_grace), "HTTPS"), "HTTPS",
                              proxy_senders=lambda ip: is_trusted(ip, settings.proxy_protocol_senders),
                              refuse_sender=lambda ip: metrics.connections_refused.labels(
                                  "HTTPS", "not_a_proxy_protocol_sender").inc(),
                              backlog=settings.limits.listen_backlog)
    d.https.setServiceParent(d)
    d.pki_listener = None
    if (pki_endpoint := settings.pki_listen_endpoint()) is not None:
        d.pki_listener = ListenerService(reactor, pki_endpoint, guarded(pki_site, "plain-HTTP PKI", wrap=False),
                                         "plain-HTTP PKI", backlog=settings.limits.listen_backlog)
        d.pki_listener.setServiceParent(d)
    Hooks("setup warnings", start=partial(_warn_about_setup, booted)).setServiceParent(d)
    systemd = Notifier(os.environ if environ is None else environ)
    Hooks("systemd", start=lambda: reactor.callWhenRunning(systemd.ready), stop=systemd.stopping).setServiceParent(d)
    if systemd.watchdog_seconds:
        PeriodicJob("systemd watchdog", systemd.watchdog_seconds / 2, systemd.watchdog, reactor).setServiceParent(d)


def _reload(d: Daemon) -> Any:
    """SIGHUP: the config file, and the admin tokens (a break-glass `uptrakitctl tokens admin create --data-dir`
    wrote one into the database)."""
    d.admin_tokens.reload().addErrback(lambda f: log.failure("SIGHUP: could not re-read the admin tokens", f))
    return d.reloader.reload()


def _warm(crls: CrlPublisher, rebuild: bool) -> None:
    if rebuild:   # the stored CRLs are being served: replace them now that the listeners are up
        crls.rebuild().addErrback(lambda f: log.failure("CRL rebuild after start failed", f))
    else:
        crls.warm().addErrback(lambda f: log.failure("CRL worker warm-up failed", f))


def _installed(command: str) -> str:
    """The full path of one of this installation's commands (it lives in the venv, often not on PATH)."""
    beside = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), command)
    return beside if os.path.exists(beside) else command


def _warn_about_setup(booted: Booted) -> None:
    net, settings = booted.network, booted.settings
    if net.trusts_everything():
        log.warn("network.trusted_proxies contains 0.0.0.0/0 or ::/0: ANY client can claim any identity "
                 "through forwarded headers")
    if net.pki_addr and net.pki_addr.startswith("http://") and settings.pki_http is None:
        log.warn("pki_addr {addr} is http:// but --pki-http is unset: nothing here serves the PKI over "
                 "plain HTTP (use --pki-http listener, or --pki-http external if something else does)",
                 addr=net.pki_addr)
    if is_proxy_protocol(settings.https_listen):
        senders = ", ".join(str(n) for n in settings.proxy_protocol_senders)
        if settings.proxy_protocol_trust_headers and net.trusted_proxies:
            log.warn("PROXY-protocol listener with --proxy-protocol-trust-headers: a client whose PROXY-reported "
                     "address is a --trusted-proxy may present client-certificate headers; accepted PROXY "
                     "senders: {senders}", senders=senders)
        else:
            log.info("PROXY-protocol listener: PROXY headers accepted only from {senders}; forwarded "
                     "client-certificate headers are ignored (identity comes from mTLS)", senders=senders)
    clear = [ca for ca in booted.state.generations.values() if ca.custody == "file"]
    if clear:
        log.warn("the CA private key(s) of generation(s) {generations} are clear files in {directory} (mode 0600): "
                 "whoever reads the data dir or a backup of it can mint identities. Seal them: stop the daemon, "
                 "`{keys} seal --data-dir {data_dir} --ca-key-encryption-key-file FILE` (a file of "
                 "`head -c 32 /dev/urandom | base64`, mode 0600), then start it with --ca-key-encryption-key-file "
                 "FILE", generations=", ".join(str(ca.generation) for ca in clear),
                 directory=str((settings.data_dir / "pki").resolve()), data_dir=str(settings.data_dir),
                 keys=_installed("uptrakitd-keys"))
    log.info("admin token file: {path}", path=str(booted.admin_token_path.resolve()))
