"""CRL benchmark: revoke-call latency and CRL rebuild time at 1k/10k/100k revoked entries, the same CRL
made by `openssl ca -gencrl` from an index of the same entries with the same CA key, and the longest
reactor stall during a 100k rebuild compared with an idle reference window.

Run: .venv/bin/python bench/crl.py      (about 15 seconds here; prints figures, asserts nothing)
Targets (issue 3): revoke p99 < 50 ms at 100k; reactor stall < 100 ms during the rebuild. Issue 24: revoke p99
< 2 ms at 100k with its audit entry (half the revocations run with the trail off, interleaved, for the
no-entry column). Issue 11: the
rebuild no slower than `openssl ca -gencrl`. Each openssl run is a new process that reads its index,
builds every entry and signs. The daemon's warm rebuild is what the hourly rebuild and each revocation
cost (the worker keeps the built entries); the cold one starts the worker and builds every entry, as
happens once after start-up or after the worker died.
"""
from __future__ import annotations

import datetime
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import reactor, task  # noqa: E402
from twisted.internet.defer import inlineCallbacks  # noqa: E402

from uptrakitd.process.boot import boot  # noqa: E402
from uptrakitd.config import build_settings  # noqa: E402
from uptrakitd.process.daemon import Daemon, build_daemon  # noqa: E402
from uptrakitd.pki.state import CertRecord  # noqa: E402
from uptrakitd.pki.serials import format_serial  # noqa: E402

SIZES = [1_000, 10_000, 100_000]
REVOKES_PER_SIZE = 200


