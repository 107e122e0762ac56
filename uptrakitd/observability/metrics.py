"""Prometheus metrics, one registry per daemon (so several daemons can live in one test process).

No `*_created` series (they double every counter for no alerting value); `process_*` from
prometheus_client's ProcessCollector; state that changes without an event (expiry dates, CRL age,
who is still on the previous CA) is read at scrape time by `StateCollector`.
"""
from __future__ import annotations

import platform
from typing import Any, Callable, Iterator

from prometheus_client import (CollectorRegistry, Counter, Gauge, Info, ProcessCollector, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()


class CounterChildren:
    """A labelled counter incremented on a hot path: prometheus_client's `labels()` takes a lock and builds
    its key on every call, more than the increment itself; the children are kept here instead."""

    def __init__(self, counter: Counter | None) -> None:
        self.counter = counter   # None: count nothing
        self._children: dict[tuple[str, ...], Any] = {}

    def inc(self, *labels: str) -> None:
        if self.counter is None:
            return
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self.counter.labels(*labels)
        child.inc()


class Metrics:
    """The daemon's counters and gauges."""

    def __init__(self) -> None:
        from twisted import copyright

        from uptrakitd import __version__
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        Info("uptrakit_build", "uptrakitd build", registry=self.registry).info(
            {"version": __version__, "twisted": copyright.version, "python": platform.python_version()})
        self.ocsp_responses = Counter("uptrakit_ocsp_responses", "OCSP responses by status",
                                      ["status"], registry=self.registry)
        self.pruned_rows = Counter("uptrakit_pruned_rows", "Rows deleted past their retention, by table",
                                   ["table"], registry=self.registry)
        self.revocations = Counter("uptrakit_revocations", "Certificates revoked, by reason",
                                   ["reason"], registry=self.registry)
        self.headers_removed = Counter("uptrakit_forwarded_headers_removed",
                                       "Untrusted forwarded headers removed, by header family",
                                       ["family"], registry=self.registry)
        self.identity_decisions = Counter("uptrakit_identity_decisions", "Identity decisions by source, outcome "
                                          "and rejection code", ["source", "outcome", "code"],
                                          registry=self.registry)
        self.http_requests = Counter("uptrakit_http_requests", "HTTP requests answered, by route, method and status",
                                     ["route", "method", "status"], registry=self.registry)
        self.tls_handshake_failures = Counter("uptrakit_tls_handshake_failures", "TLS handshakes that failed, by "
                                              "reason", ["reason"], registry=self.registry)
        self.client_certificates_refused = Counter("uptrakit_tls_client_certificates_refused", "Client "
                                                   "certificates refused in the handshake, by reason", ["reason"],
                                                   registry=self.registry)
        self.ca_generation = Gauge("uptrakit_ca_active_generation", "Active CA generation", registry=self.registry)
        self.services_connected = Gauge("uptrakit_services_connected", "Authenticated service sockets",
                                        registry=self.registry)
        self.slow_consumers = Counter("uptrakit_channel_slow_consumers", "Sockets dropped for not reading",
                                      registry=self.registry)
        self.event_subscriber_failures = Counter("uptrakit_event_subscriber_failures",
                                                 "Event subscribers that raised, by event", ["event"],
                                                 registry=self.registry)
        self.cluster_changes = Counter("uptrakit_cluster_changes", "Changes made by other controllers on the same "
                                       "database, by kind and result (applied, failed)", ["kind", "result"],
                                       registry=self.registry)
        self.cluster_leader = Gauge("uptrakit_cluster_leader", "1 while this controller runs the once-per-database "
                                    "jobs (always 1 with SQLite)", registry=self.registry)
        self.connections_refused = Counter("uptrakit_connections_refused", "Connections refused at accept, by "
                                           "listener and cap (global, per_ip)", ["listener", "reason"],
                                           registry=self.registry)
        self.connections_open = Gauge("uptrakit_connections_open", "Open connections by listener", ["listener"],
                                      registry=self.registry)
        self.http_head_timeouts = Counter("uptrakit_http_head_timeouts", "Connections closed for not sending a "
                                          "complete request head in time", registry=self.registry)
        self.renewals_deferred = Counter("uptrakit_renewals_deferred", "Certificate renewals answered "
                                         "renewal_deferred: more than --rotation-renewal-rate a second asked",
                                         registry=self.registry)
        self.renewals_refused_early = Counter("uptrakit_renewals_refused_early", "Renewals refused "
                                              "renewal_not_due: unprompted, outside the renewal window, past the "
                                              "service's allowance", registry=self.registry)
        self.renewals_asked_again = Counter("uptrakit_renewals_asked_again", "Deferred renewals the controller "
                                            "asked for again (request_cert_renewal) because the service did not "
                                            "come back at its moment", registry=self.registry)
        self.http_bodies_refused = Counter("uptrakit_http_bodies_refused", "Requests refused (413) for a body "
                                           "larger than the route takes", registry=self.registry)
        self.crl_lag = Gauge("uptrakit_crl_lag_seconds", "How long the served CRLs have lacked a revocation "
                             "(0 when they include every one)", registry=self.registry)
        self.tls_context_installs = Counter("uptrakit_tls_context_installs", "TLS contexts installed",
                                            registry=self.registry)

    def watch(self, collect: Callable[[], Iterator[Any]]) -> None:
        """Add metric families computed at scrape time by `collect`."""
        self.registry.register(StateCollector(collect))

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)


class StateCollector(Collector):
    """Families computed at scrape time."""

    def __init__(self, collect: Callable[[], Iterator[Any]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Any]:
        return self._collect()


def gauge(name: str, documentation: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    """A gauge family for a StateCollector."""
    return GaugeMetricFamily(name, documentation, labels=labels)
