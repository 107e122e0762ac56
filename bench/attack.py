"""Attacks from unauthenticated hosts against a real `twistd -n uptrakit`, with figures (asserts nothing).

Run: .venv/bin/python bench/attack.py      (about a minute; loopback only: 127.0.0.1 and 127.0.0.9)

1. Slow drip: 1,100 connections from 127.0.0.9 that send one TLS byte and then one byte every 2 s;
   how many the daemon holds, how many it refuses, and /healthz from 127.0.0.1 meanwhile (p50/p99/max,
   failures) against an idle reference run in the same script.
2. Bodies: three parallel `GET /api/v1/ws/agent` with `Content-Length: 200000000`, each trying to send
   20 MiB; the daemon's RSS before and after.
3. Fuzz: every JSON route with hostile bodies (lone surrogates included); count of 5xx answers.
4. Closed WebSockets: 8 sockets each send a close frame and then try to push 40 MiB without a TLS
   close_notify; what they got out before the cut, the daemon's RSS, and how many are still open
   2 s later. Then 4 threads stream 1-byte fragments for 20 s (reconnecting whenever cut) while
   /healthz is probed from another address.
5. Signing flood: 4 processes send OCSP POSTs with a nonce (each signed per request) over keep-alive
   connections from 50 addresses to the plain-HTTP PKI listener for 10 s; signed answers and tryLater a
   second, the daemon's CPU, and /healthz on the HTTPS listener meanwhile. Pass daemon flags after the
   script's name to compare (e.g. --ocsp-signing-share 0).
"""
from __future__ import annotations

import os
import re
import socket
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ATTACKER = "127.0.0.9"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def probe_healthz(server, count: int) -> tuple[list[float], int]:
    times, failures = [], 0
    for _ in range(count):
        start = time.perf_counter()
        try:
            if server.request("GET", "/healthz")[0] != 200:
                failures += 1
        except OSError:
            failures += 1
        times.append((time.perf_counter() - start) * 1000)
        time.sleep(0.02)
    return times, failures


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def drip(port: int, n: int, stop: threading.Event, counts: dict[str, int]) -> None:
    socks = []
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(ATTACKER, 0))
            s.sendall(b"\x16")
            socks.append(s)
        except OSError:
            counts["connect_failed"] += 1
    counts["opened"] = len(socks)
    while not stop.wait(2):
        for s in socks:
            try:
                s.sendall(b"\x03")
            except OSError:
                pass
    for s in socks:
        s.close()


