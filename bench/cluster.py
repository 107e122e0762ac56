"""Several controllers on one PostgreSQL: how fast a revocation reaches the others, and OCSP with 1, 2, 3.

Run: .venv/bin/python bench/cluster.py [revocations]   (about a minute; needs Debian's postgresql, which
the script starts itself in a temp dir as the `postgres` user, like the tests do)

Three `twistd -n uptrakit` processes share one database. Propagation: a certificate is revoked through
controller A, then B's and C's OCSP responders are asked (nginx's GET form, one keep-alive connection
each, back to back) until both say `revoked`: the time from sending the revocation, and from A's
answer, to the last of them. OCSP throughput: client processes spread over 1, 2 or 3 controllers ask
for a cached answer (GET, keep-alive); answers per second and the controllers' CPU per answer, with the
ratio to one controller. Everything shares this machine's two cores, so compare within one run.
"""
from __future__ import annotations

import base64
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from common import ROOT, Daemon, enrolled_certificate

sys.path.insert(0, str(ROOT))
from tests.ha.postgres import PostgresCluster   # noqa: E402  (the same throw-away cluster as the tests)
from tests.helpers import blocking_get          # noqa: E402

REVOCATIONS = int(sys.argv[1]) if len(sys.argv) > 1 else 40
CLIENT_PROCESSES = 3
SECONDS = 5


def ocsp_path(cert: x509.Certificate, issuer: x509.Certificate) -> str:
    der = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build().public_bytes(
        serialization.Encoding.DER)
    return f"/api/v1/pki/ocsp/{quote(base64.b64encode(der).decode(), safe='')}"


def status_of(sock: object, path: str) -> ocsp.OCSPCertStatus:
    code, body = blocking_get(sock, path)
    assert code == 200, code
    return ocsp.load_der_ocsp_response(body).certificate_status


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def client(port: int, ca: str, path: str, seconds: float, out: multiprocessing.Queue) -> None:
    """One load process: cached OCSP GETs over one keep-alive TLS connection for `seconds`."""
    import socket
    import ssl
    ctx = ssl.create_default_context(cafile=ca)
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")
    done, until = 0, time.perf_counter() + seconds
    while time.perf_counter() < until:
        code, _ = blocking_get(sock, path)
        assert code == 200, code
        done += 1
    sock.close()
    out.put(done)


def throughput(daemons: list[Daemon], path: str) -> tuple[float, float]:
    """(answers per second, controllers' CPU ms per answer) with the client processes spread over `daemons`."""
    out: multiprocessing.Queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=client, args=(daemons[i % len(daemons)].port, daemons[0].ca, path,
                                                          SECONDS, out)) for i in range(CLIENT_PROCESSES)]
    cpu = sum(d.cpu_seconds() for d in daemons)
    start = time.perf_counter()
    for p in procs:
        p.start()
    answers = sum(out.get(timeout=SECONDS + 30) for _ in procs)
    for p in procs:
        p.join()
    wall = time.perf_counter() - start
    used = sum(d.cpu_seconds() for d in daemons) - cpu
    return answers / wall, used / answers * 1000


def main() -> None:
    cluster = PostgresCluster()
    daemons: list[Daemon] = []
    try:
        url = cluster.new_database()
        kek = Path(tempfile.mkdtemp(prefix="uptrakit-bench-kek-")) / "kek"
        kek.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        kek.chmod(0o600)
        for _ in range(3):   # one after the other: the first creates the CA and writes the admin token
            daemons.append(Daemon("--database", url, "--ca-key-encryption-key-file", str(kek)))
        a, b, c = daemons
        for d in (b, c):
            d.token = a.token
        work = tempfile.mkdtemp(prefix="uptrakit-bench-certs-")
        certs = [x509.load_pem_x509_certificate(enrolled_certificate(a, os.path.join(work, f"{i}.pem")).encode())
                 for i in range(REVOCATIONS + 1)]
        issuer = x509.load_pem_x509_certificate(Path(a.ca).read_bytes())
        sockets = {d: d.tls() for d in (b, c)}
        paths = [ocsp_path(cert, issuer) for cert in certs]
        for path in paths:   # every controller knows every certificate before the clock starts
            while any(status_of(s, path) != ocsp.OCSPCertStatus.GOOD for s in sockets.values()):
                time.sleep(0.01)

        from_send, from_ack = [], []
        for cert, path in zip(certs[1:], paths[1:]):
            sent = time.perf_counter()
            status, body = a.request("POST", f"/api/v1/certificates/{cert.serial_number:X}/revoke",
                                     {"reason": "keyCompromise"}, a.token)
            acked = time.perf_counter()
            assert status == 200, body
            pending = set(sockets)
            while pending:
                pending = {d for d in pending if status_of(sockets[d], path) != ocsp.OCSPCertStatus.REVOKED}
            seen = time.perf_counter()
            from_send.append((seen - sent) * 1000)
            from_ack.append((seen - acked) * 1000)
        for s in sockets.values():
            s.close()
        print(f"revocation through A until B and C both answer OCSP `revoked` ({REVOCATIONS} revocations, "
              "three controllers, one PostgreSQL, two cores)")
        print(f"{'measured from':28} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for label, values in (("the revocation request", from_send), ("A's 200 answer", from_ack)):
            print(f"{label:28} {statistics.median(values):8.1f} {percentile(values, 99):8.1f} {max(values):8.1f}")

        good = paths[0]
        throughput(daemons[:1], good)   # warm-up
        rows = [(n, *throughput(daemons[:n], good)) for n in (1, 2, 3)]
        print(f"\ncached OCSP GET (nginx's form), {CLIENT_PROCESSES} client processes on keep-alive connections, "
              f"{SECONDS} s each")
        print(f"{'controllers':>11} {'answers/s':>10} {'CPU ms/answer':>14} {'ratio to 1':>11}")
        for n, rate, cpu in rows:
            print(f"{n:>11} {rate:10.0f} {cpu:14.3f} {rate / rows[0][1]:10.2f}x")
    finally:
        for d in daemons:
            d.stop()
        cluster.destroy()


if __name__ == "__main__":
    main()
