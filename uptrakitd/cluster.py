"""Several controllers on one PostgreSQL: what another controller changed, applied here.

`ClusterSync.apply` receives the change-log rows other controllers wrote (store/changes.py, read by
store.postgresql.ChangeFeed) and makes this controller agree with the database, through the same
domain methods and events a local change uses: a revocation made on A closes the socket on B, fails
B's next handshake and changes B's OCSP answer; a rotation made on A swaps B's TLS context and tells
B's services. Each change names a row; the row is read again, so applying twice changes nothing.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from .admin_tokens import AdminTokenRegistry
from .channel.hub import ChannelHub
from .directory import ServiceDirectory
from .errors import StorageUnavailable
from .metrics import Metrics
from .pki.authority import CertificateAuthority
from .runtime_settings import RuntimeSettings
from .store.changes import Change

log = Logger()


class ClusterSync:
    """Applies other controllers' changes, in order; a change that fails is logged and counted."""

    def __init__(self, ca: CertificateAuthority, directory: ServiceDirectory, runtime: RuntimeSettings,
                 admin_tokens: AdminTokenRegistry, channel: ChannelHub, metrics: Metrics) -> None:
        self.ca = ca
        self.directory = directory
        self.runtime = runtime
        self.admin_tokens = admin_tokens
        self.channel = channel
        self.metrics = metrics
        self.applied = 0

    @inlineCallbacks
    def apply(self, changes: list[Change]) -> Any:
        """Apply a batch, oldest first (the feed waits for this before reading on); fires with how many
        were dealt with. The database being unreachable stops the batch there: the feed tries the rest
        again (nothing is skipped); any other failure is logged and counted, and the batch goes on."""
        for done, change in enumerate(changes):
            try:
                yield self._apply_one(change)
            except StorageUnavailable:
                log.warn("cannot apply change {seq} ({kind}) yet: the database cannot be reached; trying again",
                         seq=change.seq, kind=change.kind)
                return done
            except Exception:
                log.failure("could not apply change {seq} ({kind} {key}) from controller {origin}",
                            seq=change.seq, kind=change.kind, key=change.key, origin=change.origin)
                self.metrics.cluster_changes.labels(change.kind, "failed").inc()
            else:
                self.metrics.cluster_changes.labels(change.kind, "applied").inc()
                self.applied += 1
        return len(changes)

    def _apply_one(self, change: Change) -> Any:
        kind, key = change.kind, change.key
        if kind in ("certificate", "revoked"):
            return self.ca.adopt_certificate(key)
        if kind == "ca":
            return self.ca.adopt_generation(int(key))
        if kind == "service":
            return self.directory.refresh(key)
        if kind == "connected":
            d = self.directory.refresh(key)
            d.addCallback(lambda _: self.channel.connected_elsewhere(key, change.seq, change.origin))
            return d
        if kind == "settings":
            return self.runtime.reload(key)
        if kind == "admin_tokens":
            return self.admin_tokens.reload()
        log.warn("ignoring change {seq} of unknown kind {kind} (a newer controller on the same database?)",
                 seq=change.seq, kind=kind)
        return None
