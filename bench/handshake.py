"""New TLS handshakes with and without a client certificate: daemon CPU per handshake, in one run.

Run: .venv/bin/python bench/handshake.py    (about 20 s)
Session resumption is off on purpose (a resumed session would skip the revocation check in the
verify callback and outlive a TLS context swap), so every reconnect pays a full handshake.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Daemon, enrolled_certificate, keepalive_get  # noqa: E402

HANDSHAKES = 600
CLIENTS = 2
ROUNDS = 3


def storm(daemon: Daemon, cert: str | None) -> tuple[float, float]:
    """(handshakes per second, daemon CPU ms per handshake + one GET)."""
    def worker(n: int) -> None:
        for _ in range(n):
            with daemon.tls(cert=cert) as s:
                assert keepalive_get(s, "/healthz") == 200
    cpu, start = daemon.cpu_seconds(), time.perf_counter()
    threads = [threading.Thread(target=worker, args=(HANDSHAKES // CLIENTS,)) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return HANDSHAKES / (time.perf_counter() - start), (daemon.cpu_seconds() - cpu) / HANDSHAKES * 1000


def main() -> None:
    daemon = Daemon()
    try:
        pem = os.path.join(tempfile.mkdtemp(), "agent.pem")
        enrolled_certificate(daemon, pem)
        storm(daemon, None)
        runs: dict[str, list[tuple[float, float]]] = {"TLS (server certificate only)": [], "mTLS (client certificate)": []}
        for _ in range(ROUNDS):
            runs["TLS (server certificate only)"].append(storm(daemon, None))
            runs["mTLS (client certificate)"].append(storm(daemon, pem))
        print(f"median of {ROUNDS} interleaved rounds of {HANDSHAKES} new connections (one GET each), {CLIENTS} clients")
        print(f"{'handshake':32} {'per second':>11} {'daemon CPU ms':>14}")
        rows = {k: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
        for label, (rps, cpu) in rows.items():
            print(f"{label:32} {rps:11.0f} {cpu:14.2f}")
        tls, mtls = rows["TLS (server certificate only)"][1], rows["mTLS (client certificate)"][1]
        print(f"mTLS / TLS daemon CPU: {mtls / tls:.2f}x")
    finally:
        daemon.stop()


if __name__ == "__main__":
    main()