def in_threads(work, count: int) -> None:
    """Run `work()` in `count` threads at once; return when all are done."""
    threads = [threading.Thread(target=work) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One masked client frame (RFC 6455 §5.2)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n) if n < 65536 \
        else bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def open_websocket(server, source: str = ATTACKER):
    s = server.tls(source)
    s.sendall(b"GET /api/v1/ws/agent HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    return s


def push(s, chunk: bytes, total: int, limit: float) -> int:
    """Bytes sent before the server cut the connection (or `total`, or what went out in `limit` s)."""
    sent, start = 0, time.monotonic()
    s.settimeout(1)
    while sent < total and time.monotonic() - start < limit:
        try:
            s.sendall(chunk)
            sent += len(chunk)
        except socket.timeout:
            continue
        except OSError:
            break
    return sent


def closed_websockets(server, daemon) -> None:
    before = rss_kib(daemon.pid)
    results: list[int] = []
    sockets = []

    def one() -> None:
        s = open_websocket(server)
        sockets.append(s)
        s.sendall(ws_frame(0x8, b"\x03\xe8"))
        results.append(push(s, ws_frame(0x2, b"x" * 60000, fin=False), 40 * 1024 * 1024, 30))
    in_threads(one, 8)
    after = rss_kib(daemon.pid)
    time.sleep(2)
    still = metric(server, 'uptrakit_connections_open{listener="HTTPS"}') - 1
    for s in sockets:
        s.close()
    print("8 WebSockets that sent a close, then try to push 40 MiB each without close_notify:")
    print(f"  MiB each got out before the cut {sorted(round(n / 1048576, 1) for n in results)}; daemon RSS "
          f"{before / 1024:.0f} -> {after / 1024:.0f} MiB; still open 2 s later: {still:.0f}")

    stop = threading.Event()
    fragments = ws_frame(0x1, b"{", fin=False) + ws_frame(0x0, b"x", fin=False) * 9000
    cuts = [0]

    def flood() -> None:
        while not stop.is_set():
            try:
                s = open_websocket(server)
                push(s, fragments, 1 << 40, 20)
                s.close()
                cuts[0] += 1
            except OSError:
                time.sleep(0.05)
    idle, _ = probe_healthz(server, 100)
    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    end, busy, failed = time.monotonic() + 20, [], 0
    while time.monotonic() < end:
        times, fails = probe_healthz(server, 10)
        busy += times
        failed += fails
    stop.set()
    for t in threads:
        t.join()
    print("4 sockets streaming 1-byte fragments for 20 s (reconnecting when cut):")
    print(f"  /healthz idle p50 {statistics.median(idle):.1f} ms p99 {pct(idle, 99):.1f} ms; during the flood p50 "
          f"{statistics.median(busy):.1f} ms p99 {pct(busy, 99):.1f} ms max {max(busy):.1f} ms ({failed} failed of "
          f"{len(busy)}); the flooders were cut {cuts[0]} times")


def _signing_client(port: int, body: bytes, first: int, seconds: float, out) -> None:
    """One load process: keep-alive POSTs from 50 addresses in turn; puts (signed, try_later) on `out`."""
    head = (f"POST /api/v1/pki/ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    socks = {}
    signed = later = 0
    end = time.monotonic() + seconds
    i = first
    while time.monotonic() < end:
        source = f"127.0.2.{1 + i % 50}"
        i += 1
        s = socks.get(source)
        try:
            if s is None:
                s = socks[source] = socket.create_connection(("127.0.0.1", port), timeout=5,
                                                             source_address=(source, 0))
            nonce = os.urandom(16)
            s.sendall(head + body[:-16] + nonce)
            data = b""
            while b"\r\n\r\n" not in data:
                data += s.recv(65536)
            length = int(re.search(rb"(?i)content-length: *(\d+)", data).group(1))
            rest = data.split(b"\r\n\r\n", 1)[1]
            while len(rest) < length:
                rest += s.recv(65536)
            if rest[:5] == b"\x30\x03\x0a\x01\x03":
                later += 1
            else:
                signed += 1
        except (OSError, AttributeError):
            socks.pop(source, None)
    out.put((signed, later))


def signing_flood(server, daemon, pki_port: int) -> None:
    import multiprocessing
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp
    ca = x509.load_pem_x509_certificate(Path(server.ca).read_bytes())
    # a serial this CA never issued: "unknown", signed per request like a nonce answer
    good = ocsp.OCSPRequestBuilder().add_certificate(ca, ca, hashes.SHA1()).build()
    body = (ocsp.OCSPRequestBuilder().add_certificate_by_hash(good.issuer_name_hash, good.issuer_key_hash, 0x5EED,
                                                               hashes.SHA1())
            .add_extension(x509.OCSPNonce(b"0" * 16), critical=False).build().public_bytes(serialization.Encoding.DER))
    assert body.endswith(b"0" * 16)
    idle, _ = probe_healthz(server, 100)
    out = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_signing_client, args=(pki_port, body, n * 13, 10.0, out)) for n in range(4)]
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    for p in procs:
        p.start()
    busy, failed = [], 0
    while time.monotonic() - t0 < 10:
        times, fails = probe_healthz(server, 10)
        busy += times
        failed += fails
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    wall, cpu = time.monotonic() - t0, server.cpu_seconds() - cpu0
    signed, later = sum(r[0] for r in results), sum(r[1] for r in results)
    print("nonce OCSP POSTs from 50 addresses, 4 processes, keep-alive, 10 s:")
    print(f"  signed {signed / wall:.0f}/s, tryLater {later / wall:.0f}/s; daemon CPU {100 * cpu / wall:.0f} % of a core")
    print(f"  /healthz idle p50 {statistics.median(idle):.1f} ms p99 {pct(idle, 99):.1f} ms; during p50 "
          f"{statistics.median(busy):.1f} ms p99 {pct(busy, 99):.1f} ms max {max(busy):.1f} ms ({failed} failed of {len(busy)})")


