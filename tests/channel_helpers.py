"""Helpers for channel tests: tokens, reference agents, an independent `websockets` client."""
from __future__ import annotations

import json
import ssl
import tempfile
from typing import Any, Callable

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


def frame(kind: str, seq: int, **payload: Any) -> str:
    return json.dumps({"protocol_version": 1, "seq": seq, "type": kind, **payload})


def until_closed(ws: Any, timeout: float = 10) -> tuple[list[dict[str, Any]], int | None, str | None]:
    """Read a `websockets` sync connection until the server closes it: (messages, close code, reason)."""
    from websockets.exceptions import ConnectionClosed
    messages = []
    try:
        while True:
            messages.append(json.loads(ws.recv(timeout=timeout)))
    except ConnectionClosed as closed:
        rcvd = closed.rcvd
        return messages, rcvd.code if rcvd else None, rcvd.reason if rcvd else None
