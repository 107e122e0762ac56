"""OCSP throughput and server CPU per answer, against `openssl ocsp -multi 2` on the same CA, in one run.

Run: .venv/bin/python bench/ocsp.py   (about 1.5 minutes; runs itself inside `unshare -n` because
`openssl ocsp -port` binds every interface: loopback of a private network namespace only; needs root)

Cases: nginx's form (GET, SHA-1 CertID, no nonce: answered from the cache) over new connections
(HTTP/1.0, as nginx sends it) and over one keep-alive connection; POST with a nonce (signed per
request), by the CA (the default) and by a delegated responder (`--ocsp-signer delegated`), both with
`--ocsp-nonce-rate 0 --ocsp-signing-share 0` (what signing costs, unlimited); and the same flood from one address against the default limit (100 signed answers
a second, the rest `tryLater`). openssl is restarted per case (its children spin after a client drops
a connection).

Two load clients, each against both servers: Python threads (the GIL caps them near 5,000 requests/s,
so against a fast server they measure themselves), and ApacheBench (`ab`, C, `apt-get install
apache2-utils`; skipped when absent) which sends every POST with the same nonce: both servers still
sign each one.
"""
from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))

SECONDS = 6
CLIENTS = 2
AB_CONCURRENCY = 8


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            # own time plus that of children already reaped (openssl -multi replaces its workers)
            total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


