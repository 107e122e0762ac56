"""The HTTPS API as `uptrakitctl` sees it: one request at a time, each failure turned into one sentence that
says what to do (cannot connect, TLS verification, 401, 403 for a read token, 409, 503)."""
from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_URL = "https://localhost:8443"

# exit statuses (README "uptrakitctl"): 0 done; 1 the controller refused or a check failed; 2 bad usage or a
# local file; 3 the controller could not be reached or its certificate not verified; 4 the token was refused
REFUSED, USAGE, UNREACHABLE, UNAUTHORIZED = 1, 2, 3, 4


class CtlError(Exception):
    """What went wrong, in one line for a person, and the exit status it gives."""

    def __init__(self, message: str, status: int = REFUSED, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Connection:
    """Where the controller is and how to prove who we are."""

    url: str = DEFAULT_URL
    token_file: str | None = None
    ca_file: str | None = None
    timeout: float = 15.0

    def token(self) -> str:
        if not self.token_file:
            raise CtlError("no admin token: pass --token-file FILE or set UPTRAKIT_TOKEN_FILE (a new controller's "
                           "bootstrap token is DATA_DIR/admin.token)", USAGE)
        try:
            text = Path(self.token_file).read_text().strip()
        except OSError as e:
            raise CtlError(f"cannot read the token file {self.token_file}: {e.strerror}", USAGE) from None
        if not text or any(c.isspace() for c in text):
            raise CtlError(f"the token file {self.token_file} does not hold one token", USAGE)
        return text


class Api:
    """JSON over HTTPS to one controller."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        parts = urlsplit(connection.url)
        if parts.scheme != "https" or not parts.hostname:
            raise CtlError(f"--url must be https://HOST[:PORT] (got {connection.url!r})", USAGE)
        self.host, self.port = parts.hostname, parts.port or 443
        self.base = parts.path.rstrip("/")
        self._context: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            context = ssl.create_default_context()
            if self.connection.ca_file:
                if not os.path.isfile(self.connection.ca_file):
                    raise CtlError(f"--ca-file {self.connection.ca_file}: no such file", USAGE)
                try:
                    context.load_verify_locations(self.connection.ca_file)
                except ssl.SSLError:
                    raise CtlError(f"--ca-file {self.connection.ca_file} holds no PEM certificate", USAGE) from None
            self._context = context
        return self._context

    def get(self, path: str, token: bool = True) -> Any:
        return self.request("GET", path, token=token)

    def request(self, method: str, path: str, body: Any = None, token: bool = True) -> Any:
        """The decoded JSON answer; CtlError for anything else."""
        status, answer = self.exchange(method, path, body, token)
        if 200 <= status < 300:
            return answer
        raise _refusal(status, answer, method, path)

    def exchange(self, method: str, path: str, body: Any = None, token: bool = True) -> tuple[int, Any]:
        headers = {"Accept": "application/json", "User-Agent": "uptrakitctl"}
        if token:
            headers["Authorization"] = "Bearer " + self.connection.token()
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.connection.timeout,
                                           context=self.context())
        try:
            conn.request(method, self.base + path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except ssl.SSLCertVerificationError as e:
            raise CtlError(self._tls_advice(e), UNREACHABLE) from None
        except ssl.SSLError as e:
            raise CtlError(f"TLS with {self.host}:{self.port} failed: {e.reason or e}", UNREACHABLE) from None
        except ConnectionRefusedError:
            raise CtlError(f"cannot connect to {self.connection.url}: connection refused (is uptrakitd running, "
                           "and is --url its --https-listen address?)", UNREACHABLE) from None
        except socket.gaierror as e:
            raise CtlError(f"cannot connect to {self.connection.url}: {self.host}: {e.strerror}",
                           UNREACHABLE) from None
        except (socket.timeout, TimeoutError):
            raise CtlError(f"cannot connect to {self.connection.url}: no answer within "
                           f"{self.connection.timeout:g} s", UNREACHABLE) from None
        except OSError as e:
            raise CtlError(f"cannot connect to {self.connection.url}: {e.strerror or e}", UNREACHABLE) from None
        finally:
            conn.close()
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = raw.decode("utf-8", "replace")
        return response.status, answer

    def _tls_advice(self, e: ssl.SSLCertVerificationError) -> str:
        why = e.verify_message or str(e)
        if self.connection.ca_file:
            return (f"TLS verification of {self.host}:{self.port} failed ({why}) with --ca-file "
                    f"{self.connection.ca_file}: is it this controller's CA (GET /api/v1/pki/ca.crt on its PKI "
                    "port), and does the controller's certificate name this host (its --san)?")
        return (f"TLS verification of {self.host}:{self.port} failed ({why}): pass the controller's CA with "
                "--ca-file (or UPTRAKIT_CA_FILE): DATA_DIR/pki/ca.crt, or fetch it with curl -o ca.crt "
                "http://HOST:PKI_PORT/api/v1/pki/ca.crt")


def _refusal(status: int, answer: Any, method: str, path: str) -> CtlError:
    message = answer.get("error") if isinstance(answer, dict) else None
    code = answer.get("code") if isinstance(answer, dict) else None
    if status == 401:
        return CtlError("the controller does not accept this token (401): a token nobody holds, or revoked; "
                        "check --token-file", UNAUTHORIZED, code)
    if status == 403:
        return CtlError(f"{method} {path} needs an admin token; this one may only read (403)"
                        + (f": {message}" if message else ""), UNAUTHORIZED, code)
    if status == 409:
        return CtlError(f"refused (409 conflict): {message or 'the current state does not allow it'}", REFUSED, code)
    if status == 503:
        return CtlError(f"the controller cannot do it now (503): {message or 'not ready'}", REFUSED, code)
    return CtlError(f"{method} {path}: {status} {message or answer or ''}".rstrip(), REFUSED, code)
