"""HTTPS identity cost: the same route with and without a trusted proxy's client-certificate header.

Run: .venv/bin/python bench/identity.py   (about 45 s; prints req/s, server CPU per request, ratio)
The client runs on the same two cores, so compare the server CPU per request and the ratio within one run.
"""
from __future__ import annotations

import base64
import os
import statistics
import tempfile
import threading
import time
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from common import Daemon, enrolled_certificate, keepalive_get

REQUESTS = 6000
ROUNDS = 5
CLIENTS = 2


def load(daemon: Daemon, path: str, headers: dict[str, str]) -> tuple[float, float]:
    """(requests per second, server CPU ms per request) for REQUESTS keep-alive GETs from CLIENTS threads."""
    def worker(n: int) -> None:
        with daemon.tls() as s:
            for _ in range(n):
                assert keepalive_get(s, path, headers) == 200
    cpu, start = daemon.cpu_seconds(), time.perf_counter()
    threads = [threading.Thread(target=worker, args=(REQUESTS // CLIENTS,)) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, used = time.perf_counter() - start, daemon.cpu_seconds() - cpu
    return REQUESTS / wall, used / REQUESTS * 1000


def main() -> None:
    daemon = Daemon("--trusted-proxy", "127.0.0.1", "--forwarded-client-cert-pem-header", "X-SSL-Client-Cert")
    try:
        pem = enrolled_certificate(daemon, os.path.join(tempfile.mkdtemp(), "agent.pem"))
        cert = x509.load_pem_x509_certificate(pem.encode())
        nginx_form = quote(pem, safe="-_.~")
        der_b64 = base64.b64encode(cert.public_bytes(Encoding.DER)).decode()
        load(daemon, "/api/v1/whoami", {})   # warm-up
        cases = [("whoami, no header", "/api/v1/whoami", {}),
                 ("whoami, PEM header (nginx)", "/api/v1/whoami", {"X-SSL-Client-Cert": nginx_form}),
                 ("whoami, base64 DER header", "/api/v1/whoami", {"X-SSL-Client-Cert": der_b64}),
                 ("healthz, no header", "/healthz", {}),
                 ("healthz, PEM header (nginx)", "/healthz", {"X-SSL-Client-Cert": nginx_form})]
        runs: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in cases}
        for _ in range(ROUNDS):   # interleaved rounds: a busy neighbour hits every case alike
            for label, path, headers in cases:
                runs[label].append(load(daemon, path, headers))
        rows = [(label, statistics.median(r for r, _ in runs[label]), statistics.median(c for _, c in runs[label]))
                for label, _, _ in cases]
        base = {r[0].split(",")[0]: r for r in rows if "no header" in r[0]}
        print(f"median of {ROUNDS} interleaved rounds of {REQUESTS} keep-alive GETs ({CLIENTS} clients)")
        print(f"{'route':32} {'req/s':>8} {'server CPU ms/req':>18} {'req/s ratio':>12} {'CPU ratio':>10}")
        for label, rps, cpu in rows:
            ref = base[label.split(",")[0]]
            print(f"{label:32} {rps:8.0f} {cpu:18.3f} {rps / ref[1]:11.2f}x {ref[2] / cpu:9.2f}x")
    finally:
        daemon.stop()


if __name__ == "__main__":
    main()