def family(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [int(p) for p in out]


def http(port: int, raw: bytes, keep: socket.socket | None = None) -> bytes:
    """Send one request; read one response (Content-Length or until close)."""
    s = keep or socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(raw)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while (length is None or len(body) < length) and (chunk := s.recv(65536)):
            body += chunk
            if length is None and keep is not None:
                break
        return head.split(b" ", 2)[1]
    finally:
        if keep is None:
            s.close()


def run_case(port: int, make: callable, keepalive: bool, pids: callable) -> tuple[float, float]:
    """(answers per second, server CPU ms per answer) over SECONDS with CLIENTS threads."""
    counts = [0] * CLIENTS
    stop = time.perf_counter() + SECONDS

    def worker(i: int) -> None:
        conn = socket.create_connection(("127.0.0.1", port), timeout=10) if keepalive else None
        try:
            while time.perf_counter() < stop:
                assert http(port, make(), conn) == b"200"
                counts[i] += 1
        finally:
            if conn:
                conn.close()
    before = cpu_of(pids())
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENTS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    used = cpu_of(pids()) - before
    n = sum(counts)
    return n / wall, used / n * 1000


def run_ab(port: int, raw: bytes, keepalive: bool, pids: callable, work: str) -> tuple[float, float]:
    """(answers per second, server CPU ms per answer) of `ab` replaying `raw`'s method, path and body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    method, path = head.split(b" ")[:2]
    args = ["ab", "-q", "-l", "-t", str(SECONDS), "-n", "10000000", "-c", str(AB_CONCURRENCY), "-r"]
    if keepalive:
        args.append("-k")
    if method == b"POST":
        Path(work, "body.der").write_bytes(body)
        args += ["-p", str(Path(work, "body.der")), "-T", "application/ocsp-request"]
    before = cpu_of(pids())
    out = subprocess.run(args + [f"http://127.0.0.1:{port}{path.decode()}"], capture_output=True, text=True).stdout
    used = cpu_of(pids()) - before
    done = int(re.search(r"Complete requests:\s+(\d+)", out).group(1))
    failed = int(re.search(r"Failed requests:\s+(\d+)", out).group(1))
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    assert failed == 0 and non2xx is None, out
    return float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1)), used / done * 1000


def main() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp
    from common import Daemon, enrolled_certificate, free_port
    # throughput: every nonce answer signed (no per-address limit); the last row runs with the default limit
    daemon = Daemon("--pki-addr", f"http://127.0.0.1:{free_port()}", "--pki-http", "listener", "--ocsp-nonce-rate", "0",
                    "--ocsp-signing-share", "0")
    delegated = Daemon("--pki-addr", f"http://127.0.0.1:{free_port()}", "--pki-http", "listener",
                       "--ocsp-signer", "delegated", "--ocsp-nonce-rate", "0",
                       "--ocsp-signing-share", "0")
    limited = Daemon("--pki-addr", f"http://127.0.0.1:{free_port()}", "--pki-http", "listener")
    work = tempfile.mkdtemp(prefix="uptrakit-ocsp-")
    use_ab = shutil.which("ab") is not None
    try:
        def setup(d: Daemon, name: str) -> tuple[int, x509.Certificate, x509.Certificate]:
            port = int(d.request("GET", "/api/v1/settings/pki", token=d.token)[1]["pki_addr"].rsplit(":", 1)[1])
            leaf = x509.load_pem_x509_certificate(enrolled_certificate(d, os.path.join(work, name)).encode())
            return port, leaf, x509.load_pem_x509_certificates(Path(d.ca).read_bytes())[0]
        pki_port, leaf, ca = setup(daemon, "leaf.pem")
        delegated_port, delegated_leaf, delegated_ca = setup(delegated, "delegated-leaf.pem")
        limited_port, limited_leaf, limited_ca = setup(limited, "limited-leaf.pem")
        der = ocsp.OCSPRequestBuilder().add_certificate(leaf, ca, hashes.SHA1()).build().public_bytes(
            serialization.Encoding.DER)
        encoded = quote(base64.b64encode(der).decode(), safe="")

        def nonce_requests(leaf: x509.Certificate, ca: x509.Certificate, path: str) -> callable:
            """Requests with fresh nonces, built before the clock starts (building one costs the client ~0.1 ms)."""
            pool = []
            for _ in range(500):
                body = (ocsp.OCSPRequestBuilder().add_certificate(leaf, ca, hashes.SHA256())
                        .add_extension(x509.OCSPNonce(os.urandom(16)), critical=False).build()
                        .public_bytes(serialization.Encoding.DER))
                pool.append((f"POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/ocsp-request\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
            counter = iter(range(1 << 62))
            return lambda: pool[next(counter) % len(pool)]

        # openssl's responder over the same CA and the same certificate
        expiry = leaf.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
        Path(work, "index.txt").write_text(f"V\t{expiry}\t\t{leaf.serial_number:X}\tunknown\t/CN=bench\n")
        Path(work, "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        shutil.copy(Path(daemon.dir, "uptrakit-data", "pki", "ca-1.key"), Path(work, "ca.key"))
        ossl_port = free_port()

        def start_openssl() -> subprocess.Popen:
            # its -multi children outlive a killed parent and spin at 100 % CPU: they are killed first
            proc = subprocess.Popen(["openssl", "ocsp", "-index", "index.txt", "-CA", "ca.crt", "-rsigner", "ca.crt",
                                     "-rkey", "ca.key", "-port", str(ossl_port), "-multi", "2", "-nmin", "60"],
                                    cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # no connect-probe: a connection dropped without a request leaves an openssl child spinning
            time.sleep(1.0)
            return proc

        def measure(port: int, make: callable, keep: bool, pids: callable, client: str) -> tuple[float, float]:
            if client == "ab":
                return run_ab(port, make(), keep, pids, work)
            return run_case(port, make, keep, pids)

        def openssl_run(make: callable, client: str) -> tuple[float, float]:
            proc = start_openssl()
            try:
                return measure(ossl_port, make, False, lambda: family(proc.pid), client)
            finally:
                for pid in family(proc.pid)[1:] + [proc.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
        get10 = lambda: f"GET /api/v1/pki/ocsp/{encoded} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode()  # noqa: E731
        get11 = lambda: f"GET /api/v1/pki/ocsp/{encoded} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()  # noqa: E731
        ossl_get = lambda: f"GET /{encoded} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode()  # noqa: E731
        ours = lambda: family(daemon.proc.pid)  # noqa: E731
        theirs = lambda: family(delegated.proc.pid)  # noqa: E731
        # (label, port, request, keep-alive, daemon's processes, openssl's request or "same as the row above")
        cases = [("GET nginx form, new connections", pki_port, get10, False, ours, ossl_get),
                 ("GET nginx form, keep-alive", pki_port, get11, True, ours, None),
                 ("POST nonce, CA signs (default)", pki_port, nonce_requests(leaf, ca, "/api/v1/pki/ocsp"), False, ours,
                  nonce_requests(leaf, ca, "/")),
                 ("POST nonce, --ocsp-signer delegated", delegated_port,
                  nonce_requests(delegated_leaf, delegated_ca, "/api/v1/pki/ocsp"), False, theirs, "above"),
                 # one address far over the default --ocsp-nonce-rate (100/s): what a flood costs the daemon
                 ("POST nonce flood, default limit", limited_port,
                  nonce_requests(limited_leaf, limited_ca, "/api/v1/pki/ocsp"), False,
                  lambda: family(limited.proc.pid), "above")]
        for client in (["python", "ab"] if use_ab else ["python"]):
            rows = []
            for label, port, make, keep, pids, make_ossl in cases:
                if keep and client == "ab":
                    continue   # ab -k asks HTTP/1.0 keep-alive, which twisted.web does not do: new connections again
                http(port, make())      # warm the cache
                rps, cpu = measure(port, make, keep, pids, client)
                if make_ossl == "above":
                    o_rps, o_cpu = rows[-1][3], rows[-1][4]
                elif make_ossl is not None:
                    o_rps, o_cpu = openssl_run(make_ossl, client)
                else:
                    o_rps, o_cpu = rows[0][3], float("nan")
                rows.append((label, rps, cpu, o_rps, o_cpu))
            print()
            print(f"client: {'ab -c %d' % AB_CONCURRENCY if client == 'ab' else '%d Python threads' % CLIENTS}, "
                  f"{SECONDS} s per case; openssl ocsp -multi 2 over new connections (HTTP/1.0) as the reference")
            print(f"{'case':36} {'uptrakitd/s':>11} {'CPU ms':>7} {'openssl/s':>10} {'CPU ms':>7} {'ratio':>6}")
            for label, rps, cpu, o_rps, o_cpu in rows:
                o_cpu_text = f"{o_cpu:7.3f}" if o_cpu > 0 else "    n/a"   # workers that exit take their CPU time along
                print(f"{label:36} {rps:11.0f} {cpu:7.3f} {o_rps:10.0f} {o_cpu_text} {rps / o_rps:5.2f}x")
        if not use_ab:
            print("\n(ab not found: apt-get install apache2-utils for the C client's rows)")
    finally:
        daemon.stop()
        delegated.stop()
        limited.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if os.environ.get("UPTRAKIT_BENCH_NETNS") != "1":
        os.execvp("unshare", ["unshare", "-n", "sh", "-c", f"ip link set lo up && UPTRAKIT_BENCH_NETNS=1 exec "
                              f"{sys.executable} {' '.join(sys.argv)}"])
    main()