def metric(server, name: str) -> float:
    with server.tls() as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    total = 0.0
    for line in data.decode().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main() -> None:
    from common import Daemon, free_port
    pki_port = free_port()
    server = Daemon("--pki-http", "listener", "--pki-addr", f"http://127.0.0.1:{pki_port}", *sys.argv[1:])
    server.pki_port = pki_port
    daemon, port, token = server.proc, server.port, server.token
    try:

        idle, idle_fail = probe_healthz(server, 150)
        stop, counts = threading.Event(), {"connect_failed": 0, "opened": 0}
        attacker = threading.Thread(target=drip, args=(port, 1100, stop, counts))
        attacker.start()
        time.sleep(3)
        held_at_probe = metric(server, 'uptrakit_connections_open{listener="HTTPS"}') - 1
        busy, busy_fail = probe_healthz(server, 150)
        time.sleep(max(0.0, 13 - 3 - sum(busy) / 1000))   # past the request-head deadline
        held_later = metric(server, 'uptrakit_connections_open{listener="HTTPS"}') - 1
        refused = metric(server, 'uptrakit_connections_refused_total{listener="HTTPS",reason="per_ip"}')
        timeouts = metric(server, "uptrakit_http_head_timeouts_total")
        stop.set()
        attacker.join()
        print("slow drip from one address (1,100 connections, a byte every 2 s; per-address cap 64, head deadline 10 s):")
        print(f"  connections the daemon holds: {held_at_probe:.0f} at 3 s, {held_later:.0f} at 13 s; refused at "
              f"accept {refused:.0f}; cut for a slow head {timeouts:.0f}")
        print(f"  /healthz from another address: idle p50 {statistics.median(idle):.1f} ms p99 {pct(idle, 99):.1f} ms "
              f"max {max(idle):.1f} ms ({idle_fail} failed of {len(idle)}); under attack p50 "
              f"{statistics.median(busy):.1f} ms p99 {pct(busy, 99):.1f} ms max {max(busy):.1f} ms "
              f"({busy_fail} failed of {len(busy)}); p99 ratio {pct(busy, 99) / pct(idle, 99):.2f}x")

        before = rss_kib(daemon.pid)
        answers = []

        def big_body() -> None:
            try:
                with server.tls() as s:
                    s.sendall(b"GET /api/v1/ws/agent HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                              b"Sec-WebSocket-Version: 13\r\nContent-Length: 200000000\r\n\r\n")
                    sent = 0
                    try:
                        while sent < 20 * 1024 * 1024:
                            s.sendall(b"x" * 65536)
                            sent += 65536
                    except OSError:
                        pass
                    answers.append((s.recv(200).split(b"\r\n")[0].decode(errors="replace"), sent))
            except OSError as e:
                answers.append((type(e).__name__, 0))
        in_threads(big_body, 3)
        after = rss_kib(daemon.pid)
        print("three 200 MB bodies on the WebSocket route:")
        print(f"  answers {[a for a, _ in answers]}; bytes the clients got out before the close "
              f"{[round(n / 1048576, 1) for _, n in answers]} MiB")
        print(f"  daemon RSS {before / 1024:.0f} MiB before, {after / 1024:.0f} MiB after (+{(after - before) / 1024:.1f} MiB)")

        hostile = [b"", b"null", b"[]", b"\"t\"", b"{\"a\":", b"\xff\xfe", b"{\"name\": \"\\ud800\"}",
                   b"{\"name\": \"x\", \"kind\": \"\\udc00\"}", b"{\"friendly_name\": \"\\udfff\"}",
                   b"{\"reason\": {\"x\": 1}}", b"{\"trusted_proxies\": [null]}", b"[" * 5000 + b"]" * 5000,
                   b"{\"pki_addr\": \"http://b\\u00fccher..x\"}", b"{\"name\": \"v\", \"role\": \"read\"}",
                   b"{\"lifetime_hours\": 1e308}", b"{\"max_uses\": 99999999999999999999}"]
        routes = [("PUT", "/api/v1/settings/network"), ("PUT", "/api/v1/settings/service-certificates"),
                  ("POST", "/api/v1/enrollment-tokens"), ("POST", "/api/v1/admin-tokens"),
                  ("POST", "/api/v1/certificates/ABCD/revoke"), ("POST", "/api/v1/settings/rotate-ca"),
                  ("PUT", "/api/v1/services/00000000-0000-4000-8000-000000000000")]
        statuses = [server.request(m, p, b, token)[0] for m, p in routes for b in hostile]
        print(f"fuzz of {len(routes)} JSON routes x {len(hostile)} hostile bodies: {len(statuses)} requests, "
              f"{sum(s >= 500 for s in statuses)} answered 5xx, statuses {sorted(set(statuses))}")
        closed_websockets(server, daemon)
        signing_flood(server, daemon, server.pki_port)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
