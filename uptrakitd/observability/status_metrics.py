"""Metric families read at scrape time: what an alert on expiry, CRL freshness or a stuck rotation needs."""
from __future__ import annotations

import datetime
from typing import Any, Iterator

from twisted.internet.interfaces import IReactorTime

from uptrakitd.channel.hub import ChannelHub
from uptrakitd.listen.server_cert import ServerCertificate
from uptrakitd.observability.metrics import gauge
from uptrakitd.pki.authority import CertificateAuthority
from uptrakitd.pki.crl import CrlPublisher
from uptrakitd.observability.readiness import Readiness


def state_families(ca: CertificateAuthority, crls: CrlPublisher, server_cert: ServerCertificate,
                   channel: ChannelHub, readiness: Readiness, clock: IReactorTime) -> Iterator[Any]:
    """Expiry of the trusted CAs and of the server certificate, CRL age and number, rotation progress."""
    now = clock.seconds()
    when = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    state = ca.state
    expiry = gauge("uptrakit_ca_expiry_timestamp_seconds", "When a trusted CA generation expires (Unix time)",
                   ["generation", "role"])
    for role, generation in (("active", state.active()), ("previous", state.previous(when))):
        if generation is not None:
            expiry.add_metric([str(generation.generation), role], generation.not_after.timestamp())
    yield expiry
    server = gauge("uptrakit_server_certificate_expiry_timestamp_seconds", "When the HTTPS server certificate "
                   "expires (Unix time)")
    server.add_metric([], server_cert.not_after().timestamp())
    yield server
    age = gauge("uptrakit_crl_age_seconds", "Seconds since each served CRL was signed", ["generation"])
    number = gauge("uptrakit_crl_number", "CRL number of each served CRL", ["generation"])
    for gen, crl in sorted(crls.current.items()):
        age.add_metric([str(gen)], now - crl.this_update.timestamp())
        number.add_metric([str(gen)], crl.number)
    yield age
    yield number
    validity = gauge("uptrakit_crl_validity_seconds", "nextUpdate - thisUpdate of the CRLs")
    validity.add_metric([], crls.validity.total_seconds())
    yield validity
    active = state.active().generation
    behind = sum(1 for proto in channel.connected.values()
                 if (record := state.records.get(proto.serial or 0)) is not None and record.ca_generation != active)
    previous = gauge("uptrakit_services_on_previous_ca", "Connected services still using a certificate of an "
                     "older CA generation (a rotation not yet followed)")
    previous.add_metric([], behind)
    yield previous
    rotating = gauge("uptrakit_ca_rotation_in_progress", "1 while a CA rotation runs")
    rotating.add_metric([], 1 if ca.rotating else 0)
    yield rotating
    if readiness.last:
        ready = gauge("uptrakit_ready", "1 when the latest readiness check (every 30 s, and each /readyz) "
                      "passed, per check", ["check"])
        for check, verdict in sorted(readiness.last.items()):
            ready.add_metric([check], 1 if verdict == "ok" else 0)
        yield ready
