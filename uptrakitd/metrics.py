"""Prometheus metrics, one registry per daemon (so several daemons can live in one test process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    """The daemon's counters and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.ocsp_responses = Counter("uptrakit_ocsp_responses", "OCSP responses by status",
                                      ["status"], registry=self.registry)
        self.revocations = Counter("uptrakit_revocations", "Certificates revoked, by reason",
                                   ["reason"], registry=self.registry)
        self.headers_removed = Counter("uptrakit_forwarded_headers_removed",
                                       "Untrusted forwarded headers removed, by header family",
                                       ["family"], registry=self.registry)
        self.identity_decisions = Counter("uptrakit_identity_decisions", "Identity decisions by source and outcome",
                                          ["source", "outcome"], registry=self.registry)
        self.ca_generation = Gauge("uptrakit_ca_active_generation", "Active CA generation", registry=self.registry)
        self.services_connected = Gauge("uptrakit_services_connected", "Authenticated service sockets",
                                        registry=self.registry)
        self.slow_consumers = Counter("uptrakit_channel_slow_consumers", "Sockets dropped for not reading",
                                      registry=self.registry)
        self.event_subscriber_failures = Counter("uptrakit_event_subscriber_failures",
                                                 "Event subscribers that raised, by event", ["event"],
                                                 registry=self.registry)
        self.connections_refused = Counter("uptrakit_connections_refused", "Connections refused at accept, by "
                                           "listener and cap (global, per_ip)", ["listener", "reason"],
                                           registry=self.registry)
        self.connections_open = Gauge("uptrakit_connections_open", "Open connections by listener", ["listener"],
                                      registry=self.registry)
        self.http_head_timeouts = Counter("uptrakit_http_head_timeouts", "Connections closed for not sending a "
                                          "complete request head in time", registry=self.registry)
        self.http_bodies_refused = Counter("uptrakit_http_bodies_refused", "Requests refused (413) for a body "
                                           "larger than the route takes", registry=self.registry)
        self.crl_lag = Gauge("uptrakit_crl_lag_seconds", "How far the served CRLs are behind the newest "
                             "revocation (0 when they include it)", registry=self.registry)
        self.tls_context_installs = Counter("uptrakit_tls_context_installs", "TLS contexts installed",
                                            registry=self.registry)

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)
