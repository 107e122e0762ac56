"""`twistd uptrakit-agent`: options and makeService for the reference service client."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from twisted.python import usage

from ..process.lifecycle import stop_with_status

TOKEN_VARIABLE = "UPTRAKIT_ENROLLMENT_TOKEN"
EXIT_STOPPED = 3  # revoked, deactivated, not approved, cannot connect: systemd sees a failure


class Options(usage.Options):
    """Options of the reference agent."""

    synopsis = "--controller wss://host:8443 --state-dir DIR [--enrollment-token TOKEN] [options]"
    longdesc = ("Keep one Uptrakit service connected to the controller: enroll with a token, generate a P-256 "
                "key and CSR, store key/certificate/CA bundle in the state dir, connect with mTLS, renew inside "
                "the renewal window or when asked, follow CA rotations, reconnect with jittered backoff, stop "
                "when the certificate is revoked.")
    optParameters = [
        ["controller", None, None, "Controller URL, wss://host[:port] (a proxy in front of it works too)."],
        ["state-dir", None, "./uptrakit-agent", "Directory for service.json, identity.pem and ca.pem (0700)."],
        ["enrollment-token", None, None, "Enrollment token (upt_…) for the first start. Visible in `ps`: prefer "
                                         "--enrollment-token-file or the UPTRAKIT_ENROLLMENT_TOKEN variable."],
        ["enrollment-token-file", None, None, "File whose first line is the enrollment token (read at start)."],
        ["kind", None, "agent", "Service kind: agent or mqtt."],
        ["ca-cert", None, None, "CA bundle to trust before the controller gave us one (the controller's ca.crt)."],
        ["server-ca", None, None, "Extra CA for the server certificate of a TLS-terminating proxy in front."],
        ["hostname", None, None, "Host name reported at enrollment (default: this machine's)."],
        ["friendly-name", None, None, "Display name reported at enrollment."],
    ]

    def postOptions(self) -> None:
        if not self["controller"]:
            raise usage.UsageError("--controller is required")
        if self["kind"] not in ("agent", "mqtt"):
            raise usage.UsageError("--kind must be agent or mqtt")
        given = [s for s in ("enrollment-token", "enrollment-token-file") if self[s]]
        if len(given) > 1:
            raise usage.UsageError("give --enrollment-token or --enrollment-token-file, not both")
        if self["enrollment-token-file"]:
            token = (_read(self["enrollment-token-file"], "--enrollment-token-file") or b"").decode(
                "utf-8", "replace").strip().splitlines()
            if not token or not token[0].strip():
                raise usage.UsageError(f"{self['enrollment-token-file']} holds no enrollment token")
            self["enrollment-token"] = token[0].strip()
        elif not self["enrollment-token"]:
            self["enrollment-token"] = os.environ.pop(TOKEN_VARIABLE, None) or None


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        sys.stderr.write(f"uptrakit-agent: error: cannot read {what} {path}: {e.strerror}\n")
        raise SystemExit(2)


def makeService(options: Any) -> Any:
    """Build the agent service; errors are one line with exit status 2."""
    from twisted.internet import reactor

    from .client import AgentError, ServiceAgent

    def stopped(reason: str) -> None:
        sys.stderr.write(f"uptrakit-agent: stopped: {reason}\n")
        # an agent that gave up must not look like one that was asked to stop
        stop_with_status(reactor, EXIT_STOPPED)

    token = options["enrollment-token"]
    options["enrollment-token"] = None  # the agent keeps it only until it has enrolled
    try:
        return ServiceAgent(reactor, options["controller"], options["state-dir"], kind=options["kind"],
                            enrollment_token=token,
                            ca_cert=_read(options["ca-cert"], "--ca-cert"),
                            server_ca=_read(options["server-ca"], "--server-ca"),
                            hostname=options["hostname"], friendly_name=options["friendly-name"],
                            on_stop=stopped)
    except AgentError as e:
        sys.stderr.write(f"uptrakit-agent: error: {e}\n")
        raise SystemExit(2)
