"""A throw-away PostgreSQL cluster for tests: Debian's `postgresql` binaries, `initdb`/`pg_ctl` in a temp dir,
run as an unprivileged user (`postgres` when the tests run as root), listening on a unix socket only."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any


from ..helpers import missing


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        missing("PostgreSQL not found: apt-get install postgresql")
    return Path(found[-1]).parent


class PostgresCluster:
    """initdb + pg_ctl start in a temp dir; `url(dbname)`; stop()/start() to play an outage; destroy()."""

    def __init__(self, debian_port: int | None = None) -> None:
        """With `debian_port`: as Debian's pg_createcluster makes one (peer on the socket, scram-sha-256 over
        TCP, listening on localhost at that port, `include_dir = 'conf.d'`), its settings left to its files."""
        self.bin = _bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="upt-pg-"))   # short: unix socket paths are limited
        self.data = self.dir / "data"
        self.debian_port = debian_port
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        entry = pwd.getpwnam(self.user)
        self._ids = (entry.pw_uid, entry.pw_gid)
        os.chown(self.dir, *self._ids)
        auth = ["--auth-local=peer", "--auth-host=scram-sha-256"] if debian_port else ["-A", "trust"]
        self._as_user(["initdb", "-D", str(self.data), *auth, "-U", "postgres", "--no-sync", "-E", "UTF8"])
        if debian_port:
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write("include_dir = 'conf.d'\n")
            (self.data / "conf.d").mkdir()
            os.chown(self.data / "conf.d", *self._ids)
        self.start()

    def pg_ctl(self, action: str) -> list[str]:
        """The pg_ctl command line (run as the cluster's user) that starts, stops or restarts this cluster."""
        options = f"-k {self.dir} -p {self.debian_port}" if self.debian_port else \
            f"-k {self.dir} -c listen_addresses='' -c max_connections=50"   # no TCP: our own socket only
        return [str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-o", options,
                action]

    def _as_user(self, argv: list[str]) -> None:
        uid, gid = self._ids

        def drop() -> None:
            if os.geteuid() == 0:
                os.setgid(gid)
                os.setuid(uid)
        program = argv[0] if argv[0].startswith("/") else str(self.bin / argv[0])
        done = subprocess.run([program, *argv[1:]], preexec_fn=drop, cwd=str(self.dir),
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise AssertionError(f"{argv[0]} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        self._as_user(self.pg_ctl("start"))

    def stop(self) -> None:
        self._as_user(["pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql:///{dbname}?host={self.dir}&user=postgres"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg
        name = "t" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def destroy(self) -> None:
        try:
            self.stop()
        except AssertionError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def kek_file(testcase: Any, *keys: bytes) -> str:
    """A key-encryption key file (0600) holding `keys` (fresh random ones when none given)."""
    import base64
    path = Path(testcase.mktemp()).resolve()
    path.write_text("".join(base64.b64encode(k).decode() + "\n" for k in (keys or (os.urandom(32),))))
    path.chmod(0o600)
    return str(path)


def together(work: Any, times: int) -> list[Any]:
    """Run `work()` in `times` threads at once (controllers starting together); their results, or the first
    error any of them raised."""
    import threading
    results: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(work())
        except BaseException as e:   # re-raised below, in the test's thread
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(times)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    assert len(results) == times, f"{times - len(results)} thread(s) did not finish within 60 s"
    return results


class HangingRelay:
    """TCP on 127.0.0.1 to PostgreSQL's unix socket, that can stop passing bytes (a silent partition:
    nothing is closed, nothing arrives) and start again. Threads; `close()` ends them."""

    def __init__(self, socket_path: Path) -> None:
        import socket
        import threading
        self.target = str(socket_path)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.passing = threading.Event()
        self.passing.set()
        self.running = True
        self.sockets: list[Any] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def hang(self) -> None:
        self.passing.clear()

    def resume(self) -> None:
        self.passing.set()

    def close(self) -> None:
        self.running = False
        self.passing.set()
        for s in [self.listener, *self.sockets]:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        import socket
        import threading
        while self.running:
            try:
                client, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            server = socket.socket(socket.AF_UNIX)
            try:
                server.connect(self.target)
            except OSError:
                client.close()
                continue
            self.sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: Any, dst: Any) -> None:
        import socket
        src.settimeout(0.2)
        while self.running:
            if not self.passing.wait(0.2):
                continue   # hung: the bytes wait in the kernel, as on a link that silently drops everything
            try:
                data = src.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
