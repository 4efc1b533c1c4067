"""The one place the project's errors become HTTP: status, body, headers.

Every error body is `{"error": code, "message": text}`, plus `details` for a
validation failure and `balance`/`cost` for insufficient tokens; 429 and 503
carry `Retry-After`. Anything that is not one of the project's errors is a
bug: it answers 500 `internal` with a fixed message (the cause goes to the
log, never to the client).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from database import (
    Conflict,
    DreamLensError,
    Forbidden,
    InsufficientTokens,
    InvalidRequest,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
)

log = logging.getLogger("dreamlens.errors")

INTERNAL_MESSAGE = "Internal server error"


class MalformedRequest(InvalidRequest):
    """The request cannot be read at all (not JSON, not UTF-8, a bad header): 400."""


class PayloadTooLarge(InvalidRequest):
    """The body is over MAX_BODY_BYTES: 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"Request body is larger than {limit} bytes")
        self.limit = limit


# looked up along the exception's MRO, so the most specific class wins
# (DeviceLinked is a Forbidden; DatabaseUnavailable an Unavailable)
STATUSES: dict[type[DreamLensError], int] = {
    MalformedRequest: 400,
    PayloadTooLarge: 413,
    InvalidRequest: 422,
    Unauthorized: 401,
    InsufficientTokens: 402,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    RateLimited: 429,
    Unavailable: 503,
}

# Starlette's own HTTPExceptions (no route, wrong method) in the API's codes
HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    402: "insufficient_tokens",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    429: "rate_limited",
    503: "unavailable",
}


def status_for(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        status = STATUSES.get(cls)
        if status is not None:
            return status
    return 500


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def error_code(exc: BaseException) -> str:
    """The API code the client sees (a ConfigurationError is `internal` to it)."""
    if status_for(exc) == 500 or not isinstance(exc, DreamLensError):
        return "internal"
    return exc.code


def error_body(exc: BaseException) -> dict[str, Any]:
    if status_for(exc) == 500 or not isinstance(exc, DreamLensError):
        return {"error": "internal", "message": INTERNAL_MESSAGE}
    body: dict[str, Any] = {"error": exc.code, "message": exc.message}
    if isinstance(exc, InvalidRequest) and exc.details is not None:
        body["details"] = exc.details
    if isinstance(exc, InsufficientTokens):
        body["balance"] = exc.balance
        body["cost"] = exc.cost
    return body


def error_headers(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, RateLimited | Unavailable):
        return {"Retry-After": retry_after(exc.retry_after)}
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    return {}


def log_unexpected(exc: BaseException) -> None:
    log.error("unhandled %s", type(exc).__name__, exc_info=exc)


class ErrorJSON(JSONResponse):
    """An error body with every non-ASCII character escaped. Its details may
    name a key of the caller's JSON body, and a key holding a lone surrogate
    (`{"\\ud800": 1}` is valid JSON) cannot be written as UTF-8: the plain
    JSONResponse would fail, turning a 422 into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(exc: BaseException, extra: dict[str, Any] | None = None) -> JSONResponse:
    """The response for any exception; logs the ones that are bugs."""
    status = status_for(exc)
    if status == 500:
        log_unexpected(exc)
    body = error_body(exc)
    if extra:
        body = {**extra, **body}
    return ErrorJSON(body, status_code=status, headers=error_headers(exc))


def http_code(status: int) -> str:
    if status >= 500:
        return "internal"
    # 405 and other 4xx outside the API's list are a malformed request
    return HTTP_CODES.get(status, "invalid_request")


def http_error_response(exc: HTTPException) -> JSONResponse:
    """Starlette's 404 (no such route), 405 (wrong method) and the like, as JSON."""
    status = exc.status_code
    code = http_code(status)
    message = INTERNAL_MESSAGE if status >= 500 else (exc.detail or "Request failed")
    return ErrorJSON({"error": code, "message": message}, status_code=status, headers=exc.headers)