def add_revoked(controller: Daemon, count: int, service_id: str) -> None:
    """Bulk-load `count` revoked records of generation 1 (synthetic serials; the CRL only needs those)."""
    now = int(time.time())
    rows, records = [], []
    for _ in range(count):
        serial = random.getrandbits(120) | (1 << 119)
        records.append(CertRecord(serial, service_id, "client", 1, now - 60, now + 86400, now - 30, "keyCompromise"))
        rows.append((format_serial(serial), service_id, "client", 1, now - 60, now + 86400, "-", now, now - 30,
                     "keyCompromise"))
    import sqlite3
    db = sqlite3.connect(controller.settings.data_dir / "uptrakit.sqlite3")
    db.executemany("INSERT INTO certificates (serial, service_id, purpose, ca_generation, not_before, not_after, "
                   "cert_pem, issued_at, revoked_at, revocation_reason) VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
    db.commit()
    db.close()
    for r in records:
        controller.ca.state.add_record(r)


def add_live(controller: Daemon, count: int, service_id: str) -> list[int]:
    now = int(time.time())
    serials, rows = [], []
    for _ in range(count):
        serial = random.getrandbits(120) | (1 << 119)
        serials.append(serial)
        controller.ca.state.add_record(CertRecord(serial, service_id, "client", 1, now - 60, now + 86400))
        rows.append((format_serial(serial), service_id, "client", 1, now - 60, now + 86400, "-", now))
    import sqlite3
    db = sqlite3.connect(controller.settings.data_dir / "uptrakit.sqlite3")
    db.executemany("INSERT INTO certificates (serial, service_id, purpose, ca_generation, not_before, not_after, "
                   "cert_pem, issued_at) VALUES (?,?,?,?,?,?,?,?)", rows)
    db.commit()
    db.close()
    return serials


class StallMeter:
    """Ticks every 5 ms on the reactor and remembers the longest gap between ticks."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.longest = 0.0
        self.loop = task.LoopingCall(self.tick)

    def tick(self) -> None:
        now = time.perf_counter()
        self.longest = max(self.longest, now - self.last)
        self.last = now

    def start(self) -> None:
        self.last, self.longest = time.perf_counter(), 0.0
        self.loop.start(0.005)

    def stop(self) -> float:
        self.loop.stop()
        return self.longest


OPENSSL_CONFIG = """[ ca ]
default_ca = bench
[ bench ]
database = index.txt
crlnumber = crlnumber
certificate = ca.crt
private_key = ca.key
default_md = sha384
default_crl_days = 7
"""


def openssl_gencrl(controller: Daemon, work: str) -> tuple[float, int]:
    """(median seconds of 3 runs, CRL bytes) for `openssl ca -gencrl` over every revoked record of generation 1."""
    from cryptography.hazmat.primitives.serialization import Encoding
    Path(work).mkdir(exist_ok=True)
    ca = controller.ca.state.generations[1]
    Path(work, "ca.crt").write_bytes(ca.cert.public_bytes(Encoding.PEM))
    Path(work, "ca.key").write_bytes((controller.settings.data_dir / "pki" / "ca-1.key").read_bytes())
    Path(work, "openssl.cnf").write_text(OPENSSL_CONFIG)
    Path(work, "index.txt.attr").write_text("unique_subject = no\n")

    def stamp(ts: int) -> str:
        return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%y%m%d%H%M%SZ")
    lines = []
    for r in controller.ca.state.records.values():
        if r.revoked_at is not None and r.ca_generation == 1:
            serial = format(r.serial, "X")
            serial = "0" * (len(serial) % 2) + serial
            lines.append(f"R\t{stamp(r.not_after)}\t{stamp(r.revoked_at)},{r.reason or 'unspecified'}\t{serial}"
                         f"\tunknown\t/CN=bench\n")
    Path(work, "index.txt").write_text("".join(lines))
    times = []
    for _ in range(3):
        Path(work, "crlnumber").write_text("01\n")
        start = time.perf_counter()
        subprocess.run(["openssl", "ca", "-gencrl", "-config", "openssl.cnf", "-out", "crl.pem"], cwd=work,
                       check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    der = subprocess.run(["openssl", "crl", "-in", "crl.pem", "-outform", "DER"], cwd=work, check=True,
                         capture_output=True).stdout
    return statistics.median(times), len(der)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


@inlineCallbacks
def main() -> None:
    tmp = tempfile.mkdtemp(prefix="uptrakit-bench-")
    settings = build_settings({"data_dir": os.path.join(tmp, "data"), "https_listen": "tcp:0:interface=127.0.0.1"})
    controller = build_daemon(boot(settings), reactor, {})
    controller.startService()
    token = yield controller.enrollment_tokens.create("bench", auto_approve=True)
    service, _ = yield controller.directory.enroll("agent", "bench", token["token"])
    loaded = 0
    print(f"{'revoked':>8} {'revoke p50 ms':>14} {'revoke p99 ms':>14} {'no-entry p99':>13} {'rebuild cold s':>15} {'rebuild warm s':>15}"
          f" {'CRL bytes':>10} {'openssl s':>10} {'openssl bytes':>14} {'cold/openssl':>13} {'warm/openssl':>13}")
    stall_line = ""
    for size in SIZES:
        add_revoked(controller, size - loaded - REVOKES_PER_SIZE if size > loaded + REVOKES_PER_SIZE else 0,
                    service.id)
        loaded = size - REVOKES_PER_SIZE
        live = add_live(controller, REVOKES_PER_SIZE, service.id)
        latencies, bare = [], []   # with its audit entry (the daemon's way), and without (the trail off)
        trail = controller.ca.audit
        for n, serial in enumerate(live):
            controller.ca.audit = trail if n % 2 == 0 else None   # interleaved: both see the same machine
            start = time.perf_counter()
            yield controller.ca.revoke(serial, "keyCompromise")
            (latencies if n % 2 == 0 else bare).append((time.perf_counter() - start) * 1000)
        controller.ca.audit = trail
        loaded = size
        controller.crls.stop()
        controller.crls._stopped = False
        meter = StallMeter()
        if size == SIZES[-1]:
            meter.start()
            yield task.deferLater(reactor, 0.5, lambda: None)
            idle_stall = meter.stop()
            meter = StallMeter()
            meter.start()
        start = time.perf_counter()
        yield controller.crls.rebuild()
        cold = time.perf_counter() - start
        if size == SIZES[-1]:
            rebuild_stall = meter.stop()
            stall_line = (f"100k rebuild: longest reactor stall {rebuild_stall * 1000:.1f} ms "
                          f"(idle reference window {idle_stall * 1000:.1f} ms, ratio {rebuild_stall / idle_stall:.1f}x)")
        start = time.perf_counter()
        yield controller.crls.rebuild()
        warm = time.perf_counter() - start
        crl = controller.crls.current[1]
        assert crl.entries >= size, (crl.entries, size)
        ossl, ossl_bytes = openssl_gencrl(controller, os.path.join(tmp, "openssl"))
        print(f"{size:>8} {statistics.median(latencies):>14.2f} {pct(latencies, 99):>14.2f} {pct(bare, 99):>13.2f} "
              f"{cold:>15.2f} "
              f"{warm:>15.2f} {len(crl.der):>10} {ossl:>10.2f} {ossl_bytes:>14} {cold / ossl:>12.2f}x "
              f"{warm / ossl:>12.2f}x")
    print(stall_line)
    yield controller.stopService()
    # start-up with 100k revoked records: the stored CRLs are served, the rebuild runs after listening
    start = time.perf_counter()
    again = build_daemon(boot(settings), reactor, {}, environ={})
    again.startService()
    listening = time.perf_counter() - start
    stored = again.crls.current[1].number
    yield task.deferLater(reactor, 0, lambda: None)
    while again.crls.current[1].number == stored:
        yield task.deferLater(reactor, 0.05, lambda: None)
    rebuilt = time.perf_counter() - start
    print(f"start-up at {SIZES[-1]} revoked: listening after {listening:.2f} s (stored CRLs served), "
          f"fresh CRLs after {rebuilt:.2f} s")
    yield again.stopService()
    reactor.stop()


if __name__ == "__main__":
    reactor.callWhenRunning(lambda: main().addErrback(lambda f: (f.printTraceback(), reactor.stop())))
    reactor.run()
