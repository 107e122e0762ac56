"""Fakes for the fast unit layer: a real SQLite store run synchronously, a PKI on a Clock, socket stand-ins."""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock

from uptrakitd import store
from uptrakitd.channel.protocol import ChannelState
from uptrakitd.events import EventBus
from uptrakitd.observability.metrics import Metrics
from uptrakitd.pki.authority import CertificateAuthority
from uptrakitd.pki.ca import CaGeneration, create_ca
from uptrakitd.pki.signer import KeySigner
from uptrakitd.pki.files import PkiFiles
from uptrakitd.pki.state import CaState, insert_generation


class MemoryStore:
    """The Store interface over an in-memory SQLite database, run at once on the calling thread."""

    def __init__(self) -> None:
        self.conn = store.connect(Path(":memory:"))
        store.migrate(self.conn)
        self.calls: list[str] = []

    def run(self, operation: Callable[..., Any], *args: Any, **kw: Any) -> Deferred:
        self.calls.append(getattr(operation, "__name__", repr(operation)))
        try:
            return succeed(store.transaction(self.conn, operation, *args, **kw))
        except Exception:
            return fail()

    def start(self) -> None:
        pass

    def close(self) -> None:
        self.conn.close()


def run_now(fn: Callable[..., Any], *args: Any, **kw: Any) -> Deferred:
    """`run_blocking` that runs on the calling thread (unit tests need no thread pool)."""
    return maybeDeferred(fn, *args, **kw)


def clock_at(when: datetime.datetime) -> Clock:
    """A Clock whose seconds() is `when`."""
    clock = Clock()
    clock.advance(when.timestamp())
    return clock


def make_pki(tmp: str, clock: Clock | None = None) -> tuple[CertificateAuthority, MemoryStore, EventBus]:
    """A CertificateAuthority with a stored generation 1, on a Clock, a MemoryStore and a fresh bus."""
    clock = clock or clock_at(datetime.datetime.now(datetime.timezone.utc))
    memory = MemoryStore()
    now = datetime.datetime.fromtimestamp(clock.seconds(), datetime.timezone.utc)
    signer = KeySigner.generate()
    cert = create_ca(1, None, now, signer)
    state = CaState()
    ca = CaGeneration(1, cert, signer)
    state.add_generation(ca)
    files = PkiFiles(Path(tmp))
    files.dir.mkdir(parents=True, exist_ok=True)
    memory.run(insert_generation, ca, files.write_ca_key(1, signer), int(clock.seconds()))
    bus = EventBus()
    authority = CertificateAuthority(state, memory, bus, Metrics(), files, clock, run_now, lambda: None,
                                     "uptrakit.local")
    return authority, memory, bus


class FakeSocket(ChannelState):
    """What the hub sees of a ServiceChannelProtocol: the same state machine, sends and closes, no frames."""

    def __init__(self, context: Any, kind: str = "agent", bearer: str | None = None) -> None:
        self.context, self.kind, self.bearer = context, kind, bearer
        self.phase = "connecting"
        self.service_id: str | None = None
        self.serial: int | None = None
        self.closing = False
        self.out_seq = 1
        self.unknown_in_row = 0
        self.enroll_timer: Any = None
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.closed_with: str | None = None

    def send(self, kind: str, **payload: Any) -> bool:
        self.sent.append((kind, payload))
        self.out_seq += 1
        return True

    def send_prepared(self, prepared: Any) -> bool:
        self.sent.append(("prepared", {"payload": prepared.payload}))
        self.out_seq += 1
        return True

    def close(self, reason: str, code: int = 1008) -> None:
        if not self.closing:
            self.closing, self.closed_with = True, reason

    def kinds(self) -> list[str]:
        """The message types sent, in order (prepared broadcasts decoded)."""
        import json
        out = []
        for kind, payload in self.sent:
            out.append(json.loads(payload["payload"])["type"] if kind == "prepared" else kind)
        return out


def make_directory(ca: CertificateAuthority, memory: MemoryStore, bus: EventBus, lifetime_hours: int = 168) -> Any:
    """(ServiceDirectory, RuntimeSettings, an unused enrollment token) over the same store and bus."""
    from uptrakitd.config import NetworkSettings
    from uptrakitd.registry.directory import ServiceDirectory
    from uptrakitd.registry.enrollment import EnrollmentTokens
    from uptrakitd.registry.runtime_settings import RuntimeSettings, ServiceCertSettings
    runtime = RuntimeSettings(memory, bus, NetworkSettings(), ServiceCertSettings(lifetime_hours=lifetime_hours))
    directory = ServiceDirectory(memory, ca, runtime, bus, ca.clock, [])
    token = EnrollmentTokens(memory).create("t", max_uses=None, expires_in=None, auto_approve=True).result["token"]
    return directory, runtime, token
