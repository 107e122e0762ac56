"""A fleet of agents through enrollment, connection and a CA rotation, against a real `twistd -n uptrakit`.

Run: .venv/bin/python bench/channel.py [AGENTS]     (default 1000; 5000 takes about 3 minutes here)
     UPTRAKIT_BENCH_PROFILE=rotation.txt also records py-spy's collapsed stacks of the daemon during the rotation.
     UPTRAKIT_BENCH_RATE=100 starts the daemon with --rotation-renewal-rate 100 (default 100).
     UPTRAKIT_BENCH_PIN=1 pins the daemon (its threads and its PKI worker) to CPU 0 and the load processes and
     the prober to CPU 1: the controller gets a core of its own, as on a server whose agents are elsewhere
     (without it, `/healthz` also measures the scheduler sharing two cores among six busy processes).
     UPTRAKIT_BENCH_IGNORE_WINDOW=1 makes every agent renew at once on `request_cert_renewal`, as a client written
     to the protocol without the pacing hint would (the controller then answers `renewal_deferred` with a
     `retry_after_seconds` beyond its pace, which these agents honour).
     UPTRAKIT_BENCH_UPSTREAM=1 makes every agent a client of the upstream protocol only: it renews at once on
     `request_cert_renewal` (ignoring `within_seconds`) and knows no `renewal_deferred`: after one it renews again
     only when the controller asks again.
     UPTRAKIT_BENCH_ROTATION_LIMIT=150 stops waiting for an agent's return after that many seconds (default 600):
     the figures then count only the agents back by then.
     UPTRAKIT_BENCH_SOFTHSM=1 keeps the CA keys in a SoftHSM2 token made in a temp dir (--ca-key-uri): the
     rotation's new key is generated in it and every certificate is signed through it.
     UPTRAKIT_BENCH_CONTROLLERS=2 runs that many controllers on one PostgreSQL (Debian's, started in a temp
     dir) behind HAProxy (TCP passthrough, leastconn): the agents spread over them; CPU and memory are summed
     over the controllers, `/healthz` is probed on the first, the rotation is asked of the first.

Load: asyncio + the `websockets` library in 4 processes on the same 2 cores as the daemon (so the stable
figures are the daemon's CPU per operation and the ratios). Printed per phase: duration, errors, the
daemon's CPU per operation, `/healthz` latency from another thread (p99 and worst) and listen-queue
overflows (`nstat TcpExtListenOverflows`); then the daemon's memory per connected agent, and for the
rotation the time from the API call until each agent had `ca_bundle_updated` and until it was back
with a new-generation certificate.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROCESSES = 4
IGNORE_WINDOW = os.environ.get("UPTRAKIT_BENCH_IGNORE_WINDOW") == "1"
UPSTREAM = os.environ.get("UPTRAKIT_BENCH_UPSTREAM") == "1"
ROTATION_LIMIT = float(os.environ.get("UPTRAKIT_BENCH_ROTATION_LIMIT", "600"))   # seconds: an agent not back by then is not counted
CONCURRENCY = 64   # enrollments / connection attempts in flight per process


def csr_for(service_id: str) -> tuple[str, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service_id)])).sign(key, hashes.SHA256()))
    return (csr.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def frame(seq: int, kind: str, **payload) -> str:
    return json.dumps({"protocol_version": 1, "seq": seq, "type": kind, **payload})


class Agent:
    def __init__(self, url: str, ca: str, token: str, workdir: str, index: int) -> None:
        self.url, self.ca, self.token, self.index = url, ca, token, index
        self.pem_path = os.path.join(workdir, f"agent-{index}.pem")
        self.service_id = ""
        self.generation = 1
        self.bundle_at = 0.0
        self.renewed_at = 0.0
        self.deferred = 0   # renewal_deferred answers received
        self.errors: list[str] = []
        self.ws = None
        self.out_seq = 1

    def context(self, with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca)
        if with_cert:
            ctx.load_cert_chain(self.pem_path)
        return ctx

    async def enroll(self) -> None:
        from websockets.asyncio.client import connect
        async with connect(self.url, ssl=self.context(False), open_timeout=60, max_size=2 ** 20) as ws:
            await ws.send(frame(1, "enroll", hostname=f"bench-{self.index}", enrollment_token=self.token))
            self.service_id = json.loads(await ws.recv())["service_id"]
            csr, key = csr_for(self.service_id)
            await ws.send(frame(2, "request_certificate", csr_pem=csr))
            cert = json.loads(await ws.recv())["cert_pem"]
        Path(self.pem_path).write_bytes(key + cert.encode())

    async def connect(self) -> None:
        from websockets.asyncio.client import connect
        self.ws = await connect(self.url, ssl=self.context(True), open_timeout=60, ping_interval=None,
                                max_size=2 ** 20)
        self.out_seq = 1
        settings = json.loads(await self.ws.recv())
        assert settings["type"] == "service_settings", settings

    async def follow_rotation(self, rotated_at: asyncio.Event) -> None:
        """Wait for the bundle and the renewal request, renew, come back with the new certificate."""
        within = 0.0
        while True:
            message = json.loads(await self.ws.recv())
            if message["type"] == "ca_bundle_updated":
                self.bundle_at = time.time()
            elif message["type"] == "request_cert_renewal":
                within = float(message.get("within_seconds") or 0)
                break
        if not (IGNORE_WINDOW or UPSTREAM):
            await asyncio.sleep(random.uniform(0, within))
        while True:
            csr, key = csr_for(self.service_id)
            await self.ws.send(frame(self.out_seq, "renew_certificate", csr_pem=csr))
            self.out_seq += 1
            while True:
                message = json.loads(await self.ws.recv())
                if message["type"] in ("certificate", "error"):
                    break
            if message["type"] == "certificate":
                break
            self.deferred += 1
            if UPSTREAM:   # it does not know the code: it waits until it is asked again
                while json.loads(await self.ws.recv())["type"] != "request_cert_renewal":
                    pass
                continue
            await asyncio.sleep(float(message.get("retry_after_seconds") or 1))
        try:
            await self.ws.recv()   # the controller closes with "certificate rotated"
        except Exception:
            pass
        Path(self.pem_path).write_bytes(key + message["cert_pem"].encode())
        for attempt in range(5):
            try:
                await self.connect()
                break
            except Exception as e:   # noqa: BLE001 - counted, retried like an agent would
                self.errors.append(f"reconnect: {type(e).__name__}: {e}"[:200])
                await asyncio.sleep(1 + attempt)
        self.renewed_at = time.time()


async def run_worker(indices: list[int], url: str, ca: str, token: str, workdir: str, commands, results) -> None:
    agents = [Agent(url, ca, token, workdir, i) for i in indices]
    gate = asyncio.Semaphore(CONCURRENCY)

    async def guarded(coro_fn, agent):
        async with gate:
            try:
                await coro_fn(agent)
            except Exception as e:  # noqa: BLE001
                agent.errors.append(f"{coro_fn.__name__}: {type(e).__name__}: {e}"[:200])
    loop = asyncio.get_running_loop()
    for phase in ("enroll", "connect", "rotate"):
        await loop.run_in_executor(None, commands.get)   # wait for the parent's go
        if phase == "enroll":
            await asyncio.gather(*(guarded(Agent.enroll, a) for a in agents))
        elif phase == "connect":
            await asyncio.gather(*(guarded(Agent.connect, a) for a in agents))
        else:
            await asyncio.gather(*(asyncio.wait_for(a.follow_rotation(asyncio.Event()), ROTATION_LIMIT)
                                   for a in agents if a.ws is not None), return_exceptions=True)
        results.put((phase, [(a.bundle_at, a.renewed_at, a.errors) for a in agents]))
    for a in agents:
        if a.ws is not None:
            await a.ws.close()


def worker(indices, url, ca, token, workdir, commands, results) -> None:
    asyncio.run(run_worker(indices, url, ca, token, workdir, commands, results))


def listen_overflows() -> int:
    out = subprocess.run(["nstat", "-az", "TcpExtListenOverflows"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("TcpExtListenOverflows"):
            return int(line.split()[1])
    return 0


class Prober(threading.Thread):
    """GET /healthz every 50 ms over one keep-alive connection (the reactor's answer time); latencies in ms."""

    def __init__(self, daemon) -> None:
        super().__init__(daemon=True)
        self.daemon_ = daemon
        self.samples: list[float] = []
        self.failures = 0
        self.running = True

    def run(self) -> None:
        from common import keepalive_get
        conn = None
        while self.running:
            start = time.perf_counter()
            try:
                conn = conn or self.daemon_.tls()
                keepalive_get(conn, "/healthz")
                self.samples.append((time.perf_counter() - start) * 1000)
            except OSError:
                self.failures += 1
                conn = None
            time.sleep(0.05)

    def take(self) -> tuple[float, float, int]:
        samples, self.samples = self.samples, []
        failures, self.failures = self.failures, 0
        if not samples:
            return float("nan"), float("nan"), failures
        samples.sort()
        return samples[min(len(samples) - 1, int(0.99 * len(samples)))], samples[-1], failures


class Controllers:
    """One daemon, or several on one PostgreSQL behind HAProxy; CPU time and RSS summed over them."""

    def __init__(self, count: int, *flags: str) -> None:
        from common import Daemon, free_port
        self.cluster = self.haproxy = None
        if count == 1:
            self.daemons = [Daemon(*flags)]
            self.port = self.daemons[0].port
            return
        import base64
        from common import ROOT
        sys.path.insert(0, str(ROOT))
        from tests.ha.postgres import PostgresCluster
        self.cluster = PostgresCluster()
        url = self.cluster.new_database()
        kek = Path(tempfile.mkdtemp(prefix="uptrakit-fleet-kek-")) / "kek"
        kek.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        kek.chmod(0o600)
        self.daemons = [Daemon("--database", url, "--ca-key-encryption-key-file", str(kek), *flags)
                        for _ in range(count)]
        for d in self.daemons[1:]:
            d.token = self.daemons[0].token
        self.port = free_port()
        conf = Path(tempfile.mkdtemp(prefix="uptrakit-fleet-haproxy-")) / "haproxy.cfg"
        servers = "\n".join(f"    server c{i} 127.0.0.1:{d.port}" for i, d in enumerate(self.daemons))
        conf.write_text(f"""global
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend fleet
    bind 127.0.0.1:{self.port}
    maxconn 9000
    default_backend controllers
backend controllers
    balance leastconn
{servers}
""")
        self.haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        time.sleep(1.0)

    @property
    def first(self):
        return self.daemons[0]

    def cpu_seconds(self) -> float:
        return sum(d.cpu_seconds() for d in self.daemons)

    def rss_kib(self) -> int:
        return sum(int(Path(f"/proc/{d.proc.pid}/status").read_text().split("VmRSS:")[1].split()[0])
                   for d in self.daemons)

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()
        if self.haproxy is not None:
            self.haproxy.terminate()
            self.haproxy.wait(timeout=30)
        if self.cluster is not None:
            self.cluster.destroy()


def full_collections(daemon) -> str:
    """What uptrakit_gc_full_collections says: how many by trigger, and the time spent."""
    runs, spent = [], 0.0
    for line in daemon.request("GET", "/metrics")[1].decode().splitlines():
        if line.startswith("uptrakit_gc_full_collections_total{"):
            runs.append(line.split('"')[1] + " " + line.rsplit(" ", 1)[1].split(".")[0])
        elif line.startswith("uptrakit_gc_full_collection_seconds_total"):
            spent = float(line.rsplit(" ", 1)[1])
    return f"{', '.join(runs)}; {spent:.2f} s"


def softhsm_flags() -> list[str]:
    """A SoftHSM2 token in a temp dir (SOFTHSM2_CONF, inherited by the daemons) and the flags that use it."""
    from common import softhsm_token
    module, pin = softhsm_token("fleet")
    return ["--ca-key-uri", "pkcs11:token=fleet", "--pkcs11-module", module, "--pkcs11-pin-file", str(pin)]


def main() -> None:
    agents = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    count = int(os.environ.get("UPTRAKIT_BENCH_CONTROLLERS", "1"))
    rate = os.environ.get("UPTRAKIT_BENCH_RATE")   # --rotation-renewal-rate (default 100)
    token = softhsm_flags() if os.environ.get("UPTRAKIT_BENCH_SOFTHSM") == "1" else []
    controllers = Controllers(count, "--max-connections", str(agents * 2 + 100), "--max-connections-per-ip",
                              str(agents * 2), *(["--rotation-renewal-rate", rate] if rate else []), *token)
    daemon = controllers.first
    pinned = os.environ.get("UPTRAKIT_BENCH_PIN") == "1"
    if pinned:
        for d in controllers.daemons:
            for pid in [d.proc.pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(d.proc.pid)],
                                                                     capture_output=True, text=True).stdout.split()]:
                subprocess.run(["taskset", "-a", "-cp", "0", str(pid)], check=True, stdout=subprocess.DEVNULL)
        os.sched_setaffinity(0, {1})   # this process, the prober and the load processes it starts
    workdir = tempfile.mkdtemp(prefix="uptrakit-fleet-")
    try:
        status, token = daemon.request("POST", "/api/v1/enrollment-tokens", {"name": "fleet", "auto_approve": True,
                                       "max_uses": None, "expires_in_seconds": None}, daemon.token)
        url = f"wss://localhost:{controllers.port}/api/v1/ws/agent"
        ctx = multiprocessing.get_context("spawn")
        commands = [ctx.Queue() for _ in range(PROCESSES)]
        results = ctx.Queue()
        procs = [ctx.Process(target=worker, args=(list(range(i, agents, PROCESSES)), url, daemon.ca, token["token"],
                                                  workdir, commands[i], results)) for i in range(PROCESSES)]
        for p in procs:
            p.start()
        prober = Prober(daemon)
        prober.start()
        rss_idle = controllers.rss_kib()
        print(f"{agents} agents, {PROCESSES} load processes " + ("on CPU 1, the daemon alone on CPU 0" if pinned else
              "on the same 2 cores") + f", {count} controller(s), rotation renewals {rate or 100}/s")
        print(f"{'phase':10} {'seconds':>8} {'errors':>7} {'CPU ms/agent':>13} {'healthz p99':>12} {'worst':>8} "
              f"{'failed':>7} {'overflows':>10}")
        collected = {}
        for phase in ("enroll", "connect", "rotate"):
            cpu, overflow, start = controllers.cpu_seconds(), listen_overflows(), time.time()
            prober.take()
            if phase == "rotate" and os.environ.get("UPTRAKIT_BENCH_PROFILE"):
                # py-spy over the daemon for the rotation only (collapsed stacks, e.g. for flamegraph.pl)
                # (--nonblocking: py-spy reads the daemon's memory without stopping it; stopping it 100 times a
                # second made the rotation itself fail)
                spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--format", "raw",
                                        "--nonblocking", "--threads", "-o", os.environ["UPTRAKIT_BENCH_PROFILE"],
                                        "-p", str(daemon.proc.pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if phase == "rotate":
                rotated_at = time.time()
                for q in commands:
                    q.put("go")
                status, answer = daemon.request("POST", "/api/v1/settings/rotate-ca", None, daemon.token)
                assert status == 200, answer
            else:
                for q in commands:
                    q.put("go")
            rows = []
            for _ in procs:
                _, part = results.get(timeout=900)
                rows.extend(part)
            seconds = time.time() - start
            if phase == "rotate" and os.environ.get("UPTRAKIT_BENCH_PROFILE"):
                spy.send_signal(2)   # SIGINT: py-spy writes the profile and exits
                spy.wait(timeout=60)
            errors = sum(len(e) for _, _, e in rows)
            p99, worst, failed = prober.take()
            print(f"{phase:10} {seconds:8.1f} {errors:7d} {(controllers.cpu_seconds() - cpu) / agents * 1000:13.2f} "
                  f"{p99:10.1f}ms {worst:6.0f}ms {failed:7d} {listen_overflows() - overflow:10d}")
            if errors:
                first = next(e for _, _, e in rows if e)
                print(f"           first error: {first[0]}")
            collected[phase] = rows
            print(f"           the daemon's full garbage collections so far (uptrakitd.process.gcpolicy): {full_collections(daemon)}")
            if phase == "connect":
                rss = controllers.rss_kib()
                print(f"           daemon RSS {rss_idle / 1024:.0f} MiB idle, {rss / 1024:.0f} MiB with {agents} "
                      f"agents connected: {(rss - rss_idle) / agents:.1f} KiB per agent")
        bundle = sorted(b - rotated_at for b, _, _ in collected["rotate"] if b)
        renewed = sorted(r - rotated_at for _, r, _ in collected["rotate"] if r)

        def pct(values, p):
            return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else float("nan")
        print(f"rotation: ca_bundle_updated at {len(bundle)} agents, p50 {pct(bundle, 50):.2f} s p99 "
              f"{pct(bundle, 99):.2f} s; back with a new-generation certificate: {len(renewed)} agents, p50 "
              f"{pct(renewed, 50):.1f} s p99 {pct(renewed, 99):.1f} s max {renewed[-1] if renewed else float('nan'):.1f} s")
        deferred = next((line.rsplit(" ", 1)[1] for line in daemon.request("GET", "/metrics")[1].decode().splitlines()
                         if line.startswith("uptrakit_renewals_deferred_total ")), "0")
        asked = next((line.rsplit(" ", 1)[1] for line in daemon.request("GET", "/metrics")[1].decode().splitlines()
                      if line.startswith("uptrakit_renewals_asked_again_total ")), "0")
        print(f"          renewals answered renewal_deferred: {float(deferred):.0f}, asked again: {float(asked):.0f}"
              + (" (agents renewed at once, ignoring within_seconds)" if IGNORE_WINDOW else "")
              + (" (upstream-protocol clients: no renewal_deferred)" if UPSTREAM else ""))
        prober.running = False
        for p in procs:
            p.join(timeout=60)
    finally:
        controllers.stop()


if __name__ == "__main__":
    main()
