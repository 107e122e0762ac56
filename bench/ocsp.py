"""OCSP throughput and server CPU per answer, against `openssl ocsp -multi 2` on the same CA, in one run.

Run: .venv/bin/python bench/ocsp.py   (about a minute; runs itself inside `unshare -n` because
`openssl ocsp -port` binds every interface: loopback of a private network namespace only; needs root)

Cases: nginx's form (GET, SHA-1 CertID, no nonce: answered from the cache) over new connections
(HTTP/1.0, as nginx sends it) and over one keep-alive connection; POST with a nonce (signed per
request). openssl is restarted per case (its children spin after a client drops a connection).
"""
from __future__ import annotations

import base64
import os
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


def main() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp
    from common import Daemon, enrolled_certificate, free_port
    daemon = Daemon("--pki-addr", f"http://127.0.0.1:{free_port()}", "--pki-http", "listener")
    work = tempfile.mkdtemp(prefix="uptrakit-ocsp-")
    try:
        pki_port = int(daemon.request("GET", "/api/v1/settings/pki", token=daemon.token)[1]["pki_addr"].rsplit(":", 1)[1])
        leaf = x509.load_pem_x509_certificate(enrolled_certificate(daemon, os.path.join(work, "leaf.pem")).encode())
        data = Path(daemon.dir, "uptrakit-data", "pki")
        ca = x509.load_pem_x509_certificates(Path(daemon.ca).read_bytes())[0]
        sha1 = ocsp.OCSPRequestBuilder().add_certificate(leaf, ca, hashes.SHA1()).build()
        der = sha1.public_bytes(serialization.Encoding.DER)
        get_path = "/api/v1/pki/ocsp/" + quote(base64.b64encode(der).decode(), safe="")

        def nonce_request() -> bytes:
            return (ocsp.OCSPRequestBuilder().add_certificate(leaf, ca, hashes.SHA256())
                    .add_extension(x509.OCSPNonce(os.urandom(16)), critical=False).build()
                    .public_bytes(serialization.Encoding.DER))
        # openssl's responder over the same CA and the same certificate
        expiry = leaf.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
        Path(work, "index.txt").write_text(f"V\t{expiry}\t\t{leaf.serial_number:X}\tunknown\t/CN=bench\n")
        Path(work, "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        shutil.copy(data / "ca-1.key", Path(work, "ca.key"))
        ossl_port = free_port()

        def start_openssl() -> subprocess.Popen:
            # its -multi children outlive a killed parent and spin at 100 % CPU: they are killed first
            proc = subprocess.Popen(["openssl", "ocsp", "-index", "index.txt", "-CA", "ca.crt", "-rsigner", "ca.crt",
                                     "-rkey", "ca.key", "-port", str(ossl_port), "-multi", "2", "-nmin", "60"],
                                    cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # no connect-probe: a connection dropped without a request leaves an openssl child spinning
            time.sleep(1.0)
            return proc

        ours = lambda: family(daemon.proc.pid)  # noqa: E731
        get10 = lambda: f"GET {get_path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode()  # noqa: E731
        get11 = lambda: f"GET {get_path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()  # noqa: E731
        ossl_get = "/" + quote(base64.b64encode(der).decode(), safe="")

        def post(path: str, version: str) -> callable:
            def make() -> bytes:
                body = nonce_request()
                return (f"POST {path} HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: application/ocsp-request\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            return make
        rows = []
        for label, make_ours, make_ossl, keep in [
                ("GET nginx form, new connections", get10,
                 lambda: f"GET {ossl_get} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode(), False),
                ("GET nginx form, keep-alive", get11, None, True),
                ("POST with nonce, new connections", post("/api/v1/pki/ocsp", "1.0"), post("/", "1.0"), False)]:
            http(pki_port, make_ours())      # warm the cache
            rps, cpu = run_case(pki_port, make_ours, keep, ours)
            if make_ossl is not None:
                proc = start_openssl()
                try:
                    o_rps, o_cpu = run_case(ossl_port, make_ossl, False, lambda: family(proc.pid))
                finally:
                    for pid in family(proc.pid)[1:] + [proc.pid]:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    proc.wait()
            else:
                o_rps = o_cpu = float("nan")
            rows.append((label, rps, cpu, o_rps, o_cpu))
        ref = rows[0][3]
        print(f"{SECONDS} s per case, {CLIENTS} client threads; openssl ocsp -multi 2 over new connections "
              f"(HTTP/1.0) as the reference")
        print(f"{'case':34} {'uptrakitd/s':>11} {'CPU ms':>7} {'openssl/s':>10} {'CPU ms':>7} {'ratio':>6}")
        for label, rps, cpu, o_rps, o_cpu in rows:
            other = o_rps if o_rps == o_rps else ref
            o_cpu_text = f"{o_cpu:7.3f}" if o_cpu > 0 else "    n/a"   # workers that exit take their CPU time along
            print(f"{label:34} {rps:11.0f} {cpu:7.3f} {o_rps:10.0f} {o_cpu_text} {rps / other:5.2f}x")
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if os.environ.get("UPTRAKIT_BENCH_NETNS") != "1":
        os.execvp("unshare", ["unshare", "-n", "sh", "-c", f"ip link set lo up && UPTRAKIT_BENCH_NETNS=1 exec "
                              f"{sys.executable} {' '.join(sys.argv)}"])
    main()
