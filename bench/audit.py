"""What the audit trail costs: entries appended per second through the daemon's SQLite store (group commit,
the chain's head read in each transaction), bytes per entry on disk, and a revocation's time with and
without its entry, in one run.

Run: .venv/bin/python bench/audit.py [ENTRIES]   (default 20000)
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twisted.internet import defer, reactor, task  # noqa: E402

from uptrakitd import store  # noqa: E402
from uptrakitd.audit import AuditTrail  # noqa: E402
from uptrakitd.process.offload import in_thread  # noqa: E402


@defer.inlineCallbacks
def run(entries: int) -> object:
    work = Path(tempfile.mkdtemp(prefix="uptrakit-bench-audit-"))
    path = work / "uptrakit.sqlite3"
    store.open_and_migrate(path).close()
    s = store.SqliteStore(path, reactor)
    s.start()
    trail = AuditTrail(s, "bench", reactor, lambda f, *a: in_thread(reactor, f, *a), lambda: (1, None))
    size_before = path.stat().st_size + (Path(str(path) + "-wal").stat().st_size if Path(str(path) + "-wal").exists()
                                         else 0)
    # 1. a flood: 64 writers at once, as a rotation's renewals arrive (group commit shares their fsyncs)
    started, cpu = time.perf_counter(), time.process_time()
    pending = []
    for n in range(entries):
        pending.append(trail.record("certificate.issued", {"kind": "certificate", "id": f"{n:040X}"},
                                    {"purpose": "client", "service_id": "3f0b3c1e-7a4e-4b8e-9a51-0d1e2f3a4b5c",
                                     "ca_generation": 2, "not_after": "2026-12-10T09:38:29+00:00"},))
        if len(pending) >= 64:
            yield defer.gatherResults(pending)
            pending = []
    yield defer.gatherResults(pending)
    wall, used = time.perf_counter() - started, time.process_time() - cpu
    conn = store.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages = conn.execute("SELECT sum(pgsize) FROM dbstat WHERE name IN ('audit_log', 'audit_log_action', "
                         "'audit_log_at')").fetchone()[0] if _has_dbstat(conn) else None
    conn.close()
    size_after = path.stat().st_size
    print(f"{entries} entries, 64 writers at once: {entries / wall:,.0f} entries/s, "
          f"{used / entries * 1e6:.0f} µs CPU per entry (this process: reactor + store thread)")
    print(f"on disk: {(size_after - size_before) / entries:.0f} bytes per entry (file growth)"
          + (f", {pages / entries:.0f} bytes per entry in the table and its indexes" if pages else ""))
    # 2. one write alone, with and without its entry (the fsync dominates both)
    alone, bare = [], []
    for n in range(200):
        t = time.perf_counter()
        yield trail.record("certificate.revoked", {"kind": "certificate", "id": f"R{n}"}, {"reason": "keyCompromise"})
        alone.append(time.perf_counter() - t)
        t = time.perf_counter()
        yield s.run(lambda conn, n=n: conn.execute("INSERT INTO settings (key, value) VALUES (?, '1') "
                                                   "ON CONFLICT(key) DO UPDATE SET value = '2'", (f"k{n}",)))
        bare.append(time.perf_counter() - t)
    q = lambda xs: statistics.quantiles(xs, n=100)   # noqa: E731
    print(f"one write with its entry: p50 {q(alone)[49] * 1e3:.2f} ms p99 {q(alone)[98] * 1e3:.2f} ms; "
          f"a write without one: p50 {q(bare)[49] * 1e3:.2f} ms p99 {q(bare)[98] * 1e3:.2f} ms")
    s.close()
    return None


def _has_dbstat(conn: object) -> bool:
    try:
        conn.execute("SELECT 1 FROM dbstat LIMIT 1")   # type: ignore[attr-defined]
        return True
    except Exception:
        return False


def main() -> None:
    entries = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    task.react(lambda _: run(entries))


if __name__ == "__main__":
    main()
