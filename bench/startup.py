"""Start-up with many stored certificate rows (issue 25): time until `twistd -n uptrakit` listens, its resident
memory once listening, and the rows it loaded, at ROWS stored rows against a reference run with ROWS / 20, in one
script. Most rows are expired (a fleet's history): 5 % are valid, a tenth of those revoked.

Run: .venv/bin/python bench/startup.py [ROWS]   (default 1000000; building the rows takes a minute)
Target (issue 25): listening < 2 s at 1,000,000 rows, no row loaded that cannot matter.
"""
from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, free_port  # noqa: E402

TWISTD = str(Path(sys.executable).with_name("twistd"))


def start(cwd: str, port: int) -> tuple[subprocess.Popen, float, str]:
    """twistd in cwd: (process, seconds until it logged listening, its log so far)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log_path = Path(cwd) / "daemon.log"
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        # (--certificate-retention-days 0: the rows stay for every start; the daily pruning would delete most)
        proc = subprocess.Popen([TWISTD, "--pidfile=", "-n", "uptrakit", "--https-listen",
                                 f"tcp:{port}:interface=127.0.0.1", "--certificate-retention-days", "0"], cwd=cwd,
                                env=env, stdout=log_file, stderr=subprocess.STDOUT)
    while time.perf_counter() - started < 120:
        log = log_path.read_text()
        if "HTTPS listening on" in log:
            return proc, time.perf_counter() - started, log
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    raise SystemExit("the daemon did not start:\n" + log_path.read_text()[-3000:])


def first_answer(port: int) -> float:
    """Seconds until /healthz answers (the reactor may still be busy with start-up work after listening)."""
    import http.client
    import ssl
    started = time.perf_counter()
    context = ssl._create_unverified_context()   # only the timing matters here
    while time.perf_counter() - started < 120:
        try:
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=60, context=context)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return time.perf_counter() - started
        except OSError:
            time.sleep(0.01)
    return float("nan")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(30)


def fill(database: Path, rows: int) -> None:
    """`rows` certificate rows for 5,000 services: 95 % expired, 5 % valid (a tenth of those revoked)."""
    now = int(time.time())
    conn = sqlite3.connect(database)
    services = [str(uuid.uuid4()) for _ in range(5000)]
    conn.executemany("INSERT INTO services (id, kind, hostname, status, created_at) VALUES (?, 'agent', ?, "
                     "'approved', ?)", [(s, f"host-{n}", now - 400 * 86400) for n, s in enumerate(services)])
    pem = "-----BEGIN CERTIFICATE-----\n" + "A" * 600 + "\n-----END CERTIFICATE-----\n"   # a row's real size

    def row(n: int) -> tuple:
        expired = n < rows * 0.95
        not_after = now - random.randint(1, 365 * 86400) if expired else now + random.randint(3600, 7 * 86400)
        revoked = not expired and n % 10 == 0
        return (f"{random.getrandbits(159) | 1 << 158:040X}", services[n % 5000], "client", 1,
                not_after - 7 * 86400, not_after, pem, not_after - 7 * 86400, now - 60 if revoked else None,
                "keyCompromise" if revoked else None)
    for start_at in range(0, rows, 100_000):
        conn.executemany("INSERT INTO certificates (serial, service_id, purpose, ca_generation, not_before, "
                         "not_after, cert_pem, issued_at, revoked_at, revocation_reason) VALUES "
                         "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [row(n) for n in range(start_at, min(rows, start_at + 100_000))])
        conn.commit()
    conn.close()


def measure(rows: int) -> dict:
    cwd = tempfile.mkdtemp(prefix="uptrakit-bench-startup-")
    port = free_port()
    proc, _, _ = start(cwd, port)   # the first start makes the data dir
    stop(proc)
    built = time.perf_counter()
    fill(Path(cwd) / "uptrakit-data" / "uptrakit.sqlite3", rows)
    built = time.perf_counter() - built
    times, rss, answering, logs = [], [], [], ""
    for _ in range(3):
        proc, seconds, log = start(cwd, port)
        answering.append(seconds + first_answer(port))
        time.sleep(1.0)
        rss.append(rss_mib(proc.pid))
        times.append(seconds)
        logs = log
        stop(proc)
    loaded = next((line.split("loaded ")[1].split(" certificate")[0] for line in logs.splitlines()
                   if "certificate records" in line and "loaded " in line), "?")
    return {"rows": rows, "listening_s": sorted(times)[1], "rss_mib": sorted(rss)[1], "loaded": loaded,
            "built_s": built, "answering_s": sorted(answering)[1]}


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    reference, big = measure(rows // 20), measure(rows)
    print(f"{'stored rows':>12} {'listening s':>12} {'answering s':>12} {'RSS MiB':>8} {'rows loaded':>12}")
    for r in (reference, big):
        print(f"{r['rows']:>12,} {r['listening_s']:>12.2f} {r['answering_s']:>12.2f} {r['rss_mib']:>8.0f} "
              f"{r['loaded']:>12}")
    print(f"ratio at {rows:,} vs {rows // 20:,}: listening x{big['listening_s'] / reference['listening_s']:.2f}, "
          f"RSS x{big['rss_mib'] / reference['rss_mib']:.2f} (median of 3 starts each)")


if __name__ == "__main__":
    main()
