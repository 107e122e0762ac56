"""Helpers for channel tests: tokens, reference agents, an independent `websockets` client."""
from __future__ import annotations

import asyncio
import json
import ssl
import tempfile
import threading
from typing import Any, Callable, Iterable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks

from uptrakitd.agent.client import ServiceAgent

from .helpers import ca_pem, https_port, request_json


@inlineCallbacks
def enrollment_token(c: Any, **fields: Any) -> Any:
    # tests enroll many services with one token: unlimited, never expiring, approved at once unless told
    defaults = {"name": "test", "max_uses": None, "expires_in_seconds": None, "auto_approve": True}
    status, body = yield request_json(c, "POST", "/api/v1/enrollment-tokens", dict(defaults, **fields))
    assert status == 201, body
    return body["token"]


def next_event(agent: ServiceAgent, name: str, predicate: Callable[[Any], bool] = lambda d: True,
               timeout: float = 30) -> Deferred:
    """Fires with the detail of the agent's next event `name` that satisfies predicate (via its observers)."""
    d: Deferred = Deferred()

    def watch(event: str, detail: Any) -> None:
        if event == name and not d.called and predicate(detail):
            agent.observers.remove(watch)
            d.callback(detail)
    agent.observers.append(watch)
    return d.addTimeout(timeout, reactor)


def start_agent(testcase: Any, c: Any, token: str | None, kind: str = "agent", state_dir: str | None = None,
                port: int | None = None, **kw: Any) -> ServiceAgent:
    agent = ServiceAgent(reactor, f"wss://localhost:{port or https_port(c)}", state_dir or testcase.mktemp(), kind=kind,
                         enrollment_token=token, ca_cert=ca_pem(c), backoff=kw.pop("backoff", (0.05, 0.5)), **kw)
    agent.startService()
    testcase.addCleanup(lambda: agent.stopService() if agent.running else None)
    return agent


@inlineCallbacks
def connected_agent(testcase: Any, c: Any, **kw: Any) -> Any:
    """A reference agent enrolled with a fresh token and authenticated (service_settings received)."""
    token = yield enrollment_token(c)
    agent = start_agent(testcase, c, token, **kw)
    yield next_event(agent, "service_settings")
    return agent


@inlineCallbacks
def service_json(c: Any, service_id: str) -> Any:
    status, body = yield request_json(c, "GET", f"/api/v1/services/{service_id}")
    assert status == 200, body
    return body


def agent_identity(agent: Any) -> tuple[bytes, bytes]:
    """(cert_pem, key_pem) the agent holds."""
    pem = agent.state.identity_pem()
    split = pem.index(b"-----BEGIN CERTIFICATE-----")
    return pem[split:], pem[:split]


def ws_ssl(c: Any, cert_pem: bytes | None = None, key_pem: bytes | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem(c).decode())
    if cert_pem:
        with tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False) as f:
            f.write(key_pem + cert_pem)
        ctx.load_cert_chain(f.name)
    return ctx


class BlockingWebSocket:
    """The `websockets` asyncio client behind blocking calls, for tests that script a session in a thread.

    Not `websockets.sync`: its reader thread sits in a blocking SSL_read while the caller's thread writes
    on the same OpenSSL connection, and when a TLS 1.3 server's session tickets arrive just after the
    handshake (ours and nginx's do) the request written meanwhile is sometimes lost: the handshake then
    times out after 10 s (seen in about one connection in 100 on a loaded machine, with strace: the
    client never wrote the request). The asyncio client drives TLS through a memory BIO on one thread.
    """

    def __init__(self, url: str, **kw: Any) -> None:
        from websockets.asyncio.client import connect
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="websocket-client", daemon=True)
        self.thread.start()
        async def opened() -> Any:
            return await connect(url, **kw)
        try:
            self.ws = self._run(opened())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def send(self, message: str | bytes | Iterable[str]) -> None:
        self._run(self.ws.send(message))

    def recv(self, timeout: float | None = None) -> str | bytes:
        """The next message; TimeoutError after `timeout` seconds, ConnectionClosed once closed."""
        async def receive() -> Any:
            return await asyncio.wait_for(self.ws.recv(), timeout)
        try:
            return self._run(receive())
        except asyncio.TimeoutError:
            raise TimeoutError(f"no message in {timeout} s") from None

    def ping(self, data: str | bytes | None = None) -> None:
        self._run(self.ws.ping(data))

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self._run(self.ws.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __enter__(self) -> "BlockingWebSocket":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def ws_connect(url: str, **kw: Any) -> BlockingWebSocket:
    """Open a WebSocket with the independent `websockets` client (see BlockingWebSocket)."""
    return BlockingWebSocket(url, **kw)


def frame(kind: str, seq: int, **payload: Any) -> str:
    return json.dumps({"protocol_version": 1, "seq": seq, "type": kind, **payload})


def until_closed(ws: BlockingWebSocket, timeout: float = 10) -> tuple[list[dict[str, Any]], int | None, str | None]:
    """Read a `websockets` sync connection until the server closes it: (messages, close code, reason)."""
    from websockets.exceptions import ConnectionClosed
    messages = []
    try:
        while True:
            messages.append(json.loads(ws.recv(timeout=timeout)))
    except ConnectionClosed as closed:
        rcvd = closed.rcvd
        return messages, rcvd.code if rcvd else None, rcvd.reason if rcvd else None
