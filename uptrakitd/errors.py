"""Failures the outside sees. Each maps to one HTTP status and code in uptrakitd.web.router."""
from __future__ import annotations


class UptrakitError(Exception):
    """Base: `code` is the snake_case error code, `status` the HTTP status."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field  # the request field the error is about, for forms to show it beside the input
        if code:
            self.code = code


class BadRequest(UptrakitError):
    status, code = 400, "bad_request"


class Unauthorized(UptrakitError):
    status, code = 401, "unauthorized"


class Forbidden(UptrakitError):
    status, code = 403, "forbidden"


class NotFound(UptrakitError):
    status, code = 404, "not_found"


class Conflict(UptrakitError):
    status, code = 409, "conflict"


class PayloadTooLarge(UptrakitError):
    status, code = 413, "payload_too_large"


class Unavailable(UptrakitError):
    status, code = 503, "unavailable"


class StorageUnavailable(Unavailable):
    """The database cannot be written (disk full, I/O error, closed): nothing was changed."""

    code = "storage_unavailable"
