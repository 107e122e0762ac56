"""Data that does not grow forever: certificate rows deleted `--certificate-retention-days` after they expired
(revoked ones too: CRLs stop listing a certificate a day after it expires), and enrollment tokens 30 days after
they were used up, expired or deleted.

Daily, on the controller that runs the once-per-database jobs. In batches of BATCH rows, each batch one
transaction in the store's thread with its `retention.pruned` audit entry, and a reactor turn between batches,
so the store's other work and the reactor go on; counted in `uptrakit_pruned_rows_total`. What memory holds
is pruned separately, on every controller (CaState.prune_expired).
"""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger

from uptrakitd.audit import AuditTrail, audited
from uptrakitd.store import certificates, tokens

log = Logger()
DAY = 86400
BATCH = 2000
TOKEN_RETENTION_DAYS = 30
MIN_CERTIFICATE_RETENTION_DAYS = 2   # a revoked certificate is on the CRL until a day after it expires


class Retention:
    """Deletes what is past its retention."""

    def __init__(self, store: Any, audit: AuditTrail | None, clock: Any, certificate_days: int,
                 counter: Any = None) -> None:
        self.store = store
        self.audit = audit
        self.clock = clock
        self.certificate_days = certificate_days
        self.counter = counter   # Counter with a `table` label, or None

    @inlineCallbacks
    def run(self) -> Any:
        """One pass; fires with {table: rows deleted}."""
        now = int(self.clock.seconds())
        done = {"certificates": 0, "enrollment_tokens": 0}
        if self.certificate_days > 0:
            done["certificates"] = yield self._prune("certificates", certificates.delete_expired,
                                                     now - self.certificate_days * DAY)
        done["enrollment_tokens"] = yield self._prune("enrollment_tokens", tokens.delete_spent_enrollment_tokens,
                                                      now - TOKEN_RETENTION_DAYS * DAY)
        if any(done.values()):
            log.info("retention: deleted {certificates} certificate rows expired over {days} days ago and "
                     "{enrollment_tokens} spent enrollment tokens", days=self.certificate_days, **done)
        return done

    @inlineCallbacks
    def _prune(self, table: str, delete: Any, before: int) -> Any:
        total = 0
        while True:
            gone = yield audited(self.audit, self.store, delete, before, BATCH, action="retention.pruned",
                                 obj={"kind": "table", "id": table},
                                 details=lambda gone: {"rows": len(gone), "before": before} if gone else None)
            total += len(gone)
            if self.counter is not None and gone:
                self.counter.labels(table).inc(len(gone))
            if len(gone) < BATCH:
                return total
            yield deferLater(self.clock, 0, lambda: None)   # a turn for the reactor between batches
