"""Other controllers, behind one seam: `Cluster`.

Components see other controllers only through the Cluster they are given: `controller_id`, `stale()` (past
`--cluster-max-staleness`: OCSP answers tryLater, identities are refused), `on_leader(job)` (once-per-database
jobs), `barrier(generation)` (renewals wait until every controller trusts a new CA) and `catch_up(unknown)`
(a certificate or service made elsewhere a moment ago). `build_cluster` makes the right one, and
`Cluster.add_to(tree)` adds what it runs to the service tree, once:

- `Cluster` itself: one controller alone (the embedded SQLite), where nothing is stale, this controller always
  leads, nothing is waited for and nothing is caught up;
- `SharedDatabase`: several controllers on one PostgreSQL (sync.py applies the others' changes through the
  domain methods; postgresql.py holds the leader lock and reads the change log).
"""
from __future__ import annotations

from typing import Any

from .alone import Cluster
from .shared import SharedDatabase
from .sync import CATCH_UP_SECONDS, MAX_CATCH_UPS, ClusterFreshness, ClusterSync, TrustedGeneration

__all__ = ["CATCH_UP_SECONDS", "MAX_CATCH_UPS", "Cluster", "ClusterFreshness", "ClusterSync",
           "TrustedGeneration", "build_cluster"]


def build_cluster(settings: Any, booted: Any, store: Any, reactor: Any, metrics: Any) -> Cluster:
    """The Cluster for these settings: alone with SQLite, shared with --database."""
    if not settings.database:
        return Cluster(booted.controller_id).with_metrics(metrics)
    return SharedDatabase(settings, booted, store, reactor, metrics)
